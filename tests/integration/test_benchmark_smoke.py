"""The storage benchmark still runs end to end (a short run; speed is never asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_store_benchmark_quick_run_reports_both_phases() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_store_ingest.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for line in ("baseline (one INSERT per sample, autocommit):", "ratio, live: stored+acked",
                 "ratio, drain: stored+acked", "stored and rolled up into telemetry_1m", "history: 16 GPUs x 24 h"):
        assert line in text, text
