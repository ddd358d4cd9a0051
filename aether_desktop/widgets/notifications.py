"""In-window notifications: the tray's toasts where no system tray exists (offscreen, some desktops).

A small stack of toasts, newest at the bottom, each fading out after a while;
a click on a toast emits ``clicked(host, gpu, ts)`` like a click on the tray
balloon, so both paths focus the same GPU.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QMouseEvent
from PySide6.QtWidgets import QFrame, QLabel, QVBoxLayout, QWidget

LEVEL_COLOURS = {"critical": "#d64541", "warning": "#e0a030", "info": "#5b8def", "ok": "#3fa34d"}
MAX_TOASTS = 4


class Toast(QFrame):
    clicked = Signal()

    def __init__(self, title: str, text: str, level: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        colour = LEVEL_COLOURS.get(level, "#888888")
        self.setObjectName("toast")
        self.setStyleSheet(f"#toast {{ border-left: 4px solid {colour}; background: palette(base); "
                           "border-radius: 4px; padding: 4px; }")
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self.title = QLabel(f"<b>{title}</b>")
        self.body = QLabel(text)
        self.body.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 4, 8, 4)
        lay.addWidget(self.title)
        lay.addWidget(self.body)

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        self.clicked.emit()
        super().mousePressEvent(event)


class NotificationArea(QWidget):
    """Stack of toasts; put it in a corner of the main window (it sizes to its contents)."""

    clicked = Signal(str, int, float)  # host, gpu, ts

    def __init__(self, timeout_ms: int = 8000, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._timeout_ms = timeout_ms
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.addStretch(1)
        self._toasts: list[Toast] = []
        self.setMaximumWidth(420)

    def toasts(self) -> list[Toast]:
        return list(self._toasts)

    def show_toast(self, title: str, text: str, level: str = "info",
                   target: tuple[str, int, float] | None = None) -> Toast:
        toast = Toast(title, text, level, self)
        if target is not None:
            host, gpu, ts = target
            toast.clicked.connect(lambda: self.clicked.emit(host, gpu, ts))
        toast.clicked.connect(lambda: self._dismiss(toast))
        self._layout.addWidget(toast)
        self._toasts.append(toast)
        while len(self._toasts) > MAX_TOASTS:
            self._dismiss(self._toasts[0])
        timer = QTimer(toast)
        timer.setSingleShot(True)
        timer.timeout.connect(lambda: self._dismiss(toast))
        timer.start(self._timeout_ms)
        self.show()
        self._place()
        return toast

    def _place(self) -> None:
        """Bottom-right corner of the parent, above its content, clear of the tabs and the menus."""
        parent = self.parentWidget()
        self.adjustSize()
        if parent is None:
            return
        width = min(self.maximumWidth(), max(300, self.sizeHint().width()))
        height = self.sizeHint().height()
        margin = 16
        self.setGeometry(parent.width() - width - margin, parent.height() - height - margin, width, height)
        self.raise_()

    def _dismiss(self, toast: Toast) -> None:
        if toast in self._toasts:
            self._toasts.remove(toast)
            self._layout.removeWidget(toast)
            toast.hide()
            toast.deleteLater()
        if not self._toasts:
            self.hide()
        else:
            self._place()
