"""NATS connection settings shared by the agent and the station (pure: builds options, no I/O).

The same options serve the embedded server (generated user/password on
loopback) and real deployments (TLS, nkeys seed, creds files, tokens).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class NatsSettings:
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: Path | None = None
    nkey_seed_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    name: str = "aether"
    # A short ping interval finds a dead server in seconds, not minutes.
    ping_interval_s: int = 5
    max_outstanding_pings: int = 2
    reconnect_wait_s: float = 1.0
    connect_timeout_s: float = 3.0
    extra: dict[str, object] = field(default_factory=dict)

    def describe(self) -> str:
        """The servers without secrets, for logs and the status bar."""
        return ", ".join(_strip_userinfo(s) for s in self.servers)


def _strip_userinfo(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return url


def split_servers(values: list[str] | tuple[str, ...] | str | None) -> tuple[str, ...]:
    """`--nats` is repeatable and also takes a comma list (a cluster)."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            if "://" not in part:
                part = "nats://" + part
            out.append(part)
    return tuple(out)


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if not (settings.tls_ca or settings.tls_cert):
        for s in settings.servers:
            if s.startswith("tls://"):
                return ssl.create_default_context()
        return None
    ctx = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
    if settings.tls_cert:
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
    return ctx


def connect_kwargs(settings: NatsSettings) -> dict[str, object]:
    """Keyword arguments for ``nats.connect`` (callbacks are added by the caller)."""
    kw: dict[str, object] = {
        "servers": list(settings.servers),
        "name": settings.name,
        # Reconnect forever: a GPU host or a station must outlive any server outage.
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": settings.reconnect_wait_s,
        "ping_interval": settings.ping_interval_s,
        "max_outstanding_pings": settings.max_outstanding_pings,
        "connect_timeout": settings.connect_timeout_s,
    }
    if settings.user is not None:
        kw["user"] = settings.user
        kw["password"] = settings.password or ""
    if settings.token is not None:
        kw["token"] = settings.token
    if settings.creds_file is not None:
        kw["user_credentials"] = str(settings.creds_file)
    if settings.nkey_seed_file is not None:
        kw["nkeys_seed"] = str(settings.nkey_seed_file)
    ctx = tls_context(settings)
    if ctx is not None:
        kw["tls"] = ctx
    kw.update(settings.extra)
    return kw


def add_nats_arguments(parser: object) -> None:
    """The NATS flags both `aether` and `aether-agent` accept (argparse parser)."""
    p = parser  # argparse.ArgumentParser; typed loosely to keep this module import-light
    p.add_argument("--nats", action="append", metavar="URL",  # type: ignore[attr-defined]
                   help="NATS server URL; repeat or comma-separate for a cluster")
    p.add_argument("--nats-user", metavar="USER", help="NATS user name")  # type: ignore[attr-defined]
    p.add_argument("--nats-password", metavar="PASSWORD",  # type: ignore[attr-defined]
                   help="NATS password (prefer env AETHER_NATS_PASSWORD)")
    p.add_argument("--nats-token", metavar="TOKEN", help="NATS token (prefer env AETHER_NATS_TOKEN)")  # type: ignore[attr-defined]
    p.add_argument("--nats-creds", metavar="FILE", type=Path, help="NATS .creds file (JWT + nkey)")  # type: ignore[attr-defined]
    p.add_argument("--nats-nkey", metavar="FILE", type=Path, help="NATS nkey seed file")  # type: ignore[attr-defined]
    p.add_argument("--tls-ca", metavar="FILE", type=Path, help="CA bundle to verify the NATS server")  # type: ignore[attr-defined]
    p.add_argument("--tls-cert", metavar="FILE", type=Path, help="client certificate (mutual TLS)")  # type: ignore[attr-defined]
    p.add_argument("--tls-key", metavar="FILE", type=Path, help="client private key (mutual TLS)")  # type: ignore[attr-defined]
