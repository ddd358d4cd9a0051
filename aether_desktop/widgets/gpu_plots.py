"""Per-GPU plots (temperature, memory, utilisation, power) for the selected GPUs, live or from history.

Live draws the last five minutes from FleetState on each fleet tick; the other
ranges ask the HistorySource once per change (off the UI path, on the qasync
loop) and keep what came back until the range or selection changes.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QDateTime, Qt
from PySide6.QtGui import QShowEvent, QStandardItemModel
from PySide6.QtWidgets import (
    QComboBox,
    QDateTimeEdit,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from aether_desktop.widgets import theme
from aether_desktop.widgets.state import HistoryData, HistorySource, Key, QtState, TaskSet

log = logging.getLogger(__name__)

# FleetState/history metric, title, unit, display scale
PLOT_METRICS: tuple[tuple[str, str, str, float], ...] = (
    ("temp_c", "Temperature", "°C", 1.0),
    ("mem_used_mib", "Memory used", "GiB", 1.0 / 1024.0),
    ("util_pct", "Utilisation", "%", 1.0),
    ("power_w", "Power", "W", 1.0),
)
# label, span in seconds (None = custom)
RANGES: tuple[tuple[str, float | None], ...] = (
    ("Live · last 5 min", 300.0),
    ("Last hour", 3600.0),
    ("Last 24 h", 86400.0),
    ("Last 7 days", 7 * 86400.0),
    ("Custom…", None),
)
LIVE, CUSTOM = 0, len(RANGES) - 1
MAX_CURVES = 16
MAX_POINTS = 2000
READOUT_CURVES = 6  # values listed in the crosshair read-out; more would not fit on one line


class GpuPlots(QWidget):
    """Four X-linked plots of the selected GPUs with a time-range selector and a crosshair."""

    def __init__(self, state: QtState, history: HistorySource | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self._fleet = state.fleet
        self._history = history
        self._tasks = TaskSet()
        self._keys: list[Key] = []
        self._data: HistoryData = {}
        self._request = 0
        self._loading = False
        self._dirty = True
        self._live_sig: tuple[object, ...] = ()
        self._range_index = LIVE
        self._custom_given = False  # set_custom_range() is choosing the custom range
        self._shown_range: tuple[float, float] | None = None

        self.range_combo = QComboBox()
        for label, _span in RANGES:
            self.range_combo.addItem(label)
        self.start_edit = QDateTimeEdit()
        self.end_edit = QDateTimeEdit()
        for edit in (self.start_edit, self.end_edit):
            edit.setCalendarPopup(True)
            edit.setDisplayFormat("yyyy-MM-dd HH:mm")
        now = QDateTime.currentDateTime()
        self.start_edit.setDateTime(now.addSecs(-3600))
        self.end_edit.setDateTime(now)
        self._arrow = QLabel("→")
        self.apply_button = QPushButton("Apply")
        self.reload_button = QPushButton("Reload")
        self.reload_button.setToolTip("Fetch the selected range again")
        self.status_label = QLabel("")
        self.legend = QLabel("")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.legend.setWordWrap(True)
        self.readout = QLabel(" ")
        self.readout.setStyleSheet(f"color: {theme.MUTED};")
        if history is None:
            # No database: only the live window exists; say so where the choice is made.
            tip = "History needs the database (not configured)"
            model = self.range_combo.model()
            assert isinstance(model, QStandardItemModel)
            for i in range(1, len(RANGES)):
                item = model.item(i)
                item.setEnabled(False)
                item.setToolTip(tip)
            self.range_combo.setToolTip(tip)

        self.plots: list[pg.PlotWidget] = []
        self._vlines: list[pg.InfiniteLine] = []
        self._curves: list[list[pg.PlotDataItem]] = []
        grid = QGridLayout()
        grid.setSpacing(4)
        for i, (_metric, title, unit, _scale) in enumerate(PLOT_METRICS):
            pw = pg.PlotWidget(background=theme.PLOT_BG, axisItems={"bottom": pg.DateAxisItem()})
            pw.setTitle(f"{title} ({unit})", color=theme.TEXT, size="9pt")
            pw.showGrid(x=True, y=True, alpha=0.15)
            pw.setMinimumHeight(140)
            if self.plots:
                pw.setXLink(self.plots[0])
            vline = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen(theme.MUTED, width=1))
            vline.setVisible(False)
            pw.addItem(vline, ignoreBounds=True)
            self.plots.append(pw)
            self._vlines.append(vline)
            self._curves.append([])
            grid.addWidget(pw, i // 2, i % 2)
            pw.scene().sigMouseMoved.connect(lambda pos, i=i: self._on_mouse_moved(i, pos))

        bar = QHBoxLayout()
        bar.addWidget(QLabel("Range"))
        bar.addWidget(self.range_combo)
        bar.addWidget(self.start_edit)
        bar.addWidget(self._arrow)
        bar.addWidget(self.end_edit)
        bar.addWidget(self.apply_button)
        bar.addWidget(self.reload_button)
        bar.addWidget(self.status_label, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(bar)
        layout.addWidget(self.legend)
        layout.addLayout(grid, 1)
        layout.addWidget(self.readout)
        self._show_custom(False)
        self.reload_button.setVisible(False)
        self._set_status("Select GPUs in the table or heatmap to plot them.")

        self.range_combo.currentIndexChanged.connect(self._on_range_changed)
        self.apply_button.clicked.connect(self._on_apply_clicked)
        self.reload_button.clicked.connect(self._on_apply_clicked)
        state.fleet_tick.connect(self._on_fleet_tick)

    # ------------------------------------------------------------------ public

    @property
    def keys(self) -> list[Key]:
        return list(self._keys)

    def set_keys(self, keys: list[Key]) -> None:
        """Plot these GPUs (the first MAX_CURVES of them)."""
        keys = list(keys)[:MAX_CURVES]
        if keys == self._keys:
            return
        self._keys = keys
        self._live_sig = ()
        self._build_curves()
        self._data = {}
        self._reload()

    @property
    def is_live(self) -> bool:
        return self.range_combo.currentIndex() == LIVE

    @property
    def loading(self) -> bool:
        return self._loading

    @property
    def pending(self) -> list[object]:
        """Unfinished history requests (tests wait on these)."""
        return list(self._tasks.pending)

    def set_range(self, index: int) -> None:
        self.range_combo.setCurrentIndex(index)

    def set_custom_range(self, start: float, end: float) -> None:
        # To the minute the edits show: no hidden seconds in what is queried and exported.
        self._set_custom_edits(math.floor(start / 60) * 60, math.ceil(end / 60) * 60)
        if self.range_combo.currentIndex() == CUSTOM:
            self._reload()
            return
        self._custom_given = True
        try:
            self.range_combo.setCurrentIndex(CUSTOM)
        finally:
            self._custom_given = False

    def time_range(self) -> tuple[float, float]:
        """(start, end) epoch seconds of the selected range."""
        idx = self.range_combo.currentIndex()
        if idx == CUSTOM:
            return float(self.start_edit.dateTime().toSecsSinceEpoch()), float(
                self.end_edit.dateTime().toSecsSinceEpoch()
            )
        return self._span_range(idx)

    def _span_range(self, idx: int) -> tuple[float, float]:
        """(start, end) of a preset range (live, last hour, ...) ending now."""
        now = self._state.now()
        span = RANGES[idx][1]
        assert span is not None
        return now - span, now

    @property
    def shown_range(self) -> tuple[float, float]:
        """(start, end) of what the plots show: a preset range as of when it was
        loaded (an export must not shift it to the moment of the click)."""
        return self.time_range() if self.is_live or self._shown_range is None else self._shown_range

    def current_data(self) -> HistoryData:
        """What the plots show now, unscaled (for CSV export)."""
        return {k: dict(v) for k, v in self._data.items()}

    def refresh(self) -> None:
        """Redraw live data now (fleet ticks do this while visible)."""
        self._dirty = False
        if self.is_live:
            self._draw_live()

    def shutdown(self) -> None:
        """Cancel outstanding history requests (window closing)."""
        self._tasks.cancel_all()

    # ------------------------------------------------------------------ drawing

    def _build_curves(self) -> None:
        for pw, curves in zip(self.plots, self._curves, strict=True):
            for c in curves:
                pw.removeItem(c)
            curves.clear()
            for i, key in enumerate(self._keys):
                c = pg.PlotDataItem(pen=pg.mkPen(theme.curve_color(i), width=1), name=f"{key[0]}/{key[1]}")
                # Peak downsampling keeps spikes visible when 7 days meet 1,000 pixels.
                c.setDownsampling(auto=True, method="peak")
                c.setClipToView(True)
                pw.addItem(c)
                curves.append(c)
        self.legend.setText(
            "  ".join(
                f"<span style='color:{theme.curve_color(i)}'>■</span> {h}/{g}" for i, (h, g) in enumerate(self._keys)
            )
        )

    def _draw_live(self) -> None:
        found = [self._fleet.row_of(k) for k in self._keys]
        rows = [r for r in found if r is not None]
        if not self._keys or len(rows) != len(found):
            return
        now = self._state.now()
        # The plotted window moves in whole seconds and changes only when one of
        # the plotted hosts reports: skip the other frames (most of them at 10 Hz).
        hosts = [self._fleet.host(h) for h in {k[0] for k in self._keys}]
        sig = (math.floor(now), tuple(self._keys), sum(h.messages for h in hosts if h is not None))
        if sig == self._live_sig:
            return
        self._live_sig = sig
        span = int(RANGES[LIVE][1] or 300)
        t = self._fleet.time_axis(now)[-span:]
        data: HistoryData = {k: {} for k in self._keys}
        for metric, _title, _unit, _scale in PLOT_METRICS:
            m = self._fleet.matrix(metric, now, rows)[:, -span:]
            for k, v in zip(self._keys, m, strict=True):
                data[k][metric] = (t, v)
        self._data = data
        self._draw(data)

    def _draw(self, data: HistoryData) -> None:
        for (metric, _t, _u, scale), curves in zip(PLOT_METRICS, self._curves, strict=True):
            for key, curve in zip(self._keys, curves, strict=True):
                ts, vs = data.get(key, {}).get(metric, (None, None))
                if ts is None or vs is None or len(ts) == 0:
                    curve.setData([], [])
                    continue
                y = np.asarray(vs, dtype=np.float64) * scale
                curve.setData(np.asarray(ts, dtype=np.float64), y, connect="finite")

    # ------------------------------------------------------------------ range and history

    def _set_custom_edits(self, start: float, end: float) -> None:
        self.start_edit.setDateTime(QDateTime.fromSecsSinceEpoch(int(start)))
        self.end_edit.setDateTime(QDateTime.fromSecsSinceEpoch(int(end)))

    def _show_custom(self, visible: bool) -> None:
        for w in (self.start_edit, self._arrow, self.end_edit, self.apply_button):
            w.setVisible(visible)

    def _set_status(self, text: str, level: str = "info") -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet(f"color: {theme.NOTICE_COLORS.get(level, theme.TEXT)};")

    def _reload(self) -> None:
        self._request += 1  # any answer to an older request is now stale
        self._live_sig = ()  # the curves may hold history now: the next live frame must draw
        if not self._keys:
            self._loading = False
            self._set_status("Select GPUs in the table or heatmap to plot them.")
            return
        if self.is_live:
            self._loading = False
            self._set_status("")
            self.refresh()
            for pw in self.plots:
                pw.enableAutoRange()
            return
        if self._history is None:
            self._set_status("History needs the database (not configured).", "warning")
            return
        start, end = self.time_range()
        if end <= start:
            self._set_status("The range must end after it starts.", "warning")
            return
        self._shown_range = (start, end)
        self._data = {}  # nothing stale under the crosshair while loading or after a failure
        for curves in self._curves:
            for c in curves:
                c.setData([], [])
        # The axis shows the range asked for, not just where data was found:
        # a GPU heard from only in the last ten minutes of 24 h must look like that.
        for pw in self.plots:
            pw.enableAutoRange(axis="y")
        self.plots[0].setXRange(start, end, padding=0)
        self._loading = True
        self._set_status("loading…")
        self._tasks.spawn(self._load(self._request, list(self._keys), start, end))

    async def _load(self, request: int, keys: list[Key], start: float, end: float) -> None:
        assert self._history is not None
        metrics = [m[0] for m in PLOT_METRICS]
        t0 = time.perf_counter()
        try:
            data = await self._history.fetch(keys, start, end, metrics, max_points=MAX_POINTS)
        except Exception as exc:  # noqa: BLE001 - any backend failure is shown in the panel, never raised into Qt
            if request == self._request:
                log.warning("history fetch failed: %s", exc)
                self._loading = False
                self._set_status(f"History unavailable: {exc}", "error")
            return
        if request != self._request:
            return  # the user changed the range or selection meanwhile
        self._loading = False
        self._data = data
        self._draw(data)
        n = sum(len(v[0]) for d in data.values() for v in d.values())
        self._set_status(f"{n:,} points in {time.perf_counter() - t0:.2f} s" if n else "No data in this range.")

    # ------------------------------------------------------------------ events

    def _on_range_changed(self, index: int) -> None:
        previous, self._range_index = self._range_index, index
        if index == CUSTOM and previous != CUSTOM and not self._custom_given:
            # Start from the range on screen, to the minute the edits show, the
            # end rounded up so that the newest samples are in it.
            start, end = self._span_range(previous)
            self._set_custom_edits(math.floor(start / 60) * 60, math.ceil(end / 60) * 60)
        self._show_custom(index == CUSTOM)
        self.reload_button.setVisible(index not in (LIVE, CUSTOM))
        self._data = {}
        self._reload()

    def _on_apply_clicked(self) -> None:
        self._reload()

    def _on_fleet_tick(self) -> None:
        if not self.is_live or not self._keys:
            return
        if self.isVisible():
            self.refresh()
        else:
            self._dirty = True

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._dirty:
            self.refresh()

    def _on_mouse_moved(self, plot_index: int, scene_pos: object) -> None:
        pw = self.plots[plot_index]
        vb = pw.getPlotItem().getViewBox()
        if not vb.sceneBoundingRect().contains(scene_pos):
            for line in self._vlines:
                line.setVisible(False)
            return
        x = vb.mapSceneToView(scene_pos).x()
        for line in self._vlines:
            line.setPos(x)
            line.setVisible(True)
        self.readout.setText(self._readout_text(plot_index, x))

    def _readout_text(self, plot_index: int, x: float) -> str:
        metric, title, unit, scale = PLOT_METRICS[plot_index]
        parts = []
        for key in self._keys[:READOUT_CURVES]:
            ts, vs = self._data.get(key, {}).get(metric, (None, None))
            if ts is None or vs is None or len(ts) == 0:
                continue
            i = int(np.clip(np.searchsorted(ts, x), 1, len(ts) - 1)) if len(ts) > 1 else 0
            if i > 0 and abs(ts[i - 1] - x) < abs(ts[i] - x):
                i -= 1
            # A history bucket is two points at one time, its min and max: show both.
            same = vs[np.searchsorted(ts, ts[i], "left") : np.searchsorted(ts, ts[i], "right")]
            lo, hi = float(np.min(same)) * scale, float(np.max(same)) * scale
            if math.isnan(lo) or math.isnan(hi):
                continue
            value = f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}"
            parts.append(f"{key[0]}/{key[1]} {value}")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x)) if 0 < x < 4e9 else "—"
        return f"{stamp} · {title} ({unit}): " + ("  ".join(parts) if parts else "no data")
