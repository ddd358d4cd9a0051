"""QtState: the one place where service callbacks become Qt signals.

Services (bus, store, command client) run on the same asyncio loop as Qt
(qasync) and call the plain methods here; widgets connect to the signals.
Fleet rendering is coalesced: the bus only bumps ``FleetState.version``, and a
frame timer emits ``fleet_tick`` at most ``fps`` times a second when that
version moved, so no widget ever redraws per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

import numpy as np
from PySide6.QtCore import QObject, QTimer, Signal

from aether_desktop.services.fleet import FleetState

log = logging.getLogger(__name__)

Key = tuple[str, int]
# key -> metric -> (epoch seconds, values)
HistoryData = dict[Key, dict[str, tuple[np.ndarray, np.ndarray]]]


class CommandClient(Protocol):
    """What the widgets need from the command service (structural; no service import)."""

    async def send(
        self, host: str, op: str, gpus: list[int] | None = None, **fields: object
    ) -> tuple[bool, str]:
        """(ok, message). Never raises for an offline host: says "host X offline (no responders)"."""
        ...


class HistorySource(Protocol):
    """What the plots need from the history store (structural; no service import)."""

    async def fetch(
        self,
        keys: Sequence[Key],
        start: float,
        end: float,
        metrics: Sequence[str],
        max_points: int = 2000,
    ) -> HistoryData: ...


class TaskSet:
    """Fire-and-forget coroutines from widgets, run on the qasync loop.

    asyncio keeps only weak references to tasks, so a widget that just called
    ensure_future could lose its task to the garbage collector; this keeps them
    until done, logs failures nobody awaited, and cancels them when the widget goes.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        fut = asyncio.ensure_future(coro)
        self._tasks.add(fut)
        fut.add_done_callback(self._on_done)
        return fut

    def _on_done(self, fut: asyncio.Future[Any]) -> None:
        self._tasks.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("background task failed", exc_info=fut.exception())

    @property
    def pending(self) -> list[asyncio.Future[Any]]:
        return [t for t in self._tasks if not t.done()]

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()


class QtState(QObject):
    """Qt-facing state: holds the FleetState and re-emits service events as signals."""

    # NATS connection: state is "connecting" | "connected" | "reconnecting" | "disconnected" | "closed".
    connection_changed = Signal(str, str)
    # Store: ok, samples waiting to be written, human-readable detail.
    db_status_changed = Signal(bool, int, str)
    # level is "info" | "ok" | "warning" | "error"; shown in the status bar.
    notice = Signal(str, str)
    # At most fps per second, only when the fleet changed (or a host's liveness flipped).
    fleet_tick = Signal()
    # Demo fleet started/stopped by the composition root.
    demo_changed = Signal(bool)
    # Room for alerts/jobs signals added by their owners.

    def __init__(
        self,
        fleet: FleetState,
        fps: float = 10.0,
        clock: Callable[[], float] = time.time,
        start: bool = True,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._fleet = fleet
        self._clock = clock
        self._seen_version = -1
        self._connection: tuple[str, str] = ("disconnected", "")
        self._db: tuple[bool, int, str] = (True, 0, "")
        self._last_notice: tuple[str, str, float] | None = None
        self._demo_active = False
        self._timer = QTimer(self)
        self._timer.setInterval(max(1, round(1000.0 / fps)))
        self._timer.timeout.connect(self._on_frame)
        if start:
            self._timer.start()

    # ------------------------------------------------------------------ read side (widgets)

    @property
    def fleet(self) -> FleetState:
        return self._fleet

    def now(self) -> float:
        """Wall-clock epoch seconds; injectable so widget tests control time."""
        return self._clock()

    @property
    def connection(self) -> tuple[str, str]:
        return self._connection

    @property
    def db_status(self) -> tuple[bool, int, str]:
        return self._db

    @property
    def last_notice(self) -> tuple[str, str, float] | None:
        """(level, text, time) of the latest notice, for widgets created after it was posted."""
        return self._last_notice

    @property
    def demo_active(self) -> bool:
        return self._demo_active

    # ------------------------------------------------------------------ write side (services)

    def set_connection(self, state: str, detail: str = "") -> None:
        if (state, detail) != self._connection:
            self._connection = (state, detail)
            self.connection_changed.emit(state, detail)

    def set_db_status(self, ok: bool, waiting: int = 0, detail: str = "") -> None:
        if (ok, waiting, detail) != self._db:
            self._db = (ok, waiting, detail)
            self.db_status_changed.emit(ok, waiting, detail)

    def post_notice(self, level: str, text: str) -> None:
        self._last_notice = (level, text, self._clock())
        self.notice.emit(level, text)

    def set_demo_active(self, active: bool) -> None:
        if active != self._demo_active:
            self._demo_active = active
            self.demo_changed.emit(active)

    # ------------------------------------------------------------------ frame timer

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    @property
    def running(self) -> bool:
        return self._timer.isActive()

    def tick_now(self) -> bool:
        """Run one frame check immediately (tests, or right after a bulk load); True if it emitted."""
        return self._on_frame()

    def _on_frame(self) -> bool:
        self._fleet.poll(self._clock())
        if self._fleet.version == self._seen_version:
            return False
        self._seen_version = self._fleet.version
        self.fleet_tick.emit()
        return True
