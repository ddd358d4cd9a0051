"""Main window: fleet table, heatmap and plots; sleep/wake commands; CSV export; hooks for more tabs.

Commands run as tasks on the qasync loop and report through QtState.post_notice,
so the interface never waits on an agent. No dialog here is exec()'d: every one
is opened with open()/show() and answers through signals.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QStandardPaths, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from aether_desktop.widgets import theme
from aether_desktop.widgets.demo_prompt import DemoPrompt
from aether_desktop.widgets.fleet_table import FleetTable
from aether_desktop.widgets.gpu_plots import GpuPlots
from aether_desktop.widgets.heatmap import HEATMAP_METRICS, FleetHeatmap
from aether_desktop.widgets.state import CommandClient, HistoryData, HistorySource, Key, QtState, TaskSet
from aether_desktop.widgets.status_bar import FleetStatusBar

__all__ = ["CommandClient", "HistorySource", "MainWindow", "group_by_host", "write_history_csv"]

log = logging.getLogger(__name__)
MESSAGE_SHOW_MS = 6000


def group_by_host(keys: Sequence[Key]) -> dict[str, list[int]]:
    """{host: sorted GPU indices} — one command per host."""
    out: dict[str, list[int]] = {}
    for host, idx in keys:
        out.setdefault(host, []).append(idx)
    return {h: sorted(set(v)) for h, v in out.items()}


def write_history_csv(path: str | Path, data: HistoryData) -> int:
    """Tidy CSV (one row per GPU, metric and time); NaN gaps are left out. Returns rows written."""
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["host", "gpu", "metric", "ts", "time_utc", "value"])
        for (host, gpu), metrics in sorted(data.items()):
            for metric, (ts, vs) in metrics.items():
                ts_a = np.asarray(ts, dtype=np.float64)
                vs_a = np.asarray(vs, dtype=np.float64)
                keep = np.isfinite(vs_a)
                for t, v in zip(ts_a[keep].tolist(), vs_a[keep].tolist(), strict=True):
                    stamp = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                    w.writerow([host, gpu, metric, f"{t:.3f}", stamp, f"{v:.6g}"])
                    rows += 1
    return rows


class MainWindow(QMainWindow):
    """The station's window. Other features plug in through ``add_tab`` and ``add_dock``."""

    start_demo_requested = Signal()

    def __init__(
        self,
        state: QtState,
        commands: CommandClient,
        history: HistorySource | None = None,
        parent: QWidget | None = None,
        demo_prompt_delay_s: float = 5.0,
    ) -> None:
        super().__init__(parent)
        self._state = state
        self._commands = commands
        self._history = history
        self._tasks = TaskSet()
        self._selected: list[Key] = []
        self.setWindowTitle("Aether — GPU fleet")
        self.resize(1500, 900)

        self.table = FleetTable(state)
        self.heatmap = FleetHeatmap(state)
        self.plots = GpuPlots(state, history)
        self.demo_prompt = DemoPrompt(state, delay_s=demo_prompt_delay_s)
        self.status = FleetStatusBar(state)
        self.setStatusBar(self.status)
        self.message_label = QLabel("")
        self._message_timer = QTimer(self)
        self._message_timer.setSingleShot(True)
        self._message_timer.setInterval(MESSAGE_SHOW_MS)

        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.heatmap)
        right.addWidget(self.plots)
        right.setStretchFactor(0, 2)
        right.setStretchFactor(1, 3)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.table)
        self.splitter.addWidget(right)
        self.splitter.setStretchFactor(0, 2)
        self.splitter.setStretchFactor(1, 3)
        self.splitter.setSizes([690, 810])
        right.setSizes([330, 500])
        fleet_page = QWidget()
        page_layout = QVBoxLayout(fleet_page)
        page_layout.setContentsMargins(6, 6, 6, 0)
        page_layout.addWidget(self.demo_prompt)
        page_layout.addWidget(self.splitter, 1)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(fleet_page, "Fleet")
        self.setCentralWidget(self.tabs)

        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self.table.set_context_actions(
            [self.sleep_gpus_action, self.wake_gpus_action, self.sleep_hosts_action, self.wake_hosts_action]
        )
        self._update_actions()

        self.table.selection_changed.connect(self._on_selection_changed)
        self.heatmap.gpu_clicked.connect(self._on_heatmap_clicked)
        self.demo_prompt.start_demo_requested.connect(self.start_demo_requested)
        self._message_timer.timeout.connect(self._on_message_timeout)
        state.notice.connect(self._on_notice)
        state.fleet_tick.connect(self._on_first_data)
        self._auto_selected = False
        documents = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation)
        self._export_dir = Path(documents) if documents and Path(documents).is_dir() else Path.home()
        # Set by the composition root when a system tray exists and the user wants it.
        self.close_to_tray = False

    # ------------------------------------------------------------------ hooks for other features

    def add_tab(self, widget: QWidget, title: str) -> int:
        """Add a top-level tab (Alerts, Jobs...) next to Fleet; returns its index."""
        return self.tabs.addTab(widget, title)

    def add_dock(
        self,
        widget: QWidget,
        title: str,
        area: Qt.DockWidgetArea = Qt.DockWidgetArea.RightDockWidgetArea,
    ) -> QDockWidget:
        """Add a dock; its toggle goes into the View menu."""
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{title}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        self.view_menu.addAction(dock.toggleViewAction())
        return dock

    # ------------------------------------------------------------------ public

    @property
    def selected_keys(self) -> list[Key]:
        return list(self._selected)

    @property
    def pending_tasks(self) -> list[object]:
        return list(self._tasks.pending)

    def send_command(self, op: str, keys: Sequence[Key], whole_host: bool = False) -> int:
        """Send ``op`` for these GPUs (or their whole hosts), one request per host; returns requests sent."""
        groups = group_by_host(keys)
        if not groups:
            self._state.post_notice("warning", "Select one or more GPUs first.")
            return 0
        for host, gpus in groups.items():
            self._tasks.spawn(self._run_command(host, op, None if whole_host else gpus))
        what = "host" if whole_host else "GPU"
        self._show_message(f"{op}: sending to {len(groups)} {what}{'s' if len(groups) > 1 else ''}…")
        return len(groups)

    # ------------------------------------------------------------------ building

    def _build_actions(self) -> None:
        self.export_action = QAction("&Export CSV…", self)
        self.export_action.setShortcut(QKeySequence("Ctrl+E"))
        self.export_action.setStatusTip("Save what the plots show (selected GPUs, selected range) as CSV")
        self.quit_action = QAction("&Quit", self)
        self.quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        self.sleep_gpus_action = QAction("Sleep selected GPU(s)", self)
        self.wake_gpus_action = QAction("Wake selected GPU(s)", self)
        self.sleep_hosts_action = QAction("Sleep host(s) of selection", self)
        self.wake_hosts_action = QAction("Wake host(s) of selection", self)
        self.filter_action = QAction("Filter GPUs", self)
        self.filter_action.setShortcut(QKeySequence.StandardKey.Find)
        self.about_action = QAction("&About Aether", self)

        self.export_action.triggered.connect(self._on_export_triggered)
        self.quit_action.triggered.connect(self.close)
        self.sleep_gpus_action.triggered.connect(self._on_sleep_gpus)
        self.wake_gpus_action.triggered.connect(self._on_wake_gpus)
        self.sleep_hosts_action.triggered.connect(self._on_sleep_hosts)
        self.wake_hosts_action.triggered.connect(self._on_wake_hosts)
        self.filter_action.triggered.connect(self._on_filter_triggered)
        self.about_action.triggered.connect(self._on_about_triggered)

    def _build_menus(self) -> None:
        mb = self.menuBar()
        file_menu = mb.addMenu("&File")
        file_menu.addAction(self.export_action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)

        self.view_menu = mb.addMenu("&View")
        self.view_menu.addAction(self.filter_action)
        for title, widget in (("Heatmap", self.heatmap), ("GPU plots", self.plots)):
            act = QAction(title, self, checkable=True, checked=True)
            act.toggled.connect(widget.setVisible)
            self.view_menu.addAction(act)
        metric_menu = self.view_menu.addMenu("Heatmap metric")
        for label, metric, unit, _ in HEATMAP_METRICS:
            act = metric_menu.addAction(f"{label} ({unit})")
            act.triggered.connect(lambda _=False, m=metric: self.heatmap.set_metric(m))
        self.view_menu.addSeparator()

        fleet_menu = mb.addMenu("F&leet")
        for act in (self.sleep_gpus_action, self.wake_gpus_action):
            fleet_menu.addAction(act)
        fleet_menu.addSeparator()
        for act in (self.sleep_hosts_action, self.wake_hosts_action):
            fleet_menu.addAction(act)

        help_menu = mb.addMenu("&Help")
        help_menu.addAction(self.about_action)

    def _build_toolbar(self) -> None:
        tb = self.addToolBar("Fleet")
        self.toolbar = tb  # other features (jobs) add their actions here
        tb.setObjectName("fleet_toolbar")
        tb.setMovable(False)
        self.sleep_gpus_action.setIconText("Sleep")
        self.wake_gpus_action.setIconText("Wake")
        self.sleep_hosts_action.setIconText("Sleep host")
        self.wake_hosts_action.setIconText("Wake host")
        for act in (self.sleep_gpus_action, self.wake_gpus_action):
            tb.addAction(act)
        tb.addSeparator()
        for act in (self.sleep_hosts_action, self.wake_hosts_action):
            tb.addAction(act)
        self._toolbar_end = tb.addSeparator()
        self.message_label.setContentsMargins(8, 0, 8, 0)
        tb.addWidget(self.message_label)

    def add_toolbar_action(self, action: QAction) -> None:
        """A feature's toolbar button: after the fleet's, before the message
        (which would otherwise push it sideways whenever a message shows)."""
        self.toolbar.insertSeparator(self._toolbar_end)
        self.toolbar.insertAction(self._toolbar_end, action)

    def _update_actions(self) -> None:
        has = bool(self._selected)
        for act in (self.sleep_gpus_action, self.wake_gpus_action, self.sleep_hosts_action, self.wake_hosts_action):
            act.setEnabled(has)

    def _show_message(self, text: str, level: str = "info") -> None:
        self.message_label.setStyleSheet(f"color: {theme.NOTICE_COLORS.get(level, theme.TEXT)};")
        self.message_label.setText(text)
        self._message_timer.start()

    # ------------------------------------------------------------------ commands

    async def _run_command(self, host: str, op: str, gpus: list[int] | None) -> None:
        target = f"{host}" + ("" if gpus is None else f" GPU {','.join(map(str, gpus))}")
        try:
            ok, message = await self._commands.send(host, op, gpus=gpus)
        except Exception as exc:  # noqa: BLE001 - a failing client must not take the UI down; the user sees it
            log.exception("command %s to %s failed", op, host)
            ok, message = False, f"{type(exc).__name__}: {exc}"
        level = "ok" if ok else "error"
        text = f"{op} {target}: {message or ('done' if ok else 'failed')}"
        self._state.post_notice(level, text)

    # ------------------------------------------------------------------ events

    def _on_selection_changed(self, keys: list[Key]) -> None:
        self._selected = list(keys)
        self.plots.set_keys(self._selected)
        self._update_actions()

    def focus_gpu(self, host: str, gpu: int, ts: float | None = None) -> None:
        """Show one GPU (from an alert or a notification): select it and plot around ``ts``."""
        self.showNormal()
        self.raise_()
        self.activateWindow()
        self.tabs.setCurrentIndex(0)
        self.table.select_keys([(host, gpu)])
        now = self._state.now()
        if ts is not None and now - ts > 240:
            # Older than the live window: ten minutes either side of the moment it started.
            self.plots.set_custom_range(ts - 600, min(now, ts + 600))

    def _on_first_data(self) -> None:
        # A new user should see curves at once: pick the first GPUs the first time any arrive.
        if self._auto_selected:
            return
        keys = self._state.fleet.keys()
        if not keys:
            return
        self._auto_selected = True
        self._state.fleet_tick.disconnect(self._on_first_data)
        if not self._selected:
            self.table.select_keys(keys[:4])

    def _on_heatmap_clicked(self, key: Key) -> None:
        self.table.select_keys([key])

    def _on_notice(self, level: str, text: str) -> None:
        self._show_message(text, level)

    def _on_message_timeout(self) -> None:
        self.message_label.setText("")

    def _on_sleep_gpus(self) -> None:
        self.send_command("sleep", self._selected)

    def _on_wake_gpus(self) -> None:
        self.send_command("wake", self._selected)

    def _on_sleep_hosts(self) -> None:
        self.send_command("sleep", self._selected, whole_host=True)

    def _on_wake_hosts(self) -> None:
        self.send_command("wake", self._selected, whole_host=True)

    def _on_filter_triggered(self) -> None:
        self.table.filter_edit.setFocus()
        self.table.filter_edit.selectAll()

    def _on_export_triggered(self) -> None:
        if not self.plots.current_data():
            self._state.post_notice("warning", "Nothing to export: select GPUs and a time range first.")
            return
        dlg = QFileDialog(self, "Export CSV", str(self._export_dir / self._export_name()), "CSV files (*.csv)")
        dlg.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)
        dlg.setDefaultSuffix("csv")
        dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dlg.fileSelected.connect(self._on_export_path)
        dlg.open()

    def _export_name(self) -> str:
        """e.g. aether-history-20261128-0032-to-20261128-0133.csv: the range, so exports do not overwrite each other."""
        start, end = self.plots.shown_range
        a, b = (dt.datetime.fromtimestamp(t).strftime("%Y%m%d-%H%M") for t in (start, end))
        return f"aether-history-{a}-to-{b}.csv"

    def _on_export_path(self, path: str) -> None:
        # The next export starts where this one went (not in the working directory,
        # which for a double-clicked app may be / or the bundle).
        self._export_dir = Path(path).parent
        exporter = getattr(self._history, "export_csv", None)
        if exporter is not None and not self.plots.is_live:
            # A history range: every metric at full resolution from the database, not the decimated plot.
            start, end = self.plots.shown_range
            self._tasks.spawn(self._export_from_db(exporter, list(self.plots.keys), start, end, path))
            return
        try:
            n = write_history_csv(path, self.plots.current_data())
        except OSError as exc:
            self._state.post_notice("error", f"Export failed: {exc}")
            return
        self._state.post_notice("ok", f"Exported {n:,} rows to {path}")

    async def _export_from_db(self, exporter: Any, keys: list[Key], start: float, end: float, path: str) -> None:
        self._state.post_notice("info", f"Exporting {len(keys)} GPU(s) from the database…")
        try:
            done = await exporter(keys, start, end, Path(path))
        except Exception as exc:  # database down, disk full: say so, keep running
            self._state.post_notice("error", f"Export failed: {exc}")
            return
        # History.export_csv says what a row is: raw samples, or rollups for a range past raw retention.
        self._state.post_notice("ok", f"Exported {done.rows:,} {done.what} to {path}")

    def _on_about_triggered(self) -> None:
        box = QMessageBox(self)
        box.setWindowTitle("About Aether")
        box.setText("<b>Aether</b><br>Desktop control station for NVIDIA GPU fleets.")
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()

    def focus_gpu_window(self) -> None:
        self.showNormal()
        self.raise_()
        self.activateWindow()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.close_to_tray:
            # The tray keeps the station running (alerts still notify); Quit is in the tray menu.
            event.ignore()
            self.hide()
            return
        # Results arriving after close would touch deleted widgets.
        self._tasks.cancel_all()
        self.plots.shutdown()
        super().closeEvent(event)
