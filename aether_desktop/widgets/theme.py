"""Colours and the dark palette shared by every widget (one place to change the look)."""

from __future__ import annotations

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

# Base surfaces.
WINDOW = "#1e2127"
BASE = "#16181d"
ALT_BASE = "#1b1e24"
PANEL = "#252932"
TEXT = "#d7dae0"
MUTED = "#8a919e"
ACCENT = "#4fa3f7"
GRID = "#3a3f4b"
PLOT_BG = "#121418"

# Health colours (table text/cells, status bar).
OK = "#5cc27a"
WARN = "#e5a33b"
CRIT = "#ef5350"
SLEEPING = "#7d8590"
INFO = ACCENT

# Status bar states.
CONNECTION_COLORS: dict[str, str] = {
    "connected": OK,
    "reconnecting": WARN,
    "connecting": WARN,
    "disconnected": CRIT,
    "closed": CRIT,
}
NOTICE_COLORS: dict[str, str] = {"info": TEXT, "ok": OK, "warning": WARN, "error": CRIT}

# 16 curve colours that stay distinguishable on a dark background (Tableau-like + extras).
CURVE_COLORS: tuple[str, ...] = (
    "#4e9ff5", "#f28e2b", "#59c26e", "#e15759", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7",
    "#9c755f", "#bab0ac", "#8cd17d", "#f1ce63", "#86bcb6", "#d37295", "#a0cbe8", "#ffbe7d",
)

# Heatmap colour maps per metric (pyqtgraph built-in map names).
HEATMAP_COLORMAPS: dict[str, str] = {
    "temp_c": "inferno",
    "mem_pct": "viridis",
    "util_pct": "viridis",
    "power_w": "plasma",
}


def curve_color(i: int) -> str:
    return CURVE_COLORS[i % len(CURVE_COLORS)]


def apply_dark_palette(app: QApplication) -> None:
    """Fusion + a dark palette: consistent on every platform and easy on eyes in a control room."""
    app.setStyle("Fusion")
    pal = QPalette()
    roles = {
        QPalette.ColorRole.Window: WINDOW,
        QPalette.ColorRole.WindowText: TEXT,
        QPalette.ColorRole.Base: BASE,
        QPalette.ColorRole.AlternateBase: ALT_BASE,
        QPalette.ColorRole.ToolTipBase: PANEL,
        QPalette.ColorRole.ToolTipText: TEXT,
        QPalette.ColorRole.Text: TEXT,
        QPalette.ColorRole.Button: PANEL,
        QPalette.ColorRole.ButtonText: TEXT,
        QPalette.ColorRole.BrightText: CRIT,
        QPalette.ColorRole.Link: ACCENT,
        QPalette.ColorRole.Highlight: "#2f5d8a",
        QPalette.ColorRole.HighlightedText: "#ffffff",
        QPalette.ColorRole.PlaceholderText: MUTED,
    }
    for role, colour in roles.items():
        pal.setColor(role, QColor(colour))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        pal.setColor(QPalette.ColorGroup.Disabled, role, QColor(MUTED))
    app.setPalette(pal)
