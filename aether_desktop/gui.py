"""The windowed station: QApplication with the asyncio loop inside it (qasync)."""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np

from aether_desktop.config import StationConfig
from aether_desktop.station import Station, data_dir_ok

log = logging.getLogger("aether.gui")


class CommandProxy:
    """The window's CommandClient: forwards to the bus once it exists, never raises."""

    def __init__(self, station: Station) -> None:
        self._station = station

    async def send(self, host: str, op: str, gpus: list[int] | None = None, **fields: object) -> tuple[bool, str]:
        if self._station.bus is None:
            return False, f"{op} {host}: not connected to NATS yet"
        return await self._station.bus.send(host, op, gpus, **fields)


class HistoryProxy:
    """The window's HistorySource: waits for the database, says clearly when there is none."""

    def __init__(self, station: Station) -> None:
        self._station = station

    async def fetch(self, keys: Sequence[tuple[str, int]], start: float, end: float, metrics: Sequence[str],
                    max_points: int = 2000) -> dict[tuple[str, int], dict[str, tuple[np.ndarray, np.ndarray]]]:
        if self._station.cfg.no_db:
            raise RuntimeError("history is off (started with --no-db)")
        if not await self._station.wait_db(10.0):
            raise RuntimeError(f"database unavailable: {self._station.db_error or 'still starting'}")
        return await self._station.history.fetch(keys, start, end, metrics, max_points)  # type: ignore[no-any-return]

    async def export_csv(self, keys: Sequence[tuple[str, int]], start: float, end: float, path: Any) -> Any:
        if not await self._station.wait_db(10.0):
            raise RuntimeError("database unavailable")
        return await self._station.history.export_csv(keys, start, end, path)


# What Qt 6.5+'s xcb plugin loads beyond a plain X11 client (found missing on minimal Debian images).
X11_LIBS = ("xcb-cursor", "xcb-icccm", "xcb-keysyms", "xkbcommon-x11")


def missing_display_libs() -> str | None:
    """Qt aborts the process without xcb-cursor on X11; say what to install instead of dying."""
    import ctypes.util
    import os

    if sys.platform != "linux" or os.environ.get("QT_QPA_PLATFORM") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if not os.environ.get("DISPLAY"):
        return "no display: set DISPLAY (or run 'aether --headless', or QT_QPA_PLATFORM=offscreen)"
    missing = [lib for lib in X11_LIBS if ctypes.util.find_library(lib) is None]
    if missing:
        return ("Qt's X11 plugin needs these system libraries: " + ", ".join("lib" + m for m in missing)
                + ". Debian/Ubuntu: sudo apt-get install libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 "
                "libxkbcommon-x11-0 (Fedora: xcb-util-cursor xcb-util-wm xcb-util-keysyms); "
                "or run 'aether --headless'")
    return None


def run_gui(cfg: StationConfig) -> int:
    import qasync
    from PySide6.QtWidgets import QApplication

    from aether_desktop.widgets.main_window import MainWindow
    from aether_desktop.widgets.state import QtState

    problem = data_dir_ok(cfg.data_dir) or missing_display_libs()
    if problem:
        print(f"aether: {problem}", file=sys.stderr)
        return 2
    existing = QApplication.instance()
    app = existing if isinstance(existing, QApplication) else QApplication(sys.argv)
    app.setApplicationName("Aether")
    app.setOrganizationName("Aether")
    # Qt must not stop the loop under our feet when a window closes: shutdown is ours (station.stop first).
    app.setQuitOnLastWindowClosed(False)
    from aether_desktop.widgets import theme

    theme.apply_dark_palette(app)
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)

    station = Station(cfg, sink=None)  # type: ignore[arg-type]
    state = QtState(station.fleet)
    station.sink = state
    install_error_handlers(loop, state)
    window = MainWindow(state, CommandProxy(station), HistoryProxy(station))
    from aether_desktop.wiring import wire_gui, wire_services

    services = wire_services(station)
    closing = asyncio.Event()
    wire_gui(station, state, window, app, closing, services)
    window.start_demo_requested.connect(lambda: _start_demo(station, state))
    app.aboutToQuit.connect(closing.set)
    _stop_on_signals(closing)
    app.lastWindowClosed.connect(closing.set)
    window.show()

    async def main() -> None:
        try:
            await station.start()
            if cfg.demo_hosts:
                state.set_demo_active(True)
        except Exception as exc:  # e.g. nats-server missing: show it, keep the window
            log.exception("station failed to start")
            state.post_notice("error", f"station failed to start: {exc}")
        await closing.wait()
        await station.stop()
        await _cancel_leftover_tasks()

    with loop:
        loop.run_until_complete(main())
    return 0


async def _cancel_leftover_tasks(timeout: float = 5.0) -> None:
    """Cancel and await what is still pending (nats-py's per-subscription readers, widget tasks).

    asyncio.run() does this for --headless; without it, closing the qasync loop destroys
    pending tasks and each one logs "Task was destroyed but it is pending" at exit.
    """
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        done, still = await asyncio.wait(pending, timeout=timeout)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("task %s failed while shutting down: %s", task.get_name(), task.exception())
        if still:
            log.warning("%d task(s) did not stop within %.0f s", len(still), timeout)


def _stop_on_signals(closing: asyncio.Event) -> None:
    """SIGTERM/SIGINT (logout, kill, Ctrl-C) shut down like Quit: demo agents and embedded servers stop too.

    Python runs signal handlers only when it has control; the window's 10 Hz frame timer gives it that.
    """
    import signal

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        closing.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _start_demo(station: Station, state: Any) -> None:
    try:
        station.start_demo()
        state.set_demo_active(True)
    except Exception as exc:  # nats not up yet, python missing: tell the operator
        log.exception("demo start failed")
        state.post_notice("error", f"could not start the demo fleet: {exc}")


def install_error_handlers(loop: asyncio.AbstractEventLoop, state: Any) -> None:
    """Errors in tasks and Qt slots are logged and shown, never lost (and never kill the app)."""

    def loop_handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        msg = context.get("message", "error in a background task")
        log.error("%s", msg, exc_info=exc)
        try:
            state.post_notice("error", f"{msg}: {exc}" if exc else msg)
        except RuntimeError as gone:  # the window is already gone (shutdown): the log has it
            log.debug("notice not shown: %s", gone)

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log.error("unhandled error: %s", "".join(traceback.format_exception(kind, exc, tb)))
        state.post_notice("error", f"internal error: {exc}")

    loop.set_exception_handler(loop_handler)
    sys.excepthook = hook
