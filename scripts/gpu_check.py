#!/usr/bin/env python3
"""Check the NVML backend on a real GPU host (needs only this repo, msgspec and nvidia-ml-py).

    python scripts/gpu_check.py [--ticks 5] [--interval 1.0] [--sleep-wake]

Reads every GPU ``--ticks`` times, prints each tick as protocol Telemetry JSON,
reports read() latency (p50/max), which fields NVML left null, and then sets
each GPU's power limit to the limit it already has (a no-op as root; a clear
error otherwise). ``--sleep-wake`` also drops the limits to their minimum and
restores them. Logs (NVML functions missing or unsupported) go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aether_protocol import PROTOCOL_VERSION, GpuSample, Telemetry, encode  # noqa: E402
from headless_agent.backend import BackendError  # noqa: E402
from headless_agent.nvml import NvmlBackend  # noqa: E402

_OPTIONAL = [f for f in GpuSample.__struct_fields__ if f not in ("index", "uuid", "name", "state")]


def _host_id() -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:64]
    return name or "gpu-check"


def _print_ticks(backend: NvmlBackend, ticks: int, interval: float) -> tuple[list[float], list[GpuSample]]:
    latencies_ms: list[float] = []
    samples: list[GpuSample] = []
    for seq in range(ticks):
        started = time.perf_counter()
        samples = backend.read(time.time())
        latencies_ms.append((time.perf_counter() - started) * 1000)
        msg = Telemetry(
            v=PROTOCOL_VERSION,
            host=_host_id(),
            boot="gpucheck",
            seq=seq,
            ts=time.time(),
            state="active",
            gpus=samples,
            interval_s=interval,
        )
        print(encode(msg).decode())
        if seq + 1 < ticks:
            time.sleep(interval)
    return latencies_ms, samples


def _configured_limit_w(index: int) -> float | None:
    """The configured (not enforced) limit, so that setting it back changes nothing.

    Read with pynvml directly: this is the check's own bookkeeping, not the backend's.
    """
    import pynvml  # type: ignore[import-untyped]  # NVML is already initialised by the backend

    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return float(pynvml.nvmlDeviceGetPowerManagementLimit(handle)) / 1000
    except pynvml.NVMLError as exc:
        print(f"GPU {index}: cannot read the configured power limit: {exc}")
        return None


def _check_power_limit(backend: NvmlBackend, samples: list[GpuSample], sleep_wake: bool) -> None:
    for s in samples:
        watts = _configured_limit_w(s.index)
        if watts is None:
            continue
        try:
            backend.set_power_limit([s.index], watts)
            print(f"GPU {s.index}: set_power_limit({watts:g} W) ok")
        except BackendError as exc:
            print(f"GPU {s.index}: set_power_limit refused: {exc}")
    if not sleep_wake:
        return
    try:
        backend.sleep(None)
        slept = backend.read(time.time())
        print("after sleep:", [(s.index, s.state, s.power_limit_w) for s in slept])
    except BackendError as exc:
        print(f"sleep refused: {exc}")
    try:
        backend.wake(None)
        woke = backend.read(time.time())
        print("after wake:", [(s.index, s.state, s.power_limit_w) for s in woke])
    except BackendError as exc:
        print(f"wake refused: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--read-timeout", type=float, default=0.5)
    parser.add_argument("--sleep-wake", action="store_true", help="also lower and restore every power limit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    try:
        backend = NvmlBackend(read_timeout_s=args.read_timeout)
    except BackendError as exc:
        print(f"NvmlBackend could not start: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"# {backend.gpu_count()} GPU(s)")
        latencies, samples = _print_ticks(backend, args.ticks, args.interval)
        later = latencies[1:] or latencies
        print(
            f"# read(): first {latencies[0]:.1f} ms; later p50 {statistics.median(later):.1f} ms, "
            f"max {max(later):.1f} ms"
        )
        for s in samples:
            nulls = [f for f in _OPTIONAL if getattr(s, f) is None]
            print(f"# GPU {s.index} {s.name} state={s.state} null fields: {', '.join(nulls) or 'none'}")
        _check_power_limit(backend, samples, args.sleep_wake)
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
