"""JobsView: the jobs table (state, placement, times, reason), its actions and the decision record.

It reads snapshots from a plain-Python :class:`JobsModelSource` given in ``__init__``
and asks it to act (cancel, resubmit, fetch a log); every action answers through a
``done(ok, text)`` callback, so nothing here waits on the network or the database.
An optional :class:`PlacementModelSource` adds the placement model's line (version and
validation figures) and its "Retrain placement model" button.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QColor, QFontDatabase
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from aether_desktop.services.jobs import JobRecord
from aether_desktop.widgets import theme

Done = Callable[[bool, str], None]


class JobsModelSource(Protocol):
    """What the view needs (implemented by widgets.jobs_bridge.JobsBridge, or a fake in tests)."""

    def list_jobs(self) -> Sequence[JobRecord]: ...
    def now(self) -> float: ...
    def add_listener(self, fn: Callable[[], None]) -> None: ...
    def remove_listener(self, fn: Callable[[], None]) -> None: ...
    def cancel(self, job_id: str, done: Done) -> None: ...
    def resubmit(self, job_id: str, done: Done) -> None: ...
    def fetch_log(self, job_id: str, done: Done) -> None: ...


class PlacementModelSource(Protocol):
    """The placement model's state and its retrain action (JobsBridge, or a fake in tests)."""

    def model_summary(self) -> str | None: ...
    def model_status(self) -> str: ...
    def retraining(self) -> bool: ...
    def can_retrain(self) -> bool: ...
    def add_model_listener(self, fn: Callable[[], None]) -> None: ...
    def remove_model_listener(self, fn: Callable[[], None]) -> None: ...
    def retrain_model(self, done: Done) -> None: ...


STATE_COLORS: dict[str, str] = {
    "pending": theme.MUTED,
    "dispatched": theme.ACCENT,
    "running": theme.ACCENT,
    "finished": theme.OK,
    "failed": theme.CRIT,
    "lost": theme.CRIT,
    "rejected": theme.WARN,
    "cancelled": theme.SLEEPING,
}
COLUMNS = ("Job", "State", "Host / GPUs", "Command", "Submitted", "Started", "Ended", "Duration", "Reason")
_DURATION_COL = COLUMNS.index("Duration")
CANDIDATE_COLUMNS = ("Host", "GPUs", "p(success)", "Slowdown", "Score", "Note")


def fmt_time(ts: float | None, now: float) -> str:
    if ts is None:
        return ""
    fmt = "%H:%M:%S" if time.localtime(ts)[:3] == time.localtime(now)[:3] else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(ts))


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def placement(rec: JobRecord) -> str:
    if rec.host:
        return f"{rec.host}:{','.join(map(str, rec.gpus))}"
    if rec.request.host:
        return f"({rec.request.host}:{','.join(map(str, rec.request.gpus or ()))})"  # pinned, not yet placed
    return f"({rec.request.num_gpus} GPU{'s' if rec.request.num_gpus != 1 else ''})"


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, int | float) else ""


class JobsView(QWidget):
    def __init__(
        self,
        source: JobsModelSource,
        parent: QWidget | None = None,
        *,
        model: PlacementModelSource | None = None,
    ) -> None:
        super().__init__(parent)
        self._source = source
        self._model = model
        self._jobs: list[JobRecord] = []

        self.cancel_button = QPushButton("Cancel job")
        self.resubmit_button = QPushButton("Resubmit")
        self.log_button = QPushButton("Show log")
        self.message = QLabel()
        self.message.setWordWrap(True)
        bar = QHBoxLayout()
        for b in (self.cancel_button, self.resubmit_button, self.log_button):
            bar.addWidget(b)
        bar.addWidget(self.message, 1)

        self.model_label = QLabel("Placement model: loading…")
        self.model_label.setWordWrap(True)
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.retrain_button = QPushButton("Retrain placement model")
        self.retrain_button.setToolTip(
            "Train a new version from the fleet's finished jobs plus simulated data; "
            "it also retrains by itself after enough jobs have ended"
        )
        model_bar = QHBoxLayout()
        model_bar.addWidget(self.model_label, 1)
        model_bar.addWidget(self.retrain_button)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)

        self.decision_summary = QLabel("Select a job to see why it was placed where it was.")
        self.decision_summary.setWordWrap(True)
        self.decision_summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.candidates = QTableWidget(0, len(CANDIDATE_COLUMNS))
        self.candidates.setHorizontalHeaderLabels(list(CANDIDATE_COLUMNS))
        self.candidates.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.candidates.verticalHeader().hide()
        self.candidates.horizontalHeader().setStretchLastSection(True)
        decision = QWidget()
        dl = QVBoxLayout(decision)
        dl.addWidget(self.decision_summary)
        dl.addWidget(self.candidates, 1)
        self.log_text = QPlainTextEdit()
        self.log_text.setReadOnly(True)
        self.log_text.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.details = QTabWidget()
        self.details.addTab(decision, "Decision")
        self.details.addTab(self.log_text, "Log")

        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(self.details)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addLayout(model_bar)
        layout.addWidget(split, 1)

        # Durations of running jobs tick once a second without reloading the list.
        self._clock_timer = QTimer(self)
        self._clock_timer.setInterval(1000)
        self._clock_timer.timeout.connect(self._on_clock)

        self.table.itemSelectionChanged.connect(self._on_selection)
        self.cancel_button.clicked.connect(self._on_cancel)
        self.resubmit_button.clicked.connect(self._on_resubmit)
        self.log_button.clicked.connect(self._on_show_log)
        source.add_listener(self.refresh)
        # The source outlives the view; stop it calling a deleted widget.
        remove = source.remove_listener
        refresh = self.refresh
        self.destroyed.connect(lambda *_: remove(refresh))
        self.retrain_button.clicked.connect(self._on_retrain)
        if model is not None:
            model.add_model_listener(self.refresh_model)
            remove_model = model.remove_model_listener
            refresh_model = self.refresh_model
            self.destroyed.connect(lambda *_: remove_model(refresh_model))
        else:
            self.model_label.hide()
            self.retrain_button.hide()
        self.refresh()
        self.refresh_model()

    # ------------------------------------------------------------------ read side

    def selected_job(self) -> JobRecord | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        return self._jobs[rows[0].row()] if rows[0].row() < len(self._jobs) else None

    def select_job(self, job_id: str) -> bool:
        for i, j in enumerate(self._jobs):
            if j.id == job_id:
                self.table.selectRow(i)
                return True
        return False

    def refresh(self) -> None:
        """Reload the table from the source, keeping the selected job selected."""
        keep = self.selected_job()
        now = self._source.now()
        self._jobs = list(self._source.list_jobs())
        self.table.setUpdatesEnabled(False)
        self.table.blockSignals(True)
        try:
            self.table.setRowCount(len(self._jobs))
            for r, job in enumerate(self._jobs):
                for c, text in enumerate(self._row(job, now)):
                    item = QTableWidgetItem(text)
                    if c == 1:
                        item.setForeground(QColor(STATE_COLORS.get(job.state, theme.TEXT)))
                    if c in (3, 8):
                        item.setToolTip(text)
                    self.table.setItem(r, c, item)
            self.table.clearSelection()
            if keep is not None:
                self.select_job(keep.id)
        finally:
            self.table.blockSignals(False)
            self.table.setUpdatesEnabled(True)
        self._on_selection()
        running = any(j.state == "running" for j in self._jobs)
        if running and not self._clock_timer.isActive():
            self._clock_timer.start()
        elif not running:
            self._clock_timer.stop()

    def refresh_model(self) -> None:
        """The placement model's line: version and validation figures, or the retrain in progress."""
        m = self._model
        if m is None:
            return
        summary = m.model_summary()
        busy = m.retraining()
        parts = [_html(summary or "Placement model: not loaded yet (waiting for the database)")]
        if status := m.model_status():
            parts.append(f"<i>{_html(status)}</i>" if busy else _html(status))
        self.model_label.setText("<br>".join(parts))
        self.retrain_button.setEnabled(m.can_retrain() and summary is not None and not busy)
        self.retrain_button.setText("Retraining…" if busy else "Retrain placement model")

    @staticmethod
    def _row(job: JobRecord, now: float) -> list[str]:
        reason = job.reason or ""
        if job.exit_code is not None and job.state in ("finished", "failed"):
            reason = f"exit {job.exit_code}" + (
                f" — {reason}" if reason and reason != f"exit code {job.exit_code}" else ""
            )
        return [
            job.id,
            job.state + (" (cancelling)" if job.cancel_requested_ts and not job.terminal else ""),
            placement(job),
            " ".join(job.request.argv),
            fmt_time(job.submitted_ts, now),
            fmt_time(job.started_ts, now),
            fmt_time(job.ended_ts, now),
            fmt_duration(job.duration_s(now)),
            reason,
        ]

    def _show_decision(self, job: JobRecord | None) -> None:
        self.candidates.setRowCount(0)
        if job is None:
            self.decision_summary.setText("Select a job to see why it was placed where it was.")
            return
        d = job.decision or {}
        lines = [f"<b>{job.id}</b> — {job.state}" + (f": {job.reason}" if job.reason else "")]
        lines.append(f"argv: <code>{_html(repr(list(job.request.argv)))}</code>")
        if d:
            where = f" on {d.get('host')}:{','.join(map(str, d.get('gpus') or []))}" if d.get("host") else ""
            lines.append(
                f"Decision: <b>{_html(str(d.get('action')))}</b>{_html(where)} — {_html(str(d.get('reason')))}"
            )
            facts = [
                f"p(success) {_num(d.get('p_success'), '.2f')}" if d.get("p_success") is not None else "",
                f"slowdown ×{_num(d.get('expected_slowdown'), '.2f')}"
                if d.get("expected_slowdown") is not None
                else "",
                f"model {_html(str(d.get('model_version')))}" if d.get("model_version") else "",
                f"{d.get('candidates_total', 0)} candidate(s) scored",
            ]
            lines.append(" · ".join(f for f in facts if f))
        else:
            lines.append("No scheduling decision yet.")
        self.decision_summary.setText("<br>".join(lines))
        cands = d.get("candidates") or []
        self.candidates.setRowCount(len(cands))
        for r, c in enumerate(cands):
            values = (
                str(c.get("host", "")),
                ",".join(map(str, c.get("gpus") or [])),
                _num(c.get("p_success"), ".3f"),
                _num(c.get("expected_slowdown"), ".2f"),
                _num(c.get("score"), ".3f"),
                str(c.get("note") or ""),
            )
            for col, text in enumerate(values):
                self.candidates.setItem(r, col, QTableWidgetItem(text))

    # ------------------------------------------------------------------ handlers

    def _on_selection(self) -> None:
        job = self.selected_job()
        self.cancel_button.setEnabled(job is not None and not job.terminal)
        self.resubmit_button.setEnabled(job is not None)
        self.log_button.setEnabled(job is not None and job.host is not None)
        self._show_decision(job)

    def _on_clock(self) -> None:
        now = self._source.now()
        for r, job in enumerate(self._jobs):
            if job.state == "running" and (item := self.table.item(r, _DURATION_COL)) is not None:
                item.setText(fmt_duration(job.duration_s(now)))

    def _on_retrain(self) -> None:
        if self._model is not None:
            self._say(True, "retraining the placement model…")
            self._model.retrain_model(self._on_retrained)
            self.refresh_model()

    def _on_retrained(self, ok: bool, text: str) -> None:
        self._say(ok, text if ok else f"retrain failed: {text}")
        self.refresh_model()

    def _on_cancel(self) -> None:
        job = self.selected_job()
        if job is not None:
            self._say(True, f"cancelling {job.id}…")
            self._source.cancel(job.id, self._on_done)

    def _on_resubmit(self) -> None:
        job = self.selected_job()
        if job is not None:
            self._source.resubmit(job.id, self._on_done)

    def _on_show_log(self) -> None:
        job = self.selected_job()
        if job is None:
            return
        self.details.setCurrentWidget(self.log_text)
        self.log_text.setPlainText(f"(asking {job.host} for the log of {job.id}…)")
        self._source.fetch_log(job.id, self._on_log)

    def _on_log(self, ok: bool, text: str) -> None:
        self.log_text.setPlainText(text if ok else f"(log unavailable: {text})")
        self.log_text.verticalScrollBar().setValue(self.log_text.verticalScrollBar().maximum())

    def _on_done(self, ok: bool, text: str) -> None:
        self._say(ok, text)

    def _say(self, ok: bool, text: str) -> None:
        self.message.setStyleSheet(f"color: {theme.TEXT if ok else theme.CRIT};")
        self.message.setText(text)


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
