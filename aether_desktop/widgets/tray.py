"""The system-tray icon: fleet health at a glance, a menu, and rate-limited alert notifications.

The icon is green (all quiet), amber (warnings) or red (a critical alert
nobody has acknowledged). Each new alert becomes a notification, at most one
per ``min_interval_s``; alerts arriving faster are held and then shown as one
summary, so an XID storm on a host never floods the desktop. A click on the
notification focuses the alert's GPU. Where ``QSystemTrayIcon`` is not
available (offscreen, some desktops) the same notifications go to an
in-window ``NotificationArea``.

Only news is notified: an alert the manager marks ``notify=False`` (found in a
backlog replayed long after the samples were taken, or raised and cleared in
one tick) and alerts restored after a restart are listed but never popped up.
A notification says when its first sample was taken, which matters when an
alert is found late.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from PySide6.QtCore import QObject, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QColor, QIcon, QPainter, QPen, QPixmap
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from aether_desktop.services.alerts import Alert
from aether_desktop.services.rules import SEVERITY_RANK
from aether_desktop.widgets.alerts_bridge import AlertsBridge
from aether_desktop.widgets.notifications import NotificationArea

HEALTH_COLOURS = {"ok": "#3fa34d", "info": "#3fa34d", "warning": "#e0a030", "critical": "#d64541"}


def health_icon(level: str, size: int = 64) -> QIcon:
    """A filled disc in the health colour with a dark rim (readable on light and dark panels)."""
    pix = QPixmap(size, size)
    pix.fill(Qt.GlobalColor.transparent)
    p = QPainter(pix)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    p.setBrush(QColor(HEALTH_COLOURS.get(level, "#888888")))
    p.setPen(QPen(QColor("#202020"), max(1.0, size / 16)))
    m = size * 0.1
    p.drawEllipse(QRectF(m, m, size - 2 * m, size - 2 * m))
    p.end()
    return QIcon(pix)


def _when(ts: float) -> str:
    """The sample's time of day, with the date when it is not today (a late find)."""
    lt = time.localtime(ts)
    fmt = "%H:%M:%S" if lt[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S"
    return time.strftime(fmt, lt)


class NotificationLimiter:
    """At most one notification per interval; what arrives in between is summarised (pure logic)."""

    def __init__(self, min_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last = -1e18
        self.held: list[Alert] = []

    def offer(self, alert: Alert) -> Alert | None:
        """The alert to show now, or None when it is held for the next summary."""
        now = self._clock()
        if now - self._last >= self.min_interval_s and not self.held:
            self._last = now
            return alert
        self.held.append(alert)
        return None

    def due_in(self) -> float:
        return max(0.0, self._last + self.min_interval_s - self._clock())

    def replace_held(self, alert: Alert) -> bool:
        """A held alert changed before its summary: keep its newest snapshot (True if it was held)."""
        found = any(a.id == alert.id for a in self.held)
        if found:
            self.held = [alert if a.id == alert.id else a for a in self.held]
        return found

    def take_held(self) -> list[Alert]:
        held, self.held = self.held, []
        if held:
            self._last = self._clock()
        return held


class FleetTray(QObject):
    show_window_requested = Signal()
    quit_requested = Signal()
    gpu_focus_requested = Signal(str, int, float)  # host, gpu, ts

    def __init__(self, bridge: AlertsBridge, fallback: NotificationArea | None = None,
                 min_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 use_system_tray: bool | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._bridge = bridge
        self._limiter = NotificationLimiter(min_interval_s, clock)
        self._fallback = fallback
        self._last_target: tuple[str, int, float] | None = None
        self._notified: dict[str, str] = {}  # alert id -> severity when last notified
        self.paused = False
        self.health = "ok"
        self.shown: list[tuple[str, str, str]] = []  # (title, text, level): what was notified, newest last
        available = QSystemTrayIcon.isSystemTrayAvailable() if use_system_tray is None else use_system_tray
        self.tray: QSystemTrayIcon | None = None
        self.menu = QMenu()
        self.show_action = QAction("Show window", self.menu)
        self.pause_action = QAction("Pause notifications", self.menu)
        self.pause_action.setCheckable(True)
        self.quit_action = QAction("Quit", self.menu)
        for a in (self.show_action, self.pause_action, self.quit_action):
            self.menu.addAction(a)
        self.show_action.triggered.connect(self.show_window_requested)
        self.quit_action.triggered.connect(self.quit_requested)
        self.pause_action.toggled.connect(self._on_pause_toggled)
        if available:
            self.tray = QSystemTrayIcon(health_icon(bridge.health), self)
            self.tray.setContextMenu(self.menu)
            self.tray.messageClicked.connect(self._on_message_clicked)
            self.tray.activated.connect(self._on_activated)
            self.tray.show()
        if fallback is not None:
            fallback.clicked.connect(self.gpu_focus_requested)
        self._flush_timer = QTimer(self)
        self._flush_timer.setSingleShot(True)
        self._flush_timer.timeout.connect(self.flush_pending)
        bridge.alert_raised.connect(self._on_alert_raised)
        bridge.alert_updated.connect(self._on_alert_updated)
        bridge.alerts_restored.connect(self._on_alerts_restored)
        bridge.health_changed.connect(self._on_health_changed)
        self._on_health_changed(bridge.health)
        self._on_alerts_restored(bridge.open_alerts())  # open before this tray existed: not news

    @property
    def uses_system_tray(self) -> bool:
        return self.tray is not None

    # ------------------------------------------------------------------ handlers

    def _on_health_changed(self, level: str) -> None:
        self.health = level
        tip = {"ok": "Aether: fleet healthy", "info": "Aether: fleet healthy",
               "warning": "Aether: warnings open", "critical": "Aether: critical alert"}.get(level, "Aether")
        if self.tray is not None:
            self.tray.setIcon(health_icon(level))
            self.tray.setToolTip(tip)

    def _on_alerts_restored(self, alerts: Iterable[Alert]) -> None:
        # Notified by an earlier session; recorded at their level so an escalation still notifies.
        for a in alerts:
            self._notified.setdefault(a.id, a.severity)

    def _on_alert_raised(self, alert: Alert) -> None:
        if self.paused or alert.state != "active" or not alert.notify:
            return
        now = self._limiter.offer(alert)
        if now is not None:
            self._notify_one(now)
        elif not self._flush_timer.isActive():
            self._flush_timer.start(int(self._limiter.due_in() * 1000) + 1)

    def _on_alert_updated(self, alert: Alert) -> None:
        # Still waiting for the summary: the summary shows its newest state.
        if self._limiter.replace_held(alert):
            return
        # An alert that escalated since it was notified deserves a notification again.
        before = self._notified.get(alert.id)
        if alert.state == "active" and before is not None and SEVERITY_RANK[alert.severity] > SEVERITY_RANK[before]:
            self._on_alert_raised(alert)

    def flush_pending(self) -> None:
        """Show what the rate limit held back (one alert, or a summary); the flush timer calls this."""
        self._flush_timer.stop()
        held = self._limiter.take_held()
        if self.paused or not held:
            return
        if len(held) == 1:
            self._notify_one(held[0])
            return
        for a in held:  # shown inside the summary: notified at this level, so an escalation notifies
            self._notified[a.id] = a.severity
        worst = max(held, key=lambda a: (SEVERITY_RANK[a.severity], a.score))
        hosts = sorted({a.host for a in held})
        text = (f"{len(held)} new alerts on {len(hosts)} host(s) ({', '.join(hosts[:3])}"
                f"{'...' if len(hosts) > 3 else ''}); worst: {worst.kind} on {worst.host} GPU {worst.gpu} "
                f"since {_when(worst.first_ts)}")
        self._show(f"Aether: {len(held)} new alerts", text, worst.severity, (worst.host, worst.gpu, worst.first_ts))

    def _notify_one(self, a: Alert) -> None:
        self._notified[a.id] = a.severity
        gpus = ",".join(str(g) for g in a.gpus)
        self._show(f"{a.severity.upper()}: {a.kind} on {a.host} GPU {gpus}",
                   f"{a.message}\n(first sample {_when(a.first_ts)})", a.severity, (a.host, a.gpu, a.first_ts))

    def _show(self, title: str, text: str, level: str, target: tuple[str, int, float]) -> None:
        self._last_target = target
        self.shown.append((title, text, level))
        if self.tray is not None:
            icon = (QSystemTrayIcon.MessageIcon.Critical if level == "critical"
                    else QSystemTrayIcon.MessageIcon.Warning)
            self.tray.showMessage(title, text, icon, 10_000)
        elif self._fallback is not None:
            self._fallback.show_toast(title, text, level, target)

    def _on_message_clicked(self) -> None:
        if self._last_target is not None:
            self.show_window_requested.emit()
            self.gpu_focus_requested.emit(*self._last_target)

    def _on_activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason == QSystemTrayIcon.ActivationReason.Trigger:
            self.show_window_requested.emit()

    def _on_pause_toggled(self, paused: bool) -> None:
        self.paused = paused
        if paused:
            self._limiter.take_held()  # what piled up while paused is not replayed later
