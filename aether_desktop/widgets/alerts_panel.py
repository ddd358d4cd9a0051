"""The alerts tab: every alert with filters, acknowledge, snooze, and a jump to the GPU's plots.

A click on a row emits ``gpu_focus_requested(host, gpu, ts)`` with the time of
the first triggering sample, so the main window can select the GPU and show
its plots around that moment. The footer shows which anomaly model is in use
(version, training window, validation figures) and can ask for a retrain.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from PySide6.QtCore import Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from aether_desktop.services.alerts import Alert
from aether_desktop.widgets.alerts_bridge import AlertsBridge

COLUMNS = ("Severity", "State", "Host", "GPU", "Kind", "Source", "First sample", "Last", "Score", "Message")
SEVERITY_COLOURS = {"critical": "#d64541", "warning": "#e0a030", "info": "#5b8def"}
STATE_FILTERS = ("open", "all", "active", "acknowledged", "snoozed", "cleared")
SEVERITY_FILTERS = ("all", "critical", "warning", "info")
MAX_KEPT = 1000  # cleared alerts kept in the table (the database keeps all)


def _when(ts: float) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(ts))


class AlertsPanel(QWidget):
    gpu_focus_requested = Signal(str, int, float)  # host, gpu, ts of the first triggering sample

    def __init__(self, bridge: AlertsBridge, history: Iterable[Alert] = (), parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._bridge = bridge
        self._alerts: dict[str, Alert] = {}
        self._row_ids: list[str] = []

        self.severity_filter = QComboBox()
        self.severity_filter.addItems(SEVERITY_FILTERS)
        self.state_filter = QComboBox()
        self.state_filter.addItems(STATE_FILTERS)
        self.host_filter = QComboBox()
        self.host_filter.addItem("all hosts")
        self.ack_button = QPushButton("Acknowledge")
        self.snooze_button = QPushButton("Snooze 1 h")
        self.count_label = QLabel()
        top = QHBoxLayout()
        for label, w in (("Severity", self.severity_filter), ("State", self.state_filter),
                         ("Host", self.host_filter)):
            top.addWidget(QLabel(label))
            top.addWidget(w)
        top.addStretch(1)
        top.addWidget(self.count_label)
        top.addWidget(self.ack_button)
        top.addWidget(self.snooze_button)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)

        self.model_label = QLabel("anomaly model: loading")
        self.model_label.setWordWrap(True)
        self.retrain_button = QPushButton("Retrain on history")
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setVisible(False)
        foot = QHBoxLayout()
        foot.addWidget(self.model_label, 1)
        foot.addWidget(self.progress)
        foot.addWidget(self.retrain_button)

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.table, 1)
        lay.addLayout(foot)

        for cb in (self.severity_filter, self.state_filter, self.host_filter):
            cb.currentIndexChanged.connect(self._on_filter_changed)
        self.ack_button.clicked.connect(self._on_ack_clicked)
        self.snooze_button.clicked.connect(self._on_snooze_clicked)
        self.retrain_button.clicked.connect(bridge.retrain_requested)
        self.table.cellClicked.connect(self._on_cell_clicked)
        self.table.itemSelectionChanged.connect(self._on_selection_changed)
        bridge.alert_raised.connect(self._on_alert)
        bridge.alert_updated.connect(self._on_alert)
        bridge.alert_cleared.connect(self._on_alert)
        bridge.alerts_restored.connect(self._on_alerts_restored)
        bridge.model_info_changed.connect(self._on_model_info)
        bridge.retrain_progress.connect(self._on_retrain_progress)

        for a in [*history, *bridge.open_alerts()]:
            self._alerts[a.id] = a
        self._rebuild()
        self._on_selection_changed()

    # ------------------------------------------------------------------ public

    def alerts(self) -> list[Alert]:
        """Alerts currently shown (after filters), in table order."""
        return [self._alerts[i] for i in self._row_ids]

    def set_history(self, alerts: Iterable[Alert]) -> None:
        """Alerts loaded from the database (older than this session)."""
        for a in alerts:
            self._alerts.setdefault(a.id, a)
        self._rebuild()

    # ------------------------------------------------------------------ handlers

    def _on_alert(self, alert: Alert) -> None:
        self._alerts[alert.id] = alert
        if len(self._alerts) > MAX_KEPT:
            cleared = sorted((a for a in self._alerts.values() if not a.is_open), key=lambda a: a.last_ts)
            for a in cleared[: len(self._alerts) - MAX_KEPT]:
                del self._alerts[a.id]
        self._rebuild()

    def _on_alerts_restored(self, alerts: list[Alert]) -> None:
        # The manager's copy is current (an older history row may have been set first).
        for a in alerts:
            self._alerts[a.id] = a
        self._rebuild()

    def _on_filter_changed(self, _index: int) -> None:
        self._rebuild()

    def _on_cell_clicked(self, row: int, _col: int) -> None:
        if 0 <= row < len(self._row_ids):
            a = self._alerts[self._row_ids[row]]
            self.gpu_focus_requested.emit(a.host, a.gpu, a.first_ts)

    def _on_selection_changed(self) -> None:
        sel = [a for a in self._selected() if a.is_open]
        self.ack_button.setEnabled(any(a.state != "acknowledged" for a in sel))
        self.snooze_button.setEnabled(bool(sel))

    def _on_ack_clicked(self) -> None:
        for a in self._selected():
            if a.is_open:
                self._bridge.acknowledge(a.id)

    def _on_snooze_clicked(self) -> None:
        for a in self._selected():
            if a.is_open:
                self._bridge.snooze(a.id, 3600.0)

    def _on_model_info(self, text: str) -> None:
        self.model_label.setText(text)

    def _on_retrain_progress(self, fraction: float, stage: str) -> None:
        done = fraction >= 1.0
        self.progress.setVisible(not done)
        self.progress.setValue(int(fraction * 100))
        self.progress.setFormat(f"{stage} %p%")
        self.retrain_button.setEnabled(done)

    # ------------------------------------------------------------------ table

    def _selected(self) -> list[Alert]:
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self._alerts[self._row_ids[r]] for r in rows if r < len(self._row_ids)]

    def _visible(self, a: Alert) -> bool:
        sev = self.severity_filter.currentText()
        state = self.state_filter.currentText()
        host = self.host_filter.currentText()
        if sev != "all" and a.severity != sev:
            return False
        if state == "open" and not a.is_open:
            return False
        if state not in ("open", "all") and a.state != state:
            return False
        return host == "all hosts" or a.host == host

    def _rebuild(self) -> None:
        selected = {a.id for a in self._selected()}
        self._sync_hosts()
        rank = {"critical": 0, "warning": 1, "info": 2}
        shown = sorted((a for a in self._alerts.values() if self._visible(a)),
                       key=lambda a: (not a.is_open, rank.get(a.severity, 3), -a.first_ts))
        self._row_ids = [a.id for a in shown]
        self.table.setRowCount(len(shown))
        for r, a in enumerate(shown):
            gpus = ",".join(str(g) for g in a.gpus)
            cells = (a.severity, a.state, a.host, gpus, a.kind, a.source, _when(a.first_ts), _when(a.last_ts),
                     f"{a.score:.3f}", a.message)
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == 0:
                    item.setForeground(QBrush(QColor(SEVERITY_COLOURS.get(a.severity, "#888888"))))
                if not a.is_open:
                    item.setForeground(QBrush(QColor("#888888")))
                item.setToolTip(a.message)
                self.table.setItem(r, c, item)
            if a.id in selected:
                self.table.selectRow(r)
        n_open = sum(1 for a in self._alerts.values() if a.is_open)
        self.count_label.setText(f"{n_open} open, {len(shown)} shown")

    def _sync_hosts(self) -> None:
        hosts = sorted({a.host for a in self._alerts.values()})
        have = [self.host_filter.itemText(i) for i in range(1, self.host_filter.count())]
        if hosts != have:
            current = self.host_filter.currentText()
            self.host_filter.blockSignals(True)
            self.host_filter.clear()
            self.host_filter.addItem("all hosts")
            self.host_filter.addItems(hosts)
            idx = self.host_filter.findText(current)
            self.host_filter.setCurrentIndex(max(idx, 0))
            self.host_filter.blockSignals(False)
