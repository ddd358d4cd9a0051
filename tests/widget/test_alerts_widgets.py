"""Alerts panel, tray (fallback notifications offscreen), bridge: pytest-qt, offscreen."""

from __future__ import annotations

import itertools

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from pytestqt.qtbot import QtBot

from aether_desktop.services.alerts import AlertManager
from aether_desktop.services.rules import Finding
from aether_desktop.widgets.alerts_bridge import AlertsBridge
from aether_desktop.widgets.alerts_panel import AlertsPanel
from aether_desktop.widgets.notifications import NotificationArea
from aether_desktop.widgets.tray import FleetTray, NotificationLimiter, health_icon


def make_manager() -> AlertManager:
    ids = itertools.count()
    return AlertManager(id_factory=lambda: f"a{next(ids)}")


def fire(m: AlertManager, host: str, gpu: int, t: float, kind: str = "thermal_anomaly",
         severity: str = "warning", detector: str = "model") -> None:
    for k in range(3):
        m.update(t + k, {(host, gpu): t + k},
                 [Finding(host, gpu, t + k, detector, kind, severity, "model", 0.8, f"{kind} msg")])  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_panel_lists_filters_and_focuses(qtbot: QtBot) -> None:
    m = make_manager()
    bridge = AlertsBridge(m, clock=lambda: 100.0)
    panel = AlertsPanel(bridge)
    qtbot.addWidget(panel)
    fire(m, "node-1", 3, 10.0)
    fire(m, "node-2", 0, 20.0, kind="xid", severity="critical", detector="xid")
    assert panel.table.rowCount() == 2
    assert panel.alerts()[0].severity == "critical"  # worst first
    panel.severity_filter.setCurrentText("warning")
    assert [a.host for a in panel.alerts()] == ["node-1"]
    panel.severity_filter.setCurrentText("all")
    panel.host_filter.setCurrentText("node-2")
    assert [a.host for a in panel.alerts()] == ["node-2"]
    panel.host_filter.setCurrentText("all hosts")
    with qtbot.waitSignal(panel.gpu_focus_requested) as sig:
        panel.table.cellClicked.emit(1, 0)
    assert sig.args == ["node-1", 3, 10.0]


def test_panel_acknowledge_and_snooze_go_through_the_manager(qtbot: QtBot) -> None:
    m = make_manager()
    bridge = AlertsBridge(m, clock=lambda: 100.0)
    panel = AlertsPanel(bridge)
    qtbot.addWidget(panel)
    fire(m, "node-1", 0, 0.0)
    fire(m, "node-2", 0, 0.0)
    panel.table.selectRow(0)
    panel.ack_button.click()
    a0 = m.get(panel.alerts()[0].id) or m.get(panel.alerts()[1].id)
    states = sorted(a.state for a in m.open_alerts())
    assert states == ["acknowledged", "active"] and a0 is not None
    panel.state_filter.setCurrentText("active")
    assert len(panel.alerts()) == 1
    panel.table.selectRow(0)
    panel.snooze_button.click()
    snoozed = [a for a in m.open_alerts() if a.state == "snoozed"]
    assert len(snoozed) == 1 and snoozed[0].snoozed_until == 3700.0
    assert panel.alerts() == []  # the "active" filter hides it now


def test_panel_shows_model_info_and_retrain_progress(qtbot: QtBot) -> None:
    bridge = AlertsBridge(make_manager())
    panel = AlertsPanel(bridge)
    qtbot.addWidget(panel)
    bridge.model_info_changed.emit("anomaly model v3 (history)")
    assert "v3" in panel.model_label.text()
    with qtbot.waitSignal(bridge.retrain_requested):
        panel.retrain_button.click()
    bridge.retrain_progress.emit(0.4, "training")
    assert not panel.retrain_button.isEnabled() and panel.progress.value() == 40
    bridge.retrain_progress.emit(1.0, "done")
    assert panel.retrain_button.isEnabled()


def test_bridge_health_follows_open_unacknowledged_alerts(qtbot: QtBot) -> None:
    m = make_manager()
    bridge = AlertsBridge(m, clock=lambda: 50.0)
    levels: list[str] = []
    bridge.health_changed.connect(levels.append)
    fire(m, "h", 0, 0.0)
    fire(m, "h", 1, 0.0, kind="xid", severity="critical", detector="xid")
    crit = next(a for a in m.open_alerts() if a.severity == "critical")
    bridge.acknowledge(crit.id)
    assert levels == ["warning", "critical", "warning"]
    bridge.detach()


def test_health_icons_are_drawn_in_the_right_colour(qtbot: QtBot) -> None:
    for level, colour in (("ok", "#3fa34d"), ("warning", "#e0a030"), ("critical", "#d64541")):
        img = health_icon(level, 32).pixmap(32, 32).toImage()
        assert img.pixelColor(16, 16) == QColor(colour)


def test_limiter_summarises_a_burst() -> None:
    clock = Clock()
    lim = NotificationLimiter(10.0, clock)
    m = make_manager()
    fire(m, "h", 0, 0.0)
    a = m.open_alerts()[0]
    assert lim.offer(a) is a
    clock.t = 1.0
    assert lim.offer(a) is None and lim.offer(a) is None
    assert lim.due_in() == 9.0
    assert len(lim.take_held()) == 2


def test_tray_falls_back_to_in_window_toasts_and_rate_limits(qtbot: QtBot) -> None:
    m = make_manager()
    bridge = AlertsBridge(m)
    area = NotificationArea()
    qtbot.addWidget(area)
    clock = Clock()
    tray = FleetTray(bridge, fallback=area, min_interval_s=10.0, clock=clock, use_system_tray=False)
    assert not tray.uses_system_tray
    fire(m, "node-1", 2, 0.0)
    assert len(area.toasts()) == 1 and "node-1" in tray.shown[0][0]
    with qtbot.waitSignal(tray.gpu_focus_requested) as sig:
        qtbot.mouseClick(area.toasts()[0], Qt.MouseButton.LeftButton)
    assert sig.args == ["node-1", 2, 0.0]
    # A burst inside the interval becomes one summary.
    clock.t = 1.0
    for h in range(5):
        fire(m, f"burst-{h}", 0, 1.0, kind="xid", severity="critical", detector="xid")
    assert len(tray.shown) == 1
    clock.t = 11.0
    tray.flush_pending()  # what the flush timer does when the interval is over
    title, text, level = tray.shown[1]
    assert "5 new alerts" in title and level == "critical" and "5 host(s)" in text


def test_tray_pause_and_menu(qtbot: QtBot) -> None:
    m = make_manager()
    bridge = AlertsBridge(m)
    area = NotificationArea()
    qtbot.addWidget(area)
    tray = FleetTray(bridge, fallback=area, use_system_tray=False)
    assert [a.text() for a in tray.menu.actions()] == ["Show window", "Pause notifications", "Quit"]
    tray.pause_action.trigger()
    fire(m, "node-1", 0, 0.0)
    assert tray.shown == [] and tray.health == "warning"
    with qtbot.waitSignal(tray.quit_requested):
        tray.quit_action.trigger()
    tray.menu.deleteLater()
