"""The composed window: every feature tab and menu is wired, and the fault dialog validates its spec."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pytestqt.qtbot import QtBot

from aether_desktop.config import StationConfig
from aether_desktop.gui import CommandProxy, HistoryProxy
from aether_desktop.station import Station
from aether_desktop.widgets.fault_dialog import FaultDialog
from aether_desktop.widgets.main_window import MainWindow
from aether_desktop.widgets.state import QtState
from aether_desktop.wiring import wire_gui, wire_services


def test_window_has_fleet_alerts_jobs_and_demo_menu(qtbot: QtBot, qloop: asyncio.AbstractEventLoop,
                                                    tmp_path: Path) -> None:
    station = Station(StationConfig(data_dir=tmp_path, no_db=True), sink=None)  # type: ignore[arg-type]
    state = QtState(station.fleet, start=False)
    station.sink = state
    window = MainWindow(state, CommandProxy(station), HistoryProxy(station))
    qtbot.addWidget(window)
    services = wire_services(station)
    wire_gui(station, state, window, None, asyncio.Event(), services)
    tabs = [window.tabs.tabText(i) for i in range(window.tabs.count())]
    assert tabs == ["Fleet", "Alerts", "Jobs"]
    menus = [a.text().replace("&", "") for a in window.menuBar().actions()]
    assert {"Jobs", "Demo"} <= set(menus)
    # Without a database the jobs service says why instead of failing silently.
    ok, text = qloop.run_until_complete(CommandProxy(station).send("h", "ping"))
    assert not ok and "not connected" in text
    window.tray.hide() if window.tray.uses_system_tray else None
    window.close()
    state.stop()


def test_status_bar_tells_a_failed_server_from_a_clean_stop(qtbot: QtBot, tmp_path: Path) -> None:
    from aether_desktop.widgets.status_bar import FleetStatusBar

    state = QtState(Station(StationConfig(data_dir=tmp_path, no_db=True), sink=None).fleet,  # type: ignore[arg-type]
                    start=False)
    bar = FleetStatusBar(state)
    qtbot.addWidget(bar)
    state.set_connection("closed", "could not start the embedded NATS server: address already in use")
    assert "NATS unavailable" in bar.nats_label.text() and "address already in use" in bar.nats_label.toolTip()
    state.set_connection("closed", "stopped")
    assert "NATS closed" in bar.nats_label.text()
    state.set_db_status(False, 1234, "database unavailable, 1,234 samples waiting (connection refused)")
    assert "database unavailable, 1,234 samples waiting" in bar.db_label.text()
    bar._timer.stop()


def test_fault_dialog_builds_a_valid_spec(qtbot: QtBot) -> None:
    dialog = FaultDialog(["demo-01", "demo-02"], "demo-02", 3)
    qtbot.addWidget(dialog)
    got: list[tuple[str, str]] = []
    dialog.inject.connect(lambda h, s: got.append((h, s)))
    dialog.kind_combo.setCurrentText("xid_storm")
    dialog.params_edit.setText("code=48")
    assert dialog.spec() == "xid_storm:gpu=3,code=48"
    ok = dialog.buttons.buttons()[0]
    dialog.params_edit.setText("colour=blue")
    assert dialog.error_label.text() and not dialog.buttons.button(dialog.buttons.StandardButton.Ok).isEnabled()
    dialog.params_edit.setText("")
    assert dialog.buttons.button(dialog.buttons.StandardButton.Ok).isEnabled()
    dialog._on_accept()
    assert got == [("demo-02", "xid_storm:gpu=3")]
    assert ok is not None
