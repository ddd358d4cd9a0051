"""Subject names (pure). The prefix is configurable: one deployment per prefix."""

from __future__ import annotations

import re

DEFAULT_PREFIX = "aether"
_HOST_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

TELEMETRY_STREAM = "AETHER_TELEMETRY"
EVENTS_STREAM = "AETHER_EVENTS"


def valid_host_id(host: str) -> bool:
    return bool(_HOST_RE.match(host))


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"invalid subject prefix {prefix!r}: use dot-separated [A-Za-z0-9_-] tokens")
    return prefix


def sanitize_host_id(name: str) -> str:
    """Derive a protocol host id from a hostname (dots and other characters become '-')."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", name.split(".")[0] if "." in name else name)
    cleaned = cleaned.strip("-")[:64]
    return cleaned or "host"


def _host(host: str) -> str:
    if not valid_host_id(host):
        raise ValueError(f"invalid host id {host!r}: 1-64 characters of [A-Za-z0-9_-]")
    return host


def telemetry(prefix: str, host: str) -> str:
    return f"{prefix}.telemetry.{_host(host)}"


def events(prefix: str, host: str) -> str:
    return f"{prefix}.events.{_host(host)}"


def command(prefix: str, host: str) -> str:
    return f"{prefix}.cmd.{_host(host)}"


def all_telemetry(prefix: str) -> str:
    return f"{prefix}.telemetry.*"


def all_events(prefix: str) -> str:
    return f"{prefix}.events.*"


def stream_name(base: str, prefix: str) -> str:
    """Stream name for a prefix: the default prefix keeps the documented names."""
    if prefix == DEFAULT_PREFIX:
        return base
    return base + "_" + re.sub(r"[^A-Za-z0-9]", "_", prefix).upper()


def host_from_subject(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]
