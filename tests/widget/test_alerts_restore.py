"""Alerts across a restart, late finds and summaries: panel, bridge and tray (pytest-qt, offscreen)."""

from __future__ import annotations

import itertools

from pytestqt.qtbot import QtBot

from aether_desktop.services.alerts import Alert, AlertManager
from aether_desktop.services.rules import Finding
from aether_desktop.widgets.alerts_bridge import AlertsBridge
from aether_desktop.widgets.alerts_panel import AlertsPanel
from aether_desktop.widgets.tray import FleetTray

T0 = 1_764_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def stored(aid: str = "a1", severity: str = "warning", state: str = "active") -> Alert:
    return Alert(id=aid, host="n1", kind="xid", severity=severity, source="rule", state=state,  # type: ignore[arg-type]
                 first_ts=T0, raised_ts=T0, last_ts=T0, message="XID 13", score=13.0, count=1,
                 gpu_first_ts=((2, T0),))


def xid(host: str, code: int, severity: str, t: float) -> Finding:
    return Finding(host, 0, t, "xid", "xid", severity, "rule", float(code), f"XID {code}")  # type: ignore[arg-type]


def test_alerts_restored_after_the_window_was_built_are_shown_not_notified(qtbot: QtBot) -> None:
    m = AlertManager()
    bridge = AlertsBridge(m, clock=lambda: T0 + 100)
    panel = AlertsPanel(bridge)
    qtbot.addWidget(panel)
    tray = FleetTray(bridge, use_system_tray=False)
    # The database opens after the window exists (the station's usual order).
    m.restore([stored("a1", "critical"), stored("a2", "warning", "acknowledged")], now=T0 + 60)
    m.update(T0 + 120, {}, [])
    assert panel.table.rowCount() == 2 and panel.count_label.text().startswith("2 open")
    assert bridge.health == "critical" and tray.health == "critical"
    assert tray.shown == []
    # Acknowledge works on a restored alert, from the panel.
    panel.table.selectRow(next(i for i, a in enumerate(panel.alerts()) if a.id == "a1"))
    panel.ack_button.click()
    assert m.get("a1") is not None and m.get("a1").state == "acknowledged"  # type: ignore[union-attr]
    assert bridge.health == "ok" and tray.health == "ok"
    bridge.detach()


def test_a_restored_alert_that_escalates_is_notified(qtbot: QtBot) -> None:
    m = AlertManager()
    bridge = AlertsBridge(m)
    tray = FleetTray(bridge, use_system_tray=False, clock=Clock())
    m.restore([stored("a1", "warning")], now=T0)
    m.update(T0 + 1, {("n1", 0): T0 + 1}, [xid("n1", 79, "critical", T0 + 1)])
    assert [s[2] for s in tray.shown] == ["critical"]
    bridge.detach()


def test_an_alert_first_shown_in_a_summary_is_notified_when_it_escalates(qtbot: QtBot) -> None:
    clock = Clock()
    ids = itertools.count()
    m = AlertManager(id_factory=lambda: f"a{next(ids)}")
    bridge = AlertsBridge(m)
    tray = FleetTray(bridge, use_system_tray=False, clock=clock)
    m.update(1.0, {(h, 0): 1.0 for h in "abc"}, [xid(h, 13, "warning", 1.0) for h in "abc"])  # a shown; b, c held
    clock.t = 11.0
    tray.flush_pending()  # b and c only inside the summary
    clock.t = 30.0
    m.update(30.0, {(h, 0): 30.0 for h in "abc"}, [xid("c", 79, "critical", 30.0)])
    assert [s[0].split(":")[0] for s in tray.shown] == ["WARNING", "Aether", "CRITICAL"]
    assert "on c GPU 0" in tray.shown[-1][0]
    bridge.detach()


def test_late_finds_and_replays_that_are_over_are_listed_not_notified(qtbot: QtBot) -> None:
    m = AlertManager()
    bridge = AlertsBridge(m)
    panel = AlertsPanel(bridge)
    qtbot.addWidget(panel)
    tray = FleetTray(bridge, use_system_tray=False, clock=Clock())
    # One tick replays an XID and the 400 s of health after it: raised and cleared at once.
    m.update(T0 + 400.5, {("n1", 0): [T0 + i for i in range(400)]}, [xid("n1", 79, "critical", T0)])
    assert tray.shown == [] and panel.table.rowCount() == 0  # the "open" filter: it is cleared
    panel.state_filter.setCurrentText("all")
    assert panel.table.rowCount() == 1
    # A fresh one is notified, with its first sample's time.
    m.update(T0 + 500.5, {("n2", 0): T0 + 500}, [xid("n2", 79, "critical", T0 + 500)])
    assert len(tray.shown) == 1 and "first sample" in tray.shown[0][1]
    bridge.detach()
