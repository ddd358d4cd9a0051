"""Fleet table: one row per GPU, read straight from FleetState arrays.

The model never creates items per update: on each fleet tick it snapshots the
columns it shows (a few numpy copies, then ``tolist`` so ``data()`` indexes
Python lists) and repaints the visible rows. Sorting and filtering are done
in numpy by the model itself: a QSortFilterProxyModel would call back into
Python ``data()`` for every comparison, which takes seconds at 4,096 GPUs.
Live values re-sort at most every ``resort_s`` so rows do not jump under the
cursor; selection follows the GPU through every re-sort (persistent indexes).
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
    Signal,
)
from PySide6.QtGui import QAction, QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QLineEdit, QTableView, QVBoxLayout, QWidget

from aether_desktop.services.fleet import STATE_LOST, STATE_NAMES, STATE_OFFLINE, STATE_SLEEPING
from aether_desktop.widgets import theme
from aether_desktop.widgets.state import Key, QtState

COLUMNS: tuple[str, ...] = (
    "Host", "GPU", "Model", "State", "Temp (°C)", "Memory (GiB)", "Util (%)", "Power (W)",
)
COL_HOST, COL_GPU, COL_MODEL, COL_STATE, COL_TEMP, COL_MEM, COL_UTIL, COL_POWER = range(len(COLUMNS))
DEFAULT_SLOWDOWN_C = 90.0  # when the agent does not report the GPU's slowdown temperature
WARN_MARGIN_C = 8.0  # "near slowdown" starts this far below it
_STATE_COLORS = (theme.OK, theme.SLEEPING, theme.CRIT, theme.CRIT)
_ALIGN_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
_DASH = "—"
Index = QModelIndex | QPersistentModelIndex


class FleetTableModel(QAbstractTableModel):
    """Table model over FleetState; rows are a filtered, sorted view of slot rows."""

    def __init__(self, state: QtState, resort_s: float = 2.0) -> None:
        super().__init__()
        self._state = state
        self._fleet = state.fleet
        self.resort_s = resort_s
        self._view = np.zeros(0, dtype=np.intp)  # view row -> slot row
        self._sort_col = COL_HOST
        self._sort_desc = False
        self._terms: list[str] = []
        self._last_resort = -np.inf
        self._n_seen = -1
        self._search: list[str] = []  # lowercase "host/gpu model" per slot
        self._host_rank = np.zeros(0)
        self._model_rank = np.zeros(0)
        self._snap_now = 0.0
        self._load_columns(state.now())
        self._rebuild_view()

    # ------------------------------------------------------------------ Qt model API

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        return 0 if parent.isValid() else len(self._view)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> object:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> object:
        if not index.isValid():
            return None
        r = int(self._view[index.row()])
        c = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(r, c)
        if role == Qt.ItemDataRole.ForegroundRole:
            return self._foreground(r, c)
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return _ALIGN_RIGHT if c >= COL_TEMP or c == COL_GPU else None
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(r)
        if role == Qt.ItemDataRole.UserRole:
            return self._keys[r]
        return None

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        self._sort_col = column
        self._sort_desc = order == Qt.SortOrder.DescendingOrder
        self._rebuild_view()

    # ------------------------------------------------------------------ public

    def set_filter(self, text: str) -> None:
        """Whitespace-separated terms; each must match host, host/gpu, model or state."""
        self._terms = text.lower().split()
        self._rebuild_view()

    def refresh(self, now: float, force_resort: bool = False) -> bool:
        """Snapshot the fleet; re-sort/filter if due. True if the visible layout changed."""
        self._load_columns(now)
        if force_resort or self._n_seen != self._fleet.n_slots or now - self._last_resort >= self.resort_s:
            return self._rebuild_view()
        return False

    def key_at(self, view_row: int) -> Key:
        return self._keys[int(self._view[view_row])]

    def view_row_of(self, key: Key) -> int | None:
        r = self._fleet.row_of(key)
        if r is None:
            return None
        hits = np.flatnonzero(self._view == r)
        return int(hits[0]) if len(hits) else None

    # ------------------------------------------------------------------ internals

    def _load_columns(self, now: float) -> None:
        f = self._fleet
        n = f.n_slots
        if n != self._n_seen:
            self._keys = f.keys()
            self._names = f.names()
            hosts = np.array([k[0] for k in self._keys], dtype=object)
            self._gpu_idx = np.array([k[1] for k in self._keys], dtype=np.float64)
            self._host_rank = _rank(hosts)
            self._search = [f"{h}/{i} {m}".lower() for (h, i), m in zip(self._keys, self._names, strict=True)]
        elif n and not self._names[-1]:
            self._names = f.names()
        self._snap_now = now
        # numpy copies only: converting every column to lists each frame cost ~30 ms at 100,000 GPUs,
        # while data() only ever reads the few visible rows.
        self._states_arr = f.display_states(now)
        self._states = self._states_arr
        self._temp_arr = f.latest("temp_c").copy()
        self._temp = self._temp_arr
        self._slow = f.latest("slowdown_temp_c").copy()
        self._mem_arr = f.latest("mem_used_mib").copy()
        self._mem = self._mem_arr
        self._mem_total = f.latest("mem_total_mib").copy()
        self._util_arr = f.latest("util_pct").copy()
        self._util = self._util_arr
        self._power_arr = f.latest("power_w").copy()
        self._power = self._power_arr
        self._limit = f.latest("power_limit_w").copy()

    def _sort_key(self, col: int) -> np.ndarray:
        if col == COL_GPU:
            return self._gpu_idx
        if col == COL_MODEL:
            if len(self._model_rank) != len(self._keys):
                self._model_rank = _rank(np.array(self._names, dtype=object))
            return self._model_rank
        if col == COL_STATE:
            return self._states_arr.astype(np.float64)
        if col == COL_TEMP:
            return self._temp_arr.astype(np.float64)
        if col == COL_MEM:
            return self._mem_arr.astype(np.float64)
        if col == COL_UTIL:
            return self._util_arr.astype(np.float64)
        if col == COL_POWER:
            return self._power_arr.astype(np.float64)
        return self._host_rank

    def _filtered_rows(self) -> np.ndarray:
        n = len(self._keys)
        if not self._terms:
            return np.arange(n, dtype=np.intp)
        states = [STATE_NAMES[s] for s in self._states]
        keep = [
            all(t in self._search[r] or t in states[r] for t in self._terms) for r in range(n)
        ]
        return np.flatnonzero(np.array(keep, dtype=bool)).astype(np.intp)

    def _rebuild_view(self) -> bool:
        self._last_resort = self._snap_now
        self._n_seen = len(self._keys)
        rows = self._filtered_rows()
        if len(rows):
            primary = self._sort_key(self._sort_col)[rows]
            if self._sort_desc:
                primary = -primary
            # np.lexsort: last key is primary; NaN (missing values) sort last either way.
            order = np.lexsort((self._gpu_idx[rows], self._host_rank[rows], primary))
            rows = rows[order]
        if np.array_equal(rows, self._view):
            return False
        self._set_view(rows)
        return True

    def _set_view(self, rows: np.ndarray) -> None:
        # layoutChanged with a persistent-index remap keeps the selection and the
        # current row on the same GPUs (the same way QSortFilterProxyModel does).
        self.layoutAboutToBeChanged.emit()
        old = self.persistentIndexList()
        old_slots = [int(self._view[i.row()]) for i in old]
        pos = np.full(max(len(self._keys), 1), -1, dtype=np.intp)
        pos[rows] = np.arange(len(rows))
        self._view = rows
        new = [
            self.index(int(pos[s]), i.column()) if pos[s] >= 0 else QModelIndex()
            for i, s in zip(old, old_slots, strict=True)
        ]
        self.changePersistentIndexList(old, new)
        self.layoutChanged.emit()

    def _display(self, r: int, c: int) -> str:
        if c == COL_HOST:
            return self._keys[r][0]
        if c == COL_GPU:
            return str(self._keys[r][1])
        if c == COL_MODEL:
            return self._names[r].removeprefix("NVIDIA ")
        if c == COL_STATE:
            return "● " + STATE_NAMES[int(self._states[r])]
        if c == COL_TEMP:
            return _fmt(self._temp[r], "{:.0f}")
        if c == COL_MEM:
            used, total = self._mem[r], self._mem_total[r]
            if used != used:  # NaN
                return _DASH
            return f"{used / 1024:.1f} / {total / 1024:.1f}" if total == total else f"{used / 1024:.1f}"
        if c == COL_UTIL:
            return _fmt(self._util[r], "{:.0f}")
        p, lim = self._power[r], self._limit[r]
        if p != p:
            return _DASH
        return f"{p:.0f} / {lim:.0f}" if lim == lim else f"{p:.0f}"

    def _foreground(self, r: int, c: int) -> QColor | None:
        s = int(self._states[r])
        if s in (STATE_OFFLINE, STATE_LOST):
            return QColor(theme.CRIT)
        if s == STATE_SLEEPING:
            return QColor(theme.SLEEPING)
        if c == COL_STATE:
            return QColor(_STATE_COLORS[s])
        if c == COL_TEMP:
            t = self._temp[r]
            slow = self._slow[r] if self._slow[r] == self._slow[r] else DEFAULT_SLOWDOWN_C
            if t >= slow:
                return QColor(theme.CRIT)
            if t >= slow - WARN_MARGIN_C:
                return QColor(theme.WARN)
        return None

    def _tooltip(self, r: int) -> str:
        host, idx = self._keys[r]
        slow = self._slow[r]
        lines = [
            f"{host} / GPU {idx}: {self._names[r]}",
            f"UUID {self._fleet.uuid(r)}",
            f"state {STATE_NAMES[int(self._states[r])]}",
            f"slowdown {_fmt(slow, '{:.0f} °C')}",
        ]
        thr = self._fleet.throttle(r)
        if thr:
            lines.append("throttle: " + ", ".join(thr))
        return "\n".join(lines)


class FleetTable(QWidget):
    """Filter box + table of every GPU; emits the selected GPU keys."""

    selection_changed = Signal(list)

    def __init__(self, state: QtState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self.model = FleetTableModel(state)
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter: host, model or state (e.g. 'node-0 offline')")
        self.filter_edit.setClearButtonEnabled(True)
        self.view = QTableView()
        self.view.setModel(self.model)
        self.view.setSortingEnabled(True)
        self.view.sortByColumn(COL_HOST, Qt.SortOrder.AscendingOrder)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setAlternatingRowColors(True)
        self.view.setShowGrid(False)
        self.view.setWordWrap(False)
        self.view.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        vh = self.view.verticalHeader()
        vh.setVisible(False)
        # Fixed row height: the view never measures rows, which keeps 4,096 rows cheap.
        vh.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        vh.setDefaultSectionSize(22)
        hh = self.view.horizontalHeader()
        hh.setHighlightSections(False)
        for col, width in enumerate((108, 36, 118, 80, 68, 96, 56, 80)):
            self.view.setColumnWidth(col, width)
        hh.setStretchLastSection(True)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        layout.addWidget(self.filter_edit)
        layout.addWidget(self.view)

        self.filter_edit.textChanged.connect(self._on_filter_changed)
        self.view.selectionModel().selectionChanged.connect(self._on_selection_changed)
        state.fleet_tick.connect(self._on_fleet_tick)

    def set_context_actions(self, actions: list[QAction]) -> None:
        """Actions shown on right-click (sleep/wake...), owned by the window."""
        for a in actions:
            self.view.addAction(a)

    def selected_keys(self) -> list[Key]:
        rows = sorted(i.row() for i in self.view.selectionModel().selectedRows())
        return [self.model.key_at(r) for r in rows]

    def select_keys(self, keys: list[Key]) -> None:
        sel = QItemSelection()
        first: int | None = None
        for key in keys:
            row = self.model.view_row_of(key)
            if row is None:
                continue
            first = row if first is None else first
            sel.select(self.model.index(row, 0), self.model.index(row, len(COLUMNS) - 1))
        flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
        self.view.selectionModel().select(sel, flags)
        if first is not None:
            self.view.scrollTo(self.model.index(first, 0))

    def refresh(self, force_resort: bool = False) -> None:
        self.model.refresh(self._state.now(), force_resort)
        rows = self.model.rowCount()
        if not rows:
            return
        # Repaint only what the user sees; the view would ignore the rest anyway.
        top = max(self.view.rowAt(0), 0)
        bottom = self.view.rowAt(self.view.viewport().height() - 1)
        bottom = rows - 1 if bottom < 0 else bottom
        self.model.dataChanged.emit(self.model.index(top, 0), self.model.index(bottom, len(COLUMNS) - 1))

    def _on_fleet_tick(self) -> None:
        self.refresh()

    def _on_filter_changed(self, text: str) -> None:
        self.model.set_filter(text)

    def _on_selection_changed(self, *_: object) -> None:
        self.selection_changed.emit(self.selected_keys())


def _rank(values: np.ndarray) -> np.ndarray:
    """Dense rank of strings as float64, so they sort with numeric keys in one lexsort."""
    if len(values) == 0:
        return np.zeros(0)
    _, inverse = np.unique(values.astype(str), return_inverse=True)
    return inverse.astype(np.float64)


def _fmt(v: float, spec: str) -> str:
    return _DASH if v != v else spec.format(v)
