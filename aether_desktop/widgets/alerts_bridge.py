"""AlertsBridge: the AlertManager's callbacks as Qt signals, and the operator's actions back.

The manager runs on the qasync loop (the same thread as Qt), so its callbacks
can emit directly. Acknowledge and snooze go through the manager, whose
"updated" callback then reaches the panel, the tray and the alert writer
alike. Retrain progress arrives from a worker thread and is queued to the GUI
thread by the ``retrain_progress`` signal (a cross-thread emit is queued).
The lead may fold this into QtState later; it holds no widgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import QObject, Signal

from aether_desktop.services.alerts import Alert, AlertManager


class AlertsBridge(QObject):
    alert_raised = Signal(object)  # Alert
    alert_updated = Signal(object)  # Alert
    alert_cleared = Signal(object)  # Alert
    # Open alerts re-opened from the database after a restart (list[Alert]): listed, not notified.
    alerts_restored = Signal(object)
    # Worst severity among open, un-acknowledged alerts: "ok" | "info" | "warning" | "critical".
    health_changed = Signal(str)
    model_info_changed = Signal(str)  # one line describing the anomaly model
    retrain_progress = Signal(float, str)  # fraction, stage (may be emitted from a worker thread)
    retrain_requested = Signal()

    def __init__(self, manager: AlertManager, clock: Callable[[], float] = time.time,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.manager = manager
        self._clock = clock
        self._health = self._compute_health()
        manager.on_alert_raised.connect(self._on_raised)
        manager.on_alert_updated.connect(self._on_updated)
        manager.on_alert_cleared.connect(self._on_cleared)
        manager.on_alerts_restored.connect(self._on_restored)

    # ------------------------------------------------------------------ actions (from widgets)

    def acknowledge(self, alert_id: str) -> None:
        self.manager.acknowledge(alert_id, self._clock())

    def snooze(self, alert_id: str, seconds: float = 3600.0) -> None:
        self.manager.snooze(alert_id, self._clock() + seconds)

    def open_alerts(self) -> list[Alert]:
        return self.manager.open_alerts()

    @property
    def health(self) -> str:
        return self._health

    def detach(self) -> None:
        """Stop listening (the manager outlives the window in tray mode, or in tests)."""
        self.manager.on_alert_raised.disconnect(self._on_raised)
        self.manager.on_alert_updated.disconnect(self._on_updated)
        self.manager.on_alert_cleared.disconnect(self._on_cleared)
        self.manager.on_alerts_restored.disconnect(self._on_restored)

    # ------------------------------------------------------------------ manager callbacks

    def _on_raised(self, alert: Alert) -> None:
        self.alert_raised.emit(alert)
        self._refresh_health()

    def _on_updated(self, alert: Alert) -> None:
        self.alert_updated.emit(alert)
        self._refresh_health()

    def _on_cleared(self, alert: Alert) -> None:
        self.alert_cleared.emit(alert)
        self._refresh_health()

    def _on_restored(self, alerts: list[Alert]) -> None:
        self.alerts_restored.emit(list(alerts))
        self._refresh_health()

    def _compute_health(self) -> str:
        return self.manager.health() or "ok"

    def _refresh_health(self) -> None:
        h = self._compute_health()
        if h != self._health:
            self._health = h
            self.health_changed.emit(h)
