"""Shared fixtures: real servers on free ports (integration), offscreen Qt (widgets)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

pytest_plugins = ["tests.servers"]
