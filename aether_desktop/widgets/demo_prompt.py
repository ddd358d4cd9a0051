"""First-run banner: no agent has reported yet, offer the demo fleet (non-modal)."""

from __future__ import annotations

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QMessageBox, QPushButton, QWidget

from aether_desktop.widgets import theme
from aether_desktop.widgets.state import QtState

CONNECT_HELP = (
    "<p>Run the headless agent (<code>aether-agent</code>) on each GPU host and point it at this "
    "station's NATS server. <code>aether connect-info</code> prints the exact command with the embedded "
    "server's URL and generated credentials (start the station with <code>--listen 0.0.0.0</code> for "
    "agents on other machines); <code>aether-agent --help</code> lists every option.</p>"
    "<p>Without GPUs: <code>aether-agent --simulate 4 --nats URL</code>.</p>"
    "<p>A host appears in the fleet table with its first telemetry message, within a few seconds.</p>"
)


class DemoPrompt(QFrame):
    """Shown after ``delay_s`` with no reporting host while demo mode is off; hides once any host reports."""

    start_demo_requested = Signal()

    def __init__(self, state: QtState, delay_s: float = 5.0, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self._dismissed = False
        self.setObjectName("demoPrompt")
        self.setStyleSheet(
            f"#demoPrompt {{ background: {theme.PANEL}; border: 1px solid {theme.ACCENT}; border-radius: 4px; }}"
        )
        self.message = QLabel("No GPU agents are reporting.")
        self.start_button = QPushButton("Start demo fleet")
        self.help_button = QPushButton("How to connect an agent")
        self.dismiss_button = QPushButton("✕")
        self.dismiss_button.setFlat(True)
        self.dismiss_button.setToolTip("Hide this message")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 6, 6, 6)
        layout.addWidget(self.message, 1)
        layout.addWidget(self.start_button)
        layout.addWidget(self.help_button)
        layout.addWidget(self.dismiss_button)
        self.setVisible(False)
        self._help: QMessageBox | None = None

        # A child timer, not QTimer.singleShot: it dies with the banner.
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(delay_s * 1000))
        self._timer.timeout.connect(self._on_timeout)

        self.start_button.clicked.connect(self._on_start_clicked)
        self.help_button.clicked.connect(self._on_help_clicked)
        self.dismiss_button.clicked.connect(self._on_dismiss_clicked)
        state.fleet_tick.connect(self._on_fleet_tick)
        state.demo_changed.connect(self._on_demo_changed)
        self._timer.start()

    def should_show(self) -> bool:
        return not self._dismissed and not self._state.demo_active and self._state.fleet.n_hosts == 0

    def check(self) -> None:
        """Show or hide according to the fleet (the delay timer calls this)."""
        self.setVisible(self.should_show())

    def _on_timeout(self) -> None:
        self.check()

    def _on_fleet_tick(self) -> None:
        if self.isVisible() and not self.should_show():
            self.setVisible(False)

    def _on_demo_changed(self, active: bool) -> None:
        if active:
            self.setVisible(False)

    def _on_start_clicked(self) -> None:
        self.message.setText("Starting the demo fleet…")
        self.start_button.setEnabled(False)
        self.start_demo_requested.emit()

    def _on_help_clicked(self) -> None:
        if self._help is None:
            box = QMessageBox(self)
            box.setWindowTitle("Connect a GPU agent")
            box.setIcon(QMessageBox.Icon.Information)
            box.setText(CONNECT_HELP)
            box.setStandardButtons(QMessageBox.StandardButton.Close)
            self._help = box
        self._help.open()  # non-modal to the app's event loop: never exec()

    def _on_dismiss_clicked(self) -> None:
        self._dismissed = True
        self.setVisible(False)
