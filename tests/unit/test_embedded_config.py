"""nats.conf rendering and credential files: pure or local-file only, no processes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from aether_desktop.services.embedded_nats import (
    EmbeddedNats,
    NatsCredentials,
    TlsFiles,
    load_or_create_credentials,
    render_config,
)

CREDS = NatsCredentials(user="aether-ab12", password="s3cr3t-_pw")


def _render(**overrides: object) -> str:
    kwargs: dict[str, object] = {
        "server_name": "aether-test",
        "listen_host": "127.0.0.1",
        "port": 0,
        "credentials": CREDS,
        "store_dir": Path("/data/nats"),
        "ports_file_dir": Path("/data/nats"),
    }
    kwargs.update(overrides)
    return render_config(**kwargs)  # type: ignore[arg-type]


def test_loopback_random_port_with_auth_and_jetstream() -> None:
    conf = _render()
    assert 'listen: "127.0.0.1:-1"' in conf
    assert 'user: "aether-ab12"' in conf
    assert 'password: "s3cr3t-_pw"' in conf
    assert 'store_dir: "/data/nats"' in conf
    assert "max_memory_store:" in conf and "max_file_store:" in conf
    assert 'ports_file_dir: "/data/nats"' in conf


def test_monitoring_and_tls_off_by_default() -> None:
    conf = _render()
    assert "http" not in conf
    assert "tls {" not in conf


def test_fixed_port_and_ipv6_host() -> None:
    assert 'listen: "0.0.0.0:4222"' in _render(listen_host="0.0.0.0", port=4222)
    assert 'listen: "[::1]:4333"' in _render(listen_host="::1", port=4333)


def test_port_out_of_range_rejected() -> None:
    with pytest.raises(ValueError):
        _render(port=70000)


def test_tls_block_verify_only_with_ca() -> None:
    conf = _render(tls=TlsFiles(Path("/c/cert.pem"), Path("/c/key.pem")))
    assert 'cert_file: "/c/cert.pem"' in conf and 'key_file: "/c/key.pem"' in conf
    assert "verify" not in conf and "ca_file" not in conf
    conf = _render(tls=TlsFiles(Path("/c/cert.pem"), Path("/c/key.pem"), Path("/c/ca.pem")))
    assert 'ca_file: "/c/ca.pem"' in conf and "verify: true" in conf


def test_strings_are_quoted_safely() -> None:
    conf = _render(credentials=NatsCredentials(user='we"ird', password="a\\b"))
    assert r'user: "we\"ird"' in conf
    assert r'password: "a\\b"' in conf


def test_credentials_generated_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    first = load_or_create_credentials(path)
    assert first.user and len(first.password) >= 24
    if os.name != "nt":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_credentials(path) == first
    assert json.loads(path.read_text())["password"] == first.password


def test_credentials_differ_between_installs(tmp_path: Path) -> None:
    a = load_or_create_credentials(tmp_path / "a.json")
    b = load_or_create_credentials(tmp_path / "b.json")
    assert a != b


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_loose_credentials_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"user": "u", "password": "p"}))
    path.chmod(0o644)
    assert load_or_create_credentials(path) == NatsCredentials("u", "p")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_corrupt_credentials_regenerated(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{not json")
    creds = load_or_create_credentials(path)
    assert json.loads(path.read_text())["user"] == creds.user


def test_tls_arguments_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EmbeddedNats(tmp_path, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError):
        EmbeddedNats(tmp_path, tls_ca=tmp_path / "ca.pem")
