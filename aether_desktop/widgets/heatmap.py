"""Fleet heatmap: every GPU × the last minutes, one ImageItem, one metric at a time.

One ImageItem for the whole fleet costs a single texture upload per frame
(≈7 ms at 256 GPUs × 3,600 s) where one curve per GPU would cost tens of ms.
Rows are ordered by host then GPU index; missing data (NaN) is transparent.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Signal
from PySide6.QtGui import QFontMetricsF, QShowEvent
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from aether_desktop.widgets import theme
from aether_desktop.widgets.state import Key, QtState

# label, FleetState metric, unit, fixed colour levels (None = from the fleet's power limits)
HEATMAP_METRICS: tuple[tuple[str, str, str, tuple[float, float] | None], ...] = (
    ("Temperature", "temp_c", "°C", (20.0, 95.0)),
    ("Memory used", "mem_pct", "%", (0.0, 100.0)),
    ("Utilisation", "util_pct", "%", (0.0, 100.0)),
    ("Power", "power_w", "W", None),
)
MAX_IMAGE_ROWS = 2048  # more GPUs than this are drawn as groups (max of each group): more rows than pixels
MIN_REFRESH_S = 0.5  # the ring has 1-second bins: redrawing faster only costs CPU
ROW_LABEL_SPACING = 1.15  # line heights per row label: labels never touch


def row_ticks(keys: list[Key], lo: float, hi: float, height_px: float, line_px: float) -> list[tuple[float, str]]:
    """Left-axis labels for the view [lo, hi] (in rows) drawn ``height_px`` tall.

    Every visible row gets "host/gpu" when each row is a label's height;
    otherwise each host's name sits in the middle of its visible rows, kept
    only when it is a label's height away from the last one kept (hosts of
    very different sizes, or a view zoomed out past the rows, thin out).
    """
    first, last = max(0, math.floor(lo)), min(len(keys), math.ceil(hi))
    if last <= first or height_px <= 0 or hi <= lo:
        return []
    gap = max(line_px, 1.0) * ROW_LABEL_SPACING * (hi - lo) / height_px  # rows between two labels
    rows = range(first, last)
    if gap <= 1.0:
        return [(r + 0.5, f"{keys[r][0]}/{keys[r][1]}") for r in rows]
    starts = [r for r in rows if r == first or keys[r][0] != keys[r - 1][0]]
    ends = [*starts[1:], last]
    out: list[tuple[float, str]] = []
    for s, e in zip(starts, ends, strict=True):
        centre = (s + e) / 2
        if not out or centre - out[-1][0] >= gap:
            out.append((centre, keys[s][0]))
    return out


class FleetHeatmap(QWidget):
    """GPUs (rows) × time (columns) for one selectable metric; click a row to select that GPU."""

    gpu_clicked = Signal(object)  # Key

    def __init__(self, state: QtState, window_s: int | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self._fleet = state.fleet
        self.window_s = min(window_s or self._fleet.history_s, self._fleet.history_s)
        self._order = np.zeros(0, dtype=np.intp)  # display row -> slot row
        self._keys: list[Key] = []
        self._ticks: list[tuple[float, str]] = []
        self._image = np.zeros((0, self.window_s), dtype=np.float32)
        self._t_end = 0.0
        self._dirty = True
        self._last_refresh = 0.0

        self.metric_combo = QComboBox()
        for label, _metric, unit, _levels in HEATMAP_METRICS:
            self.metric_combo.addItem(f"{label} ({unit})")
        self.readout = QLabel(" ")
        self.readout.setStyleSheet(f"color: {theme.MUTED};")

        self.plot = pg.PlotWidget(background=theme.PLOT_BG)
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=True)
        self.plot.invertY(True)
        self.plot.hideButtons()
        pi = self.plot.getPlotItem()
        pi.setLabel("bottom", "seconds before now")
        left = pi.getAxis("left")
        left.setWidth(96)
        self.image_item = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image_item)
        self.color_bar = pg.ColorBarItem(
            values=(20.0, 95.0), colorMap=theme.HEATMAP_COLORMAPS["temp_c"], interactive=False, width=14
        )
        self.color_bar.setImageItem(self.image_item, insert_in=pi)

        top = QHBoxLayout()
        top.addWidget(QLabel("Metric"))
        top.addWidget(self.metric_combo)
        top.addStretch(1)
        top.addWidget(self.readout)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.plot)

        self.metric_combo.currentIndexChanged.connect(self._on_metric_changed)
        # Labels follow the axis' pixel height and the rows in view (resize, zoom, pan).
        pi.getViewBox().sigResized.connect(self._update_ticks)
        pi.getViewBox().sigYRangeChanged.connect(self._update_ticks)
        self.plot.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.plot.scene().sigMouseClicked.connect(self._on_mouse_clicked)
        state.fleet_tick.connect(self._on_fleet_tick)

    # ------------------------------------------------------------------ public

    @property
    def metric_name(self) -> str:
        """The FleetState metric shown (not ``metric``: that is QPaintDevice's virtual method)."""
        return HEATMAP_METRICS[self.metric_combo.currentIndex()][1]

    def set_metric(self, metric: str) -> None:
        for i, m in enumerate(HEATMAP_METRICS):
            if m[1] == metric:
                self.metric_combo.setCurrentIndex(i)
                return
        raise ValueError(f"unknown heatmap metric {metric!r}")

    @property
    def image(self) -> np.ndarray:
        """What is drawn: shape (GPUs, window_s), rows ordered by host then GPU."""
        return self._image

    @property
    def row_keys(self) -> list[Key]:
        return list(self._keys)

    def refresh(self) -> None:
        """Redraw now (the fleet tick does this while visible)."""
        self._dirty = False
        self._last_refresh = time.monotonic()
        now = self._state.now()
        self._t_end = math.floor(now)
        n = self._fleet.n_slots
        if n != len(self._order):
            self._reorder()
        self._image = (self._fleet.matrix(self.metric_name, now, rows=self._order)[:, -self.window_s :] if n
                       else np.zeros((0, self.window_s), np.float32))
        w = self.window_s
        if n:
            self.image_item.setImage(_group_rows(self._image, MAX_IMAGE_ROWS), autoLevels=False,
                                     levels=self._levels())
            self.image_item.setRect(QRectF(-w, 0, w, n))
        else:
            self.image_item.clear()
        self.color_bar.setLevels(self._levels())
        self.plot.setXRange(-w, 0, padding=0)

    # ------------------------------------------------------------------ internals

    def _levels(self) -> tuple[float, float]:
        levels = HEATMAP_METRICS[self.metric_combo.currentIndex()][3]
        if levels is not None:
            return levels
        limits = self._fleet.latest("power_limit_w")
        top = float(np.nanmax(limits)) if len(limits) and np.isfinite(limits).any() else 700.0
        return (0.0, top)

    def _reorder(self) -> None:
        keys = self._fleet.keys()
        self._order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.intp)
        self._keys = [keys[r] for r in self._order]
        self.plot.setYRange(0, max(len(self._keys), 1), padding=0)
        self._update_ticks()

    def _update_ticks(self, *_args: object) -> None:
        pi = self.plot.getPlotItem()
        axis = pi.getAxis("left")
        lo, hi = pi.getViewBox().viewRange()[1]
        line_px = QFontMetricsF(axis.style.get("tickFont") or axis.font()).height()
        ticks = row_ticks(self._keys, lo, hi, pi.getViewBox().height(), line_px)
        if ticks != self._ticks:
            self._ticks = ticks
            axis.setTicks([ticks, []])

    @property
    def row_labels(self) -> list[tuple[float, str]]:
        """The left axis' labels now: (row centre, text)."""
        return list(self._ticks)

    def _cell_at(self, scene_pos: QPointF) -> tuple[int, int] | None:
        if not len(self._keys):
            return None
        p = self.plot.getPlotItem().getViewBox().mapSceneToView(scene_pos)
        row = math.floor(p.y())
        col = math.floor(p.x()) + self.window_s
        if 0 <= row < len(self._keys) and 0 <= col < self.window_s:
            return row, col
        return None

    def _on_mouse_moved(self, scene_pos: QPointF) -> None:
        cell = self._cell_at(scene_pos)
        if cell is None:
            self.readout.setText(" ")
            self.plot.setToolTip("")
            return
        row, col = cell
        host, gpu = self._keys[row]
        label, _metric, unit, _ = HEATMAP_METRICS[self.metric_combo.currentIndex()]
        v = float(self._image[row, col]) if row < len(self._image) else float("nan")
        t = self._t_end - (self.window_s - 1 - col)
        value = "no data" if math.isnan(v) else f"{v:.1f} {unit}"
        text = f"{host} / GPU {gpu} · {time.strftime('%H:%M:%S', time.localtime(t))} · {label.lower()} {value}"
        self.readout.setText(text)
        self.plot.setToolTip(text)

    def _on_mouse_clicked(self, event: object) -> None:
        pos = event.scenePos()  # type: ignore[attr-defined]
        cell = self._cell_at(pos)
        if cell is not None:
            self.gpu_clicked.emit(self._keys[cell[0]])

    def _on_metric_changed(self, _index: int) -> None:
        self.color_bar.setColorMap(pg.colormap.get(theme.HEATMAP_COLORMAPS[self.metric_name]))
        self.refresh()

    def _on_fleet_tick(self) -> None:
        # Hidden (another tab in front): skip the texture upload, draw on show.
        if self.isVisible() and time.monotonic() - self._last_refresh >= MIN_REFRESH_S:
            self.refresh()
        else:
            self._dirty = True

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._dirty:
            self.refresh()


def _group_rows(image: np.ndarray, max_rows: int) -> np.ndarray:
    """At most ``max_rows`` rows: each shows the maximum of consecutive GPUs (a hot GPU stays visible)."""
    n, w = image.shape
    if n <= max_rows:
        return image
    g = math.ceil(n / max_rows)
    pad = (-n) % g
    if pad:
        image = np.vstack([image, np.full((pad, w), np.nan, dtype=image.dtype)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups (offline hosts) stay NaN
        grouped: np.ndarray = np.nanmax(image.reshape(-1, g, w), axis=1)
        return grouped
