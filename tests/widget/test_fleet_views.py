"""Main window over a real FleetState with fake command/history services (pytest-qt, offscreen)."""

from __future__ import annotations

import asyncio
import csv
import math
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from PySide6.QtCore import QPointF, Qt
from PySide6.QtWidgets import QLabel

from aether_desktop.services.fleet import FleetState
from aether_desktop.widgets.fleet_table import COL_HOST, COL_STATE, COL_TEMP
from aether_desktop.widgets.gpu_plots import CUSTOM, LIVE
from aether_desktop.widgets.heatmap import row_ticks
from aether_desktop.widgets.main_window import MainWindow, group_by_host, write_history_csv
from aether_desktop.widgets.state import HistoryData, QtState
from aether_protocol.messages import GpuSample, Telemetry

T0 = 1_764_262_800.0
Key = tuple[str, int]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeCommands:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[int] | None]] = []

    async def send(self, host: str, op: str, gpus: list[int] | None = None, **fields: object) -> tuple[bool, str]:
        self.calls.append((host, op, gpus))
        if host == "node-c":
            return False, f"host {host} offline (no responders)"
        return True, "ok"


class FakeHistory:
    def __init__(self) -> None:
        self.calls: list[tuple[list[Key], float, float, list[str], int]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def fetch(self, keys: Sequence[Key], start: float, end: float, metrics: Sequence[str],
                    max_points: int = 2000) -> HistoryData:
        self.calls.append((list(keys), start, end, list(metrics), max_points))
        marker = float(len(self.calls))
        gate = self.gate
        if gate is not None:
            await gate.wait()
        if self.fail is not None:
            raise self.fail
        ts = np.linspace(start, end, 50)
        return {k: {m: (ts, np.full(50, marker)) for m in metrics} for k in keys}


def telemetry(host: str, seq: int, ts: float, temps: list[float], states: list[str] | None = None) -> Telemetry:
    gpus = []
    for i, t in enumerate(temps):
        st = (states or ["ok"] * len(temps))[i]
        if st == "ok":
            gpus.append(GpuSample(index=i, uuid=f"GPU-{host}-{i}", name="NVIDIA A100-SXM4-80GB", state="ok",
                                  temp_c=t, mem_used_mib=1024.0 * (i + 1), mem_total_mib=81920.0,
                                  util_pct=10.0 * i, power_w=100.0 + i, power_limit_w=400.0))
        else:
            gpus.append(GpuSample(index=i, uuid=f"GPU-{host}-{i}", name="NVIDIA A100-SXM4-80GB", state=st))  # type: ignore[arg-type]
    return Telemetry(v=1, host=host, boot="b", seq=seq, ts=ts, state="active", gpus=gpus, interval_s=1.0)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 30)


@pytest.fixture
def fleet() -> FleetState:
    f = FleetState(history_s=600)
    for s in range(31):
        ts = T0 + s
        f.ingest(telemetry("node-a", s, ts, [40.0 + s * 0.1, 50.0, 60.0, 70.0]), ts)
        f.ingest(telemetry("node-b", s, ts, [45.0, 88.0, 30.0, 35.0], ["ok", "ok", "sleeping", "lost"]), ts)
        if s < 20:  # node-c stopped reporting 10 s ago: offline
            f.ingest(telemetry("node-c", s, ts, [55.0, 56.0, 57.0, 58.0]), ts)
    return f


@pytest.fixture
def state(fleet: FleetState, clock: Clock) -> Iterator[QtState]:
    st = QtState(fleet, clock=clock, start=False)
    yield st
    st.stop()


@pytest.fixture
def commands() -> FakeCommands:
    return FakeCommands()


@pytest.fixture
def history() -> FakeHistory:
    return FakeHistory()


@pytest.fixture
def window(qtbot, state: QtState, commands: FakeCommands, history: FakeHistory) -> MainWindow:  # type: ignore[no-untyped-def]
    w = MainWindow(state, commands, history)
    qtbot.addWidget(w)
    w.resize(1400, 900)
    w.show()
    state.tick_now()
    return w


def column(w: MainWindow, col: int) -> list[str]:
    m = w.table.model
    return [m.data(m.index(r, col)) for r in range(m.rowCount())]


def test_table_rows_sort_and_filter(window: MainWindow) -> None:
    m = window.table.model
    assert m.rowCount() == 12
    assert column(window, COL_HOST)[:4] == ["node-a"] * 4
    window.table.view.sortByColumn(COL_TEMP, Qt.SortOrder.DescendingOrder)
    temps = column(window, COL_TEMP)
    assert temps[0] == "88" and temps[-1] == "—"  # missing values sort last
    window.table.filter_edit.setText("node-b")
    assert m.rowCount() == 4
    window.table.filter_edit.setText("sleeping")
    assert column(window, COL_STATE) == ["● sleeping"]
    window.table.filter_edit.setText("")
    assert m.rowCount() == 12


def test_offline_host_shown_offline_and_counted(window: MainWindow, state: QtState, clock: Clock) -> None:
    window.table.filter_edit.setText("node-c")
    assert set(column(window, COL_STATE)) == {"● offline"}
    assert "2 online, 1 offline" in window.status.hosts_label.text()
    window.table.filter_edit.setText("lost")
    assert column(window, COL_HOST) == ["node-b"]
    # Everyone goes quiet: liveness is time-driven, poll() makes the tick fire.
    clock.t += 10
    assert state.tick_now()
    window.table.filter_edit.setText("offline")
    assert window.table.model.rowCount() == 12


def test_selection_keeps_gpu_through_resort(window: MainWindow, fleet: FleetState, clock: Clock,
                                            state: QtState) -> None:
    window.table.view.sortByColumn(COL_TEMP, Qt.SortOrder.DescendingOrder)
    window.table.select_keys([("node-a", 0)])
    row_before = window.table.model.view_row_of(("node-a", 0))
    fleet.ingest(telemetry("node-a", 31, T0 + 31, [99.0, 50.0, 60.0, 70.0]), T0 + 31)
    clock.t = T0 + 31.5
    state.tick_now()
    window.table.refresh(force_resort=True)
    assert window.table.model.view_row_of(("node-a", 0)) == 0 != row_before
    assert window.table.selected_keys() == [("node-a", 0)]


def test_selection_drives_live_plots(window: MainWindow) -> None:
    keys = [("node-a", 0), ("node-b", 1)]
    window.table.select_keys(keys)
    assert window.selected_keys == keys
    assert window.plots.keys == keys and window.plots.is_live
    x, y = window.plots._curves[0][0].getData()
    assert y is not None and len(y) == 300
    assert np.nanmax(y) == pytest.approx(43.0, abs=0.01) and x[-1] == T0 + 30
    assert "node-b/1" in window.plots.legend.text()
    assert window.sleep_gpus_action.isEnabled()


def test_heatmap_shape_metric_hover_and_click(window: MainWindow, qtbot) -> None:  # type: ignore[no-untyped-def]
    hm = window.heatmap
    hm.refresh()
    assert hm.image.shape == (12, 600)
    assert hm.row_keys[0] == ("node-a", 0)
    assert hm.image[0, -1] == pytest.approx(43.0)
    assert np.isnan(hm.image[0, 0])  # before the first sample
    hm.set_metric("mem_pct")
    assert hm.image[1, -1] == pytest.approx(2.5)
    vb = hm.plot.getPlotItem().getViewBox()
    hm._on_mouse_moved(vb.mapViewToScene(QPointF(-0.5, 1.5)))
    assert "node-a / GPU 1" in hm.readout.text() and "2.5 %" in hm.readout.text()
    with qtbot.waitSignal(hm.gpu_clicked) as blocker:
        hm.gpu_clicked.emit(("node-b", 1))
    assert blocker.args == [("node-b", 1)]
    assert window.selected_keys == [("node-b", 1)]


def test_row_labels_fit_the_pixels() -> None:
    keys = [(f"h{h}", g) for h in range(4) for g in range(8)]  # 32 rows

    def spaced(ticks: list[tuple[float, str]], lo: float, hi: float, px: float) -> bool:
        gap = 14 * 1.15 * (hi - lo) / px  # rows per label height
        return all(b[0] - a[0] >= gap - 1e-9 for a, b in zip(ticks, ticks[1:], strict=False))

    # Room for every row: "host/gpu" at each row's centre.
    assert row_ticks(keys, 0, 32, 32 * 20, 14)[:2] == [(0.5, "h0/0"), (1.5, "h0/1")]
    # 210 px, 14 px lines: 32 rows do not fit -> host names, centred on their rows.
    assert row_ticks(keys, 0, 32, 210, 14) == [(4.0, "h0"), (12.0, "h1"), (20.0, "h2"), (28.0, "h3")]
    assert row_ticks(keys, 4, 20, 60, 14) == [(6.0, "h0"), (12.0, "h1"), (18.0, "h2")]  # clipped to the view
    # Too many hosts even for that: thinned, never closer than a label's height.
    many = [(f"n{h:03d}", g) for h in range(500) for g in range(8)]
    ticks = row_ticks(many, 0, 4000, 300, 14)
    assert ticks[0] == (4.0, "n000") and 10 <= len(ticks) <= 20 and spaced(ticks, 0, 4000, 300)
    # Zoomed out past the rows: labels still do not touch.
    assert row_ticks(keys, -200, 32, 600, 14) == [(4.0, "h0"), (12.0, "h1"), (20.0, "h2"), (28.0, "h3")]
    # One big host and many small ones: the small ones thin out.
    mixed = [("big", g) for g in range(100)] + [(f"s{h:02d}", 0) for h in range(19)]
    ticks = row_ticks(mixed, 0, 119, 600, 14)
    assert ticks[0] == (50.0, "big") and spaced(ticks, 0, 119, 600) and len(ticks) < 20
    # Zoomed in on rows 8-12 of the 32: those rows, fully labelled; the first is mid-range.
    assert row_ticks(keys, 8.2, 12, 210, 14) == [(8.5, "h1/0"), (9.5, "h1/1"), (10.5, "h1/2"), (11.5, "h1/3")]
    assert row_ticks([], 0, 1, 200, 14) == [] and row_ticks(keys, 0, 32, 0, 14) == []


def test_heatmap_labels_follow_its_height(window: MainWindow, qtbot) -> None:  # type: ignore[no-untyped-def]
    hm = window.heatmap
    hm.refresh()
    assert [t for _, t in hm.row_labels][:2] == ["node-a/0", "node-a/1"]  # 12 rows fit
    hm.plot.setFixedHeight(120)  # a small heatmap: host names only
    qtbot.waitUntil(lambda: [t for _, t in hm.row_labels] == ["node-a", "node-b", "node-c"], timeout=3000)
    hm.plot.setMinimumHeight(0)
    hm.plot.setMaximumHeight(16777215)


def test_feature_buttons_stay_left_of_the_toolbar_message(window: MainWindow) -> None:
    from PySide6.QtGui import QAction

    act = QAction("Submit job…", window)
    window.add_toolbar_action(act)
    actions = window.toolbar.actions()
    label_at = next(i for i, a in enumerate(actions) if window.toolbar.widgetForAction(a) is window.message_label)
    assert actions.index(act) < label_at and label_at == len(actions) - 1
    assert actions[actions.index(act) - 1].isSeparator()


def test_sleep_action_calls_client_and_reports(window: MainWindow, commands: FakeCommands,
                                               qloop: asyncio.AbstractEventLoop) -> None:
    window.table.select_keys([("node-a", 1), ("node-a", 0), ("node-c", 2)])
    window.sleep_gpus_action.trigger()
    qloop.run_until_complete(asyncio.gather(*window.pending_tasks))
    assert sorted(commands.calls) == [("node-a", "sleep", [0, 1]), ("node-c", "sleep", [2])]
    notice = window.status.notice_label.text()
    assert "offline (no responders)" in notice or "ok" in notice
    texts = [window.status.notice_label.text(), window.message_label.text()]
    assert any("node-" in t for t in texts)
    commands.calls.clear()
    window.table.select_keys([("node-c", 0)])
    window.wake_hosts_action.trigger()
    qloop.run_until_complete(asyncio.gather(*window.pending_tasks))
    assert commands.calls == [("node-c", "wake", None)]
    assert "node-c offline (no responders)" in window.status.notice_label.toolTip()


def test_history_range_fetches_and_draws(window: MainWindow, history: FakeHistory, clock: Clock,
                                         qloop: asyncio.AbstractEventLoop) -> None:
    window.table.select_keys([("node-a", 0)])
    window.plots.set_range(1)  # last hour
    assert window.plots.loading and "loading" in window.plots.status_label.text()
    qloop.run_until_complete(asyncio.gather(*window.plots.pending))
    keys, start, end, metrics, max_points = history.calls[0]
    assert keys == [("node-a", 0)] and end - start == pytest.approx(3600) and end == clock.t
    assert set(metrics) == {"temp_c", "mem_used_mib", "util_pct", "power_w"} and max_points == 2000
    _x, y = window.plots._curves[0][0].getData()
    assert y is not None and len(y) == 50 and y[0] == 1.0
    assert not window.plots.loading
    window.plots.set_custom_range(T0 - 7200, T0 - 3600)
    qloop.run_until_complete(asyncio.gather(*window.plots.pending))
    assert history.calls[-1][1:3] == (T0 - 7200, T0 - 3600)
    window.plots.set_range(LIVE)  # live reads FleetState: no fetch
    assert len(history.calls) == 2 and window.plots.is_live
    _x, y = window.plots._curves[0][0].getData()
    assert y is not None and len(y) == 300


def test_custom_range_starts_from_the_range_on_screen(window: MainWindow, history: FakeHistory, clock: Clock,
                                                     qloop: asyncio.AbstractEventLoop) -> None:
    window.table.select_keys([("node-a", 0)])
    window.plots.set_range(1)  # last hour
    qloop.run_until_complete(asyncio.gather(*window.plots.pending))
    loaded_at = clock.t
    clock.t += 3 * 3600  # hours later, the operator picks "Custom…"
    # An export meanwhile takes what is shown, not the hour before the click.
    assert window.plots.shown_range == (loaded_at - 3600, loaded_at)
    window.plots.set_range(CUSTOM)
    qloop.run_until_complete(asyncio.gather(*window.plots.pending))
    start, end = history.calls[-1][1:3]
    # The last hour as of now, to the minute the edits show; the end rounded up so the newest samples are in.
    assert start == math.floor((clock.t - 3600) / 60) * 60 and end == math.ceil(clock.t / 60) * 60
    assert start % 60 == 0 and clock.t <= end < clock.t + 60
    # The axis spans the range asked for, not only the minutes that hold data.
    assert window.plots.plots[0].getViewBox().viewRange()[0] == pytest.approx([start, end])
    window.plots.set_range(LIVE)
    window.plots.set_custom_range(T0 - 7200, T0 - 3600)  # e.g. from an alert: its own range is kept
    qloop.run_until_complete(asyncio.gather(*window.plots.pending))
    assert history.calls[-1][1:3] == (T0 - 7200, T0 - 3600)


def test_history_stale_result_ignored_and_errors_shown(window: MainWindow, history: FakeHistory,
                                                       qloop: asyncio.AbstractEventLoop) -> None:
    window.table.select_keys([("node-a", 0)])
    history.gate = asyncio.Event()
    window.plots.set_range(1)
    window.plots.set_range(2)  # changed before the first answer came back
    history.gate.set()
    qloop.run_until_complete(asyncio.gather(*window.plots.pending))
    _x, y = window.plots._curves[0][0].getData()
    assert y is not None and y[0] == 2.0  # second request's marker, not the first's
    history.gate = None
    history.fail = ConnectionError("database unavailable")
    window.plots.set_range(3)
    qloop.run_until_complete(asyncio.gather(*window.plots.pending, return_exceptions=True))
    assert "database unavailable" in window.plots.status_label.text()
    assert not window.plots.loading
    # Nothing of the earlier range is left under the crosshair (or in an export).
    assert window.plots.current_data() == {} and "no data" in window.plots._readout_text(0, T0)
    # A history bucket (its min and max at one time) reads as a range; an outage (NaN) reads nothing.
    window.plots._data = {("node-a", 0): {"temp_c": (np.array([T0, T0, T0 + 10, T0 + 20]),
                                                     np.array([41.0, 95.0, np.nan, 50.0]))}}
    assert "node-a/0 41.0–95.0" in window.plots._readout_text(0, T0 + 2)
    assert "no data" in window.plots._readout_text(0, T0 + 9)
    assert "node-a/0 50.0" in window.plots._readout_text(0, T0 + 19)


def test_without_history_non_live_ranges_disabled(qtbot, state: QtState, commands: FakeCommands) -> None:  # type: ignore[no-untyped-def]
    w = MainWindow(state, commands, None)
    qtbot.addWidget(w)
    model = w.plots.range_combo.model()
    assert model.item(LIVE).isEnabled()  # type: ignore[attr-defined]
    assert not model.item(1).isEnabled() and not model.item(CUSTOM).isEnabled()  # type: ignore[attr-defined]
    assert "database" in w.plots.range_combo.toolTip()


def test_status_bar_connection_db_and_rejects(window: MainWindow, state: QtState, fleet: FleetState) -> None:
    state.set_connection("reconnecting", "nats://x:4222")
    assert "NATS reconnecting" in window.status.nats_label.text()
    state.set_db_status(False, 5, "refused")
    assert "database unavailable, 5 samples waiting" in window.status.db_label.text()
    # Samples in flight are normal: no warning for a batch on its way, only for a backlog.
    state.set_db_status(True, 40, "")
    assert window.status.db_label.text().endswith("database ok") and "40 samples" in window.status.db_label.toolTip()
    state.set_db_status(True, 250_000, "")
    assert "catching up: 250,000 samples waiting" in window.status.db_label.text()
    fleet.note_rejected("invalid_json", 7)
    state.tick_now()
    assert "7 rejected" in window.status.rejected_label.text()
    assert "msg/s" in window.status.rate_label.text()


def test_demo_prompt_when_no_agents(qtbot, commands: FakeCommands, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    empty = QtState(FleetState(), clock=clock, start=False)
    w = MainWindow(empty, commands, None, demo_prompt_delay_s=0.05)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: w.demo_prompt.isVisible(), timeout=5000)
    with qtbot.waitSignal(w.start_demo_requested):
        w.demo_prompt.start_button.click()
    empty.set_demo_active(True)
    assert not w.demo_prompt.isVisible()
    empty.stop()


def test_export_csv_and_tab_hooks(window: MainWindow, tmp_path) -> None:  # type: ignore[no-untyped-def]
    window.table.select_keys([("node-a", 0)])
    path = tmp_path / "out.csv"
    window._on_export_path(str(path))
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["host", "gpu", "metric", "ts", "time_utc", "value"]
    assert len(rows) == 1 + 4 * 31  # 31 seconds of data for 4 metrics, NaN gaps left out
    assert "Exported" in window.status.notice_label.text()
    idx = window.add_tab(QLabel("alerts"), "Alerts")
    assert window.tabs.tabText(idx) == "Alerts"
    dock = window.add_dock(QLabel("jobs"), "Jobs")
    assert dock.toggleViewAction() in window.view_menu.actions()
    assert group_by_host([("b", 2), ("a", 1), ("b", 0)]) == {"b": [0, 2], "a": [1]}
    assert write_history_csv(tmp_path / "empty.csv", {}) == 0


def test_table_with_4096_gpus(qtbot, commands: FakeCommands, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    f = FleetState(capacity=64)
    for h in range(512):
        f.ingest(telemetry(f"n{h:03d}", 0, clock.t, [float(h % 90)] * 8), clock.t)
    st = QtState(f, clock=clock, start=False)
    w = MainWindow(st, commands, None)
    qtbot.addWidget(w)
    w.show()
    st.tick_now()
    assert w.table.model.rowCount() == 4096
    w.table.view.sortByColumn(COL_TEMP, Qt.SortOrder.DescendingOrder)
    assert column(w, COL_TEMP)[0] == "89"
    w.heatmap.refresh()
    assert w.heatmap.image.shape == (4096, 600)
    st.stop()
