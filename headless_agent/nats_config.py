"""Checks of the agent's NATS settings at start: what no reconnect can fix fails at once.

A missing ``nkeys`` package, an unreadable or malformed nkey seed or creds file,
or TLS files that do not load would otherwise surface on every connect attempt,
retried forever while the host reports nothing. (A malformed creds file is worse:
nats-py loops forever looking for its JWT.) The server refusing valid-looking
credentials is not checked here: that is the server's answer, and the agent keeps
asking, saying so clearly in its log.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from aether_protocol.connection import NatsSettings, tls_context

_JWT_MARK = "BEGIN NATS USER JWT"
_SEED_MARK = "BEGIN USER NKEY SEED"


class NatsConfigError(ValueError):
    """A NATS setting the agent cannot start with; the message says what to fix."""


def check_nats_settings(settings: NatsSettings) -> None:
    """Raise NatsConfigError when the settings cannot work, whatever the server says."""
    if settings.nkey_seed_file is not None or settings.creds_file is not None:
        nkeys = _nkeys()
        if settings.nkey_seed_file is not None:
            text = _read(settings.nkey_seed_file, "--nats-nkey")
            _check_user_seed(nkeys, text.strip(), settings.nkey_seed_file, "--nats-nkey")
        if settings.creds_file is not None:
            _check_creds(nkeys, settings.creds_file)
    try:
        tls_context(settings)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        what = ", ".join(str(p) for p in (settings.tls_ca, settings.tls_cert, settings.tls_key) if p)
        raise NatsConfigError(f"cannot load the TLS files ({what or 'system CA store'}): {exc}") from exc


def _nkeys() -> Any:
    try:
        return importlib.import_module("nkeys")
    except ImportError as exc:
        raise NatsConfigError(
            f"NATS nkey/creds authentication needs the 'nkeys' package ({exc}); "
            "install it with: pip install 'nats-py[nkeys]'"
        ) from exc


def _read(path: Path, flag: str, *, raw_newlines: bool = False) -> str:
    try:
        return path.read_bytes().decode("utf-8") if raw_newlines else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise NatsConfigError(f"{flag} {str(path)!r}: cannot read it: {reason}") from exc


def _check_user_seed(nkeys: Any, seed: str, path: Path, flag: str) -> None:
    if not seed:
        raise NatsConfigError(f"{flag} {str(path)!r} holds no nkey seed")
    try:
        kp = nkeys.from_seed(bytearray(seed.encode()))
    except (nkeys.NkeysError, ValueError) as exc:
        raise NatsConfigError(f"{flag} {str(path)!r} is not a valid nkey seed ({type(exc).__name__})") from exc
    public = kp.public_key.decode()
    kp.wipe()
    if not public.startswith("U"):
        raise NatsConfigError(
            f"{flag} {str(path)!r} is not a user seed (its public key starts with {public[:1]!r}, a user's with 'U')"
        )


def _check_creds(nkeys: Any, path: Path) -> None:
    # Newlines as they are in the file (no universal newlines, no splitlines()):
    # a '\r' must stay visible to _line_after, as nats-py sees it.
    lines = _read(path, "--nats-creds", raw_newlines=True).split("\n")
    try:
        jwt = _line_after(lines, _JWT_MARK)
        seed = _line_after(lines, _SEED_MARK)
    except NatsConfigError as exc:
        raise NatsConfigError(f"--nats-creds {str(path)!r}: {exc}") from None
    if not jwt:
        raise NatsConfigError(f"--nats-creds {str(path)!r} has no user JWT (a '-----{_JWT_MARK}-----' block)")
    if not seed:
        raise NatsConfigError(f"--nats-creds {str(path)!r} has no user seed (a '-----{_SEED_MARK}-----' block)")
    _check_user_seed(nkeys, seed, path, "--nats-creds")


def _line_after(lines: list[str], mark: str) -> str:
    """The line after the one holding ``mark``, without surrounding blanks."""
    for i, line in enumerate(lines):
        if mark in line:
            if i + 1 < len(lines) and lines[i + 1] != lines[i + 1].strip():
                # nats-py reads that line byte for byte up to the newline: a '\r'
                # (Windows line endings) or blanks around it make every connect fail.
                raise NatsConfigError(
                    f"the line after '{mark}' has blanks or Windows line endings around it, which nats-py "
                    "cannot read; remove them (e.g. dos2unix)"
                )
            return lines[i + 1].strip() if i + 1 < len(lines) else ""
    return ""
