"""Demo menu: inject a simulated fault into a GPU of a simulated agent (non-modal)."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)

from headless_agent.faults import FAULT_KINDS, parse_fault

HELP = {
    "fan_failure": "cooling degrades: temperature climbs at constant power",
    "thermal_runaway": "temperature climbs fast, then hardware thermal throttling",
    "memory_leak": "memory grows with no process to account for it",
    "power_spikes": "short power jumps far above what utilisation explains",
    "stuck_sensor": "the temperature reading freezes",
    "xid_storm": "repeated XID errors (default 79: GPU fell off the bus)",
    "gpu_lost": "the GPU stops answering (state lost)",
    "ecc_errors": "double-bit ECC errors accumulate",
}


class FaultDialog(QDialog):
    """Emits ``inject(host, spec)``; the window sends it as an ``inject_fault`` command."""

    inject = Signal(str, str)

    def __init__(self, hosts: list[str], host: str | None = None, gpu: int = 0,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Inject a simulated fault")
        self.host_combo = QComboBox()
        self.host_combo.addItems(hosts)
        if host in hosts:
            self.host_combo.setCurrentText(host)
        self.gpu_spin = QSpinBox()
        self.gpu_spin.setRange(0, 63)
        self.gpu_spin.setValue(gpu)
        self.kind_combo = QComboBox()
        self.kind_combo.addItems(list(FAULT_KINDS))
        self.params_edit = QLineEdit()
        self.params_edit.setPlaceholderText("optional, e.g. code=48 or rate=2,duration=120")
        self.help_label = QLabel()
        self.help_label.setWordWrap(True)
        self.error_label = QLabel()
        self.error_label.setStyleSheet("color: #e5534b")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Inject")
        form = QFormLayout(self)
        form.addRow("Host", self.host_combo)
        form.addRow("GPU", self.gpu_spin)
        form.addRow("Fault", self.kind_combo)
        form.addRow("Parameters", self.params_edit)
        form.addRow(self.help_label)
        form.addRow(self.error_label)
        form.addRow(self.buttons)
        self.kind_combo.currentTextChanged.connect(self._on_changed)
        self.params_edit.textChanged.connect(self._on_changed)
        self.gpu_spin.valueChanged.connect(self._on_changed)
        self.buttons.accepted.connect(self._on_accept)
        self.buttons.rejected.connect(self.reject)
        self._on_changed()

    def spec(self) -> str:
        extra = self.params_edit.text().strip().strip(",")
        spec = f"{self.kind_combo.currentText()}:gpu={self.gpu_spin.value()}"
        return f"{spec},{extra}" if extra else spec

    def _on_changed(self) -> None:
        self.help_label.setText(HELP.get(self.kind_combo.currentText(), ""))
        try:
            parse_fault(self.spec())
        except ValueError as exc:
            self.error_label.setText(str(exc))
            self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(False)
            return
        self.error_label.setText("")
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(bool(self.host_combo.currentText()))

    def _on_accept(self) -> None:
        self.inject.emit(self.host_combo.currentText(), self.spec())
        self.accept()
