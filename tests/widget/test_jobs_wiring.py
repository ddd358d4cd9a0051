"""The Jobs tab as wired by wire_gui: the placement model's line follows the JobsRuntime."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pytestqt.qtbot import QtBot

from aether_desktop.config import StationConfig
from aether_desktop.gui import CommandProxy, HistoryProxy
from aether_desktop.station import Station
from aether_desktop.widgets.main_window import MainWindow
from aether_desktop.widgets.state import QtState
from aether_desktop.wiring import wire_gui, wire_services


class _Model:
    meta = {"version": 7, "created": "2026-11-27T10:00:00Z", "training_rows": 80, "validation_rows": 20,
            "fleet_rows": 0, "validation": {"auc": 0.9, "accuracy": 0.8, "slowdown_mae": 0.1}}  # fmt: skip


def test_jobs_tab_shows_the_runtimes_model_and_its_progress(
    qtbot: QtBot, qloop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    station = Station(StationConfig(data_dir=tmp_path, no_db=True), sink=None)  # type: ignore[arg-type]
    state = QtState(station.fleet, start=False)
    station.sink = state
    window = MainWindow(state, CommandProxy(station), HistoryProxy(station))
    qtbot.addWidget(window)
    services = wire_services(station)
    wire_gui(station, state, window, None, asyncio.Event(), services)
    view = window.jobs_view
    assert "not loaded yet" in view.model_label.text() and not view.retrain_button.isEnabled()
    jobs = services["jobs"]
    jobs._on_model(_Model())  # what JobsRuntime.open does once the model is loaded
    assert "Placement model v7" in view.model_label.text() and view.retrain_button.isEnabled()
    jobs._on_progress("info", "retraining the placement model on 5 fleet rows…")
    assert "5 fleet rows" in view.model_label.text() and not view.retrain_button.isEnabled()
    jobs._on_progress("error", "automatic placement model retrain failed: disk full")
    assert "disk full" in view.model_label.text() and view.retrain_button.isEnabled()
    # Without a database the button explains instead of failing silently.
    got: list[tuple[bool, str]] = []
    view._model.retrain_model(lambda ok, text: got.append((ok, text)))  # type: ignore[union-attr]
    qloop.run_until_complete(asyncio.sleep(0.1))
    assert got and not got[0][0] and "history is off" in got[0][1]
    if window.tray.uses_system_tray:
        window.tray.hide()
    window.close()
    state.stop()
