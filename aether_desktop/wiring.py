"""Feature services plugged into the Station (alerts, jobs); shared by the window and --headless."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aether_desktop.station import Station

log = logging.getLogger("aether.wiring")


def wire_services(station: Station) -> None:
    """Attach optional services to the station. Each one registers its own listeners and DB hooks."""
    return None


def wire_gui(station: Station, state: Any, window: Any, app: Any, closing: asyncio.Event) -> None:
    """Attach the feature widgets (alerts, tray, jobs) to the window."""
    return None
