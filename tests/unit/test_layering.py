"""The agent runs on a headless GPU host: it must never pull in Qt, ML or database packages."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN_FOR_AGENT = ("PySide6", "pyqtgraph", "qasync", "sklearn", "xgboost", "psycopg", "numpy")
FORBIDDEN_FOR_SERVICES = ("PySide6", "pyqtgraph", "qasync")


def loaded_after(imports: str) -> set[str]:
    code = f"import sys; {imports}; print('\\n'.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_agent_imports_no_qt_ml_or_database() -> None:
    mods = loaded_after("import headless_agent.cli, headless_agent.agent, headless_agent.simulate, "
                        "headless_agent.nvml, aether_protocol")
    assert not mods & set(FORBIDDEN_FOR_AGENT), mods & set(FORBIDDEN_FOR_AGENT)


def test_station_services_and_headless_mode_import_no_qt() -> None:
    mods = loaded_after("import aether_desktop.station, aether_desktop.app, aether_desktop.services.bus, "
                        "aether_desktop.services.fleet")
    assert not mods & set(FORBIDDEN_FOR_SERVICES), mods & set(FORBIDDEN_FOR_SERVICES)
