"""Status bar: NATS link, message rate, hosts online, database backlog, rejects, last notice."""

from __future__ import annotations

import time

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QLabel, QStatusBar, QWidget

from aether_desktop.widgets import theme
from aether_desktop.widgets.state import QtState

# "Catching up" once more samples wait than the fleet sends in this long (and at least this many).
BACKLOG_S = 5.0
BACKLOG_MIN_SAMPLES = 1000


def _dot(colour: str, text: str) -> str:
    return f"<span style='color:{colour}'>●</span> {text}"


class FleetStatusBar(QStatusBar):
    """Permanent fields on the right; the last notice (command results, errors) on the left."""

    def __init__(self, state: QtState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self.notice_label = QLabel("")
        self.nats_label = QLabel()
        self.rate_label = QLabel()
        self.hosts_label = QLabel()
        self.db_label = QLabel()
        self.rejected_label = QLabel()
        self.notice_label.setMinimumWidth(200)
        self.addWidget(self.notice_label, 1)
        for w in (self.rate_label, self.hosts_label, self.rejected_label, self.db_label, self.nats_label):
            self.addPermanentWidget(w)
        # Rates and liveness change with time even when no message arrives
        # (that is exactly when they matter), so they also refresh once a second.
        self._timer = QTimer(self)
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self._on_clock)

        self._db_status: tuple[bool, int, str] = (True, 0, "")
        self._on_connection_changed(*state.connection)
        self._on_db_status_changed(*state.db_status)
        if state.last_notice is not None:
            level, text, ts = state.last_notice
            self._show_notice(level, text, ts)
        self.refresh()

        state.connection_changed.connect(self._on_connection_changed)
        state.db_status_changed.connect(self._on_db_status_changed)
        state.notice.connect(self._on_notice)
        state.fleet_tick.connect(self._on_fleet_tick)
        self._timer.start()

    def refresh(self) -> None:
        fleet = self._state.fleet
        now = self._state.now()
        msgs, samples = fleet.rates(now)
        self.rate_label.setText(f"{msgs:,.0f} msg/s · {samples:,.0f} GPU samples/s")
        online = fleet.hosts_online(now)
        offline = fleet.n_hosts - online
        colour = theme.OK if offline == 0 else theme.WARN
        text = f"hosts {online} online" + (f", {offline} offline" if offline else "")
        self.hosts_label.setText(_dot(colour if fleet.n_hosts else theme.MUTED, text))
        rejected = fleet.rejected_total
        self.rejected_label.setVisible(rejected > 0)
        if rejected:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(fleet.rejected.items()))
            self.rejected_label.setText(f"<span style='color:{theme.WARN}'>{rejected:,} rejected</span>")
            self.rejected_label.setToolTip(f"Messages that broke the protocol: {detail}")
        self._render_db()  # whether a backlog is worth showing depends on the fleet's rate

    def _show_notice(self, level: str, text: str, ts: float) -> None:
        colour = theme.NOTICE_COLORS.get(level, theme.TEXT)
        stamp = time.strftime("%H:%M:%S", time.localtime(ts))
        self.notice_label.setText(f"<span style='color:{theme.MUTED}'>{stamp}</span> "
                                  f"<span style='color:{colour}'>{_escape(text)}</span>")
        self.notice_label.setToolTip(text)

    def _on_connection_changed(self, state: str, detail: str) -> None:
        colour = theme.CONNECTION_COLORS.get(state, theme.MUTED)
        # "closed" with a reason (the embedded server cannot start) is a problem, not a clean stop.
        shown = "unavailable" if state == "closed" and detail and detail != "stopped" else state
        self.nats_label.setText(_dot(colour, f"NATS {shown}"))
        self.nats_label.setToolTip(detail or f"NATS {state}")

    def _on_db_status_changed(self, ok: bool, waiting: int, detail: str) -> None:
        self._db_status = (ok, waiting, detail)
        self._render_db()

    def _render_db(self) -> None:
        ok, waiting, detail = self._db_status
        # Samples are always on their way (fetched, in a batch, being written): only a
        # backlog beyond a few seconds of the fleet's flow is worth the operator's eye.
        _msgs, rate = self._state.fleet.rates(self._state.now())
        backlog = waiting > max(BACKLOG_MIN_SAMPLES, rate * BACKLOG_S)
        if ok and detail:
            text = _dot(theme.MUTED, detail)  # e.g. "history is off (--no-db)"
        elif ok and backlog:
            text = _dot(theme.WARN, f"database ok, catching up: {waiting:,} samples waiting")
            detail = "Stored samples trail what agents publish (the station was away, or the database was slow)."
        elif ok:
            text = _dot(theme.OK, "database ok")
            detail = f"{waiting:,} samples on their way to the database" if waiting else "database ok"
        elif waiting:
            text = _dot(theme.CRIT, f"database unavailable, {waiting:,} samples waiting")
        else:
            short = detail if len(detail) <= 60 else detail[:57] + "..."
            text = _dot(theme.CRIT, short or "database unavailable")
        self.db_label.setText(text)
        self.db_label.setToolTip(detail)

    def _on_notice(self, level: str, text: str) -> None:
        self._show_notice(level, text, self._state.now())

    def _on_fleet_tick(self) -> None:
        self.refresh()

    def _on_clock(self) -> None:
        self.refresh()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
