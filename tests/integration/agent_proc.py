"""Start real `aether-agent` processes for integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def start_agent(url: str, host: str, *extra: str, log: Path | None = None,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "headless_agent", "--nats", url, "--host-id", host, *extra]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            cwd=str(Path(__file__).resolve().parents[2]))
    return proc


def stop_agent(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
