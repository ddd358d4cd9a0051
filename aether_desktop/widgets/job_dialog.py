"""JobDialog: submit a job. Validates as you type; Submit stays disabled until the request is valid.

Non-blocking: open it with ``show()`` (modeless) or ``open()`` (window-modal), never
``exec()``, which would start a nested event loop under qasync. It emits
``submitted(JobRequest)`` and closes; the caller stores the job.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from PySide6.QtCore import Signal
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from aether_desktop.services.jobspec import (
    MAX_PRIORITY,
    JobFields,
    deadline_example,
    errors_by_field,
    fields_from_request,
    parse_job,
    split_command,
)
from aether_desktop.services.jobtypes import JobRequest
from aether_desktop.widgets import theme


class JobDialog(QDialog):
    submitted = Signal(object)  # JobRequest

    def __init__(
        self,
        parent: QWidget | None = None,
        *,
        initial: JobRequest | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``initial`` pre-fills the fields from an earlier job (edit and resubmit)."""
        super().__init__(parent)
        self.setWindowTitle("Submit a job")
        self._clock = clock
        # A field's message shows once the operator has edited it, so an empty form
        # does not open covered in red.
        self._touched: set[str] = set()

        self.command = QLineEdit()
        self.command.setPlaceholderText("python train.py --epochs 3")
        self.command.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.argv_preview = QListWidget()
        self.argv_preview.setMaximumHeight(90)
        self.argv_preview.setToolTip("What the agent runs: one item per argument, no shell")
        self.gpus = QLineEdit("1")
        self.gpus.setPlaceholderText("2  or  host:0,1")
        self.mem = QLineEdit()
        self.mem.setPlaceholderText("8G, 8000M or 8000 (MiB); empty: no requirement")
        self.kind = QComboBox()
        self.kind.addItems(["training", "inference"])
        self.expected = QLineEdit("10m")
        self.expected.setPlaceholderText("90m, 2h, 1h30m or 3600")
        self.priority = QSpinBox()
        self.priority.setRange(-MAX_PRIORITY, MAX_PRIORITY)
        self.priority.setToolTip("Higher runs first")
        self.deadline = QLineEdit()
        self.deadline.setPlaceholderText(f"optional: {deadline_example(self._clock())} or +4h")
        self.env = QPlainTextEdit()
        self.env.setPlaceholderText("KEY=VALUE, one per line")
        self.env.setMaximumHeight(80)
        self.cwd = QLineEdit()
        self.cwd.setPlaceholderText("optional: absolute path on the GPU host")

        self.errors: dict[str, QLabel] = {}
        form = QFormLayout()
        rows: list[tuple[str, str, QWidget]] = [
            ("command", "Command", self.command),
            ("", "Runs as", self.argv_preview),
            ("gpus", "GPUs", self.gpus),
            ("mem", "GPU memory", self.mem),
            ("kind", "Kind", self.kind),
            ("expected", "Expected duration", self.expected),
            ("priority", "Priority", self.priority),
            ("deadline", "Finish by", self.deadline),
            ("env", "Environment", self.env),
            ("cwd", "Working directory", self.cwd),
        ]
        for name, label, widget in rows:
            if not name:
                form.addRow(label, widget)
                continue
            err = QLabel()
            err.setObjectName(f"error_{name}")
            err.setStyleSheet(f"color: {theme.CRIT};")
            err.setWordWrap(True)
            err.hide()
            self.errors[name] = err
            cell = QVBoxLayout()
            cell.setSpacing(2)
            cell.addWidget(widget)
            cell.addWidget(err)
            form.addRow(label, cell)

        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.submit_button = self.buttons.addButton("Submit", QDialogButtonBox.ButtonRole.AcceptRole)
        self.buttons.accepted.connect(self._on_submit)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.buttons)

        if initial is not None:
            self._fill(fields_from_request(initial))
        for name, line in (("command", self.command), ("gpus", self.gpus), ("mem", self.mem),
                           ("expected", self.expected), ("deadline", self.deadline), ("cwd", self.cwd)):  # fmt: skip
            line.textEdited.connect(lambda _t, n=name: self._on_edited(n))
        self.env.textChanged.connect(lambda: self._on_edited("env"))
        self.kind.currentTextChanged.connect(lambda _t: self._on_edited("kind"))
        self.priority.valueChanged.connect(lambda _v: self._on_edited("priority"))
        self._validate()

    # ------------------------------------------------------------------ state

    def fields(self) -> JobFields:
        return JobFields(
            command=self.command.text(),
            gpus=self.gpus.text(),
            mem=self.mem.text(),
            kind=self.kind.currentText(),
            expected=self.expected.text(),
            priority=str(self.priority.value()),
            deadline=self.deadline.text(),
            env=self.env.toPlainText(),
            cwd=self.cwd.text(),
        )

    def argv(self) -> list[str]:
        """The argv preview, as shown."""
        return [self.argv_preview.item(i).text() for i in range(self.argv_preview.count())]

    def _fill(self, f: JobFields) -> None:
        self.command.setText(f.command)
        self.gpus.setText(f.gpus)
        self.mem.setText(f.mem)
        self.kind.setCurrentText(f.kind)
        self.expected.setText(f.expected)
        self.priority.setValue(int(f.priority))
        self.deadline.setText(f.deadline)
        self.env.setPlainText(f.env)
        self.cwd.setText(f.cwd)
        self._touched.update(self.errors)  # a pre-filled form shows its problems at once

    # ------------------------------------------------------------------ handlers

    def _on_edited(self, name: str) -> None:
        self._touched.add(name)
        self._validate()

    def _validate(self) -> JobRequest | None:
        result = parse_job(self.fields(), now=self._clock())
        messages = {} if isinstance(result, JobRequest) else errors_by_field(result)
        for name, label in self.errors.items():
            text = messages.get(name, "") if name in self._touched else ""
            label.setText(text)
            label.setVisible(bool(text))
        self.argv_preview.clear()
        # An unsplittable command leaves the preview empty; its error label says why.
        with contextlib.suppress(ValueError):
            self.argv_preview.addItems(list(split_command(self.command.text())))
        self.submit_button.setEnabled(isinstance(result, JobRequest))
        return result if isinstance(result, JobRequest) else None

    def _on_submit(self) -> None:
        # Parsed again at this moment: "+4h" counts from the click, not from the last keystroke.
        req = self._validate()
        if req is None:
            self._touched.update(self.errors)
            self._validate()
            return
        self.submitted.emit(req)
        self.accept()
