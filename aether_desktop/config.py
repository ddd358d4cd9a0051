"""Station configuration: one frozen dataclass, loaded once from file, environment and flags.

Precedence (highest first): command-line flags, environment variables
(``AETHER_*``), the TOML file (``<config dir>/config.toml`` or ``--config``),
built-in defaults. With nothing configured the station starts its embedded
NATS server and embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

from aether_protocol import subjects as subj
from aether_protocol.connection import NatsSettings, add_nats_arguments, split_servers

APP = "aether"


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


@dataclass(frozen=True)
class StationConfig:
    # NATS: empty `nats_servers` means "start the embedded nats-server".
    nats_servers: tuple[str, ...] = ()
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: Path | None = None
    nats_nkey: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Embedded NATS: loopback by default; beyond loopback only with credentials (always generated).
    embedded_listen: str = "127.0.0.1"
    embedded_port: int = 0
    subject_prefix: str = subj.DEFAULT_PREFIX
    # Database: None means "start the embedded PostgreSQL"; "" (or --no-db) means run without history.
    db_dsn: str | None = None
    no_db: bool = False
    data_dir: Path = default_data_dir()
    stream_max_age_h: float = 24.0
    retention_raw_days: float = 30.0
    retention_rollup_days: float = 365.0
    durable: str = "aether-store"
    # Demo fleet: N simulated agents as child processes.
    demo_hosts: int = 0
    demo_gpus: int = 8
    demo_seed: int = 1
    headless: bool = False
    close_to_tray: bool = True
    offline_after_intervals: int = 3
    log_level: str = "INFO"

    @property
    def embedded_nats(self) -> bool:
        return not self.nats_servers

    @property
    def embedded_db(self) -> bool:
        return self.db_dsn is None and not self.no_db

    def nats_settings(self, servers: tuple[str, ...] | None = None, user: str | None = None,
                      password: str | None = None) -> NatsSettings:
        return NatsSettings(
            servers=servers or self.nats_servers,
            user=user if user is not None else self.nats_user,
            password=password if password is not None else self.nats_password,
            token=self.nats_token,
            creds_file=self.nats_creds,
            nkey_seed_file=self.nats_nkey,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            name="aether-station",
        )


# Environment variable -> field. Secrets are best given here rather than as flags (ps shows flags).
ENV_MAP = {
    "AETHER_NATS": "nats_servers",
    "AETHER_NATS_USER": "nats_user",
    "AETHER_NATS_PASSWORD": "nats_password",
    "AETHER_NATS_TOKEN": "nats_token",
    "AETHER_NATS_CREDS": "nats_creds",
    "AETHER_DB_DSN": "db_dsn",
    "AETHER_DATA_DIR": "data_dir",
    "AETHER_SUBJECT_PREFIX": "subject_prefix",
    "AETHER_DEMO": "demo_hosts",
    "AETHER_LOG_LEVEL": "log_level",
}


class ConfigError(ValueError):
    pass


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(StationConfig)}
    if name not in kinds:
        raise ConfigError(f"unknown setting {name!r}")
    kind = str(kinds[name])
    try:
        if name == "nats_servers":
            return split_servers(value if isinstance(value, list | tuple | str) else str(value))
        if "Path" in kind:
            if value in (None, ""):
                return None
            if not isinstance(value, str | Path):  # `data_dir = 5` must not become a folder "5"
                raise TypeError("expected a path string")
            return Path(value).expanduser()
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise ValueError("expected true or false")
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError("expected a whole number")
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if isinstance(value, bool | int | float | list | dict):  # e.g. `subject_prefix = 1`
            raise TypeError("expected a string")
        return None if value is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot use {value!r} ({exc})") from None


def load_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    # Accept both flat keys and an [aether] table.
    table = raw.get("aether", raw)
    return {k: _coerce(k, v) for k, v in table.items() if not isinstance(v, dict)}


def load_env(env: dict[str, str]) -> dict[str, Any]:
    return {field: _coerce(field, env[key]) for key, field in ENV_MAP.items() if env.get(key) not in (None, "")}


def add_station_arguments(p: argparse.ArgumentParser) -> None:
    add_nats_arguments(p)
    p.add_argument("--config", type=Path, help=f"TOML config file (default {default_config_path()})")
    p.add_argument("--db", metavar="DSN", help="PostgreSQL/TimescaleDB DSN (default: embedded PostgreSQL)")
    p.add_argument("--no-db", action="store_true", help="run without a database (live view only, no history)")
    p.add_argument("--data-dir", type=Path, help=f"data folder (default {default_data_dir()})")
    p.add_argument("--demo", type=int, metavar="N", help="start N simulated agents (hosts) as child processes")
    p.add_argument("--demo-gpus", type=int, metavar="G", help="GPUs per simulated host (default 8)")
    p.add_argument("--subject-prefix", help="NATS subject prefix (default aether)")
    p.add_argument("--listen", metavar="ADDR", help="embedded NATS listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="embedded NATS port (default: a free port)")
    p.add_argument("--headless", action="store_true", help="run the services without a window until SIGTERM")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")


def from_args(args: argparse.Namespace, env: dict[str, str]) -> StationConfig:
    path = args.config or default_config_path()
    if args.config is not None and not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    values: dict[str, Any] = {}
    values.update(load_file(path))
    values.update(load_env(env))
    flags = {
        "nats_servers": split_servers(args.nats) or None,
        "nats_user": args.nats_user,
        "nats_password": args.nats_password,
        "nats_token": args.nats_token,
        "nats_creds": args.nats_creds,
        "nats_nkey": args.nats_nkey,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "db_dsn": args.db,
        "no_db": args.no_db or None,
        "data_dir": args.data_dir,
        "demo_hosts": args.demo,
        "demo_gpus": args.demo_gpus,
        "subject_prefix": args.subject_prefix,
        "embedded_listen": args.listen,
        "embedded_port": args.port,
        "headless": args.headless or None,
        "log_level": args.log_level,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    cfg = replace(StationConfig(), **values)
    validate(cfg)
    return cfg


def validate(cfg: StationConfig) -> None:
    try:
        subj.check_prefix(cfg.subject_prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.demo_hosts < 0 or cfg.demo_hosts > 512:
        raise ConfigError("--demo takes 0 to 512 hosts")
    if not 1 <= cfg.demo_gpus <= 64:
        raise ConfigError("--demo-gpus takes 1 to 64")
    if not 0 <= cfg.embedded_port <= 65535:
        raise ConfigError("--port takes 0 (a free port) to 65535")
    if cfg.embedded_listen not in ("127.0.0.1", "localhost", "::1") and not cfg.embedded_nats:
        raise ConfigError("--listen applies to the embedded NATS server only (no --nats given)")
