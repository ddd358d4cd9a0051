"""Render path of the main window vs. a naive one-curve-per-GPU, redraw-per-message baseline.

Per fleet size (256 and 1,024 GPUs, 8 per host, 600 s of history) it measures:

* Aether: one frame = heatmap ImageItem update + table dataChanged (visible rows)
  + 16 live curves + status bar, then painting: by default the repaint Qt
  does itself for what changed (``processEvents``); ``BENCH_PAINT=grab``
  repaints the whole window every frame instead (an upper bound).
  Frames are coalesced by QtState to at most 10 per second, whatever the
  message rate; one second of telemetry also pays ``FleetState.ingest`` for
  every message.
* Naive: one PlotDataItem per GPU in one PlotWidget, and every arriving host
  message updates its 8 curves and repaints. One second of telemetry is one
  repaint per host, so it is measured on a few messages and scaled.

Offscreen, about half a minute:  python benchmarks/bench_render.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyqtgraph as pg  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from aether_desktop.services.fleet import FleetState  # noqa: E402
from aether_desktop.widgets.state import QtState  # noqa: E402
from aether_protocol.messages import GpuSample, Telemetry  # noqa: E402

HISTORY_S = 600
FPS = 10
FRAMES = 20
NAIVE_MESSAGES = 6
SIZES = (256, 1024)
PAINT = os.environ.get("BENCH_PAINT", "events")  # "events": Qt repaints what changed; "grab": whole window


class NoCommands:
    async def send(self, host: str, op: str, gpus: list[int] | None = None, **fields: object) -> tuple[bool, str]:
        return True, "ok"


def messages(n_gpus: int, second: int, t0: float) -> list[Telemetry]:
    out = []
    for h in range(n_gpus // 8):
        phase = (second + 17 * h) / 60.0
        gpus = [
            GpuSample(index=i, uuid=f"GPU-{h}-{i}", name="NVIDIA H100 80GB HBM3", state="ok",
                      temp_c=50 + 20 * np.sin(phase + i), mem_used_mib=40000.0 + 100 * i, mem_total_mib=81559.0,
                      util_pct=50 + 40 * np.cos(phase + i), power_w=300 + 200 * np.sin(phase),
                      power_limit_w=700.0)
            for i in range(8)
        ]
        out.append(Telemetry(v=1, host=f"node-{h:04d}", boot="b", seq=second, ts=t0 + second, state="active",
                             gpus=gpus, interval_s=1.0))
    return out


def bench_aether(app: QApplication, n_gpus: int) -> dict[str, float]:
    from aether_desktop.widgets.main_window import MainWindow

    t0 = time.time() - HISTORY_S
    fleet = FleetState(history_s=HISTORY_S)
    for s in range(HISTORY_S):
        for m in messages(n_gpus, s, t0):
            fleet.ingest(m, m.ts)
    now = {"t": t0 + HISTORY_S - 1}
    state = QtState(fleet, clock=lambda: now["t"], start=False)
    w = MainWindow(state, NoCommands(), None)
    w.resize(1500, 900)
    w.show()
    state.tick_now()
    w.table.select_keys(fleet.keys()[:16])
    app.processEvents()

    # Messages of the next seconds, spread over the frames as they would arrive.
    live = [m for s in range(HISTORY_S, HISTORY_S + 2) for m in messages(n_gpus, s, t0)]
    per_frame = len(live) // (2 * FPS)
    ingest_s = 0.0
    parts: dict[str, list[float]] = {"heatmap": [], "table": [], "plots": [], "paint": [], "frame": []}
    for f in range(FRAMES):
        now["t"] += 1.0 / FPS
        t = time.perf_counter()
        for m in live[f * per_frame : (f + 1) * per_frame]:
            fleet.ingest(m, now["t"])
        ingest_s += time.perf_counter() - t
        t_a = time.perf_counter()
        w.heatmap.refresh()
        t_b = time.perf_counter()
        w.table.refresh()
        t_c = time.perf_counter()
        w.plots.refresh()
        w.status.refresh()
        t_d = time.perf_counter()
        w.grab() if PAINT == "grab" else app.processEvents()
        t_e = time.perf_counter()
        if f >= 2:  # first frames warm caches
            parts["heatmap"].append(t_b - t_a)
            parts["table"].append(t_c - t_b)
            parts["plots"].append(t_d - t_c)
            parts["paint"].append(t_e - t_d)
            parts["frame"].append(t_e - t_a)
    w.close()
    w.deleteLater()
    state.stop()
    app.processEvents()
    res = {k: statistics.fmean(v) for k, v in parts.items()}
    res["ingest_per_s"] = ingest_s * FPS / FRAMES
    res["per_second"] = ingest_s + FPS * res["frame"]
    return res


def bench_naive(app: QApplication, n_gpus: int) -> dict[str, float]:
    pw = pg.PlotWidget(axisItems={"bottom": pg.DateAxisItem()})
    pw.resize(1500, 900)
    pw.show()
    t0 = time.time() - HISTORY_S
    ts = t0 + np.arange(HISTORY_S, dtype=np.float64)
    hist = np.random.default_rng(0).uniform(30, 80, (n_gpus, HISTORY_S))
    curves = [pw.plot(ts, hist[i], pen=pg.intColor(i, n_gpus)) for i in range(n_gpus)]
    pw.grab()
    times = []
    for m in messages(n_gpus, HISTORY_S, t0)[: NAIVE_MESSAGES + 1]:
        t = time.perf_counter()
        h = int(m.host.split("-")[1])
        for g in m.gpus:
            r = h * 8 + g.index
            hist[r, :-1] = hist[r, 1:]
            hist[r, -1] = g.temp_c or np.nan
            curves[r].setData(ts + 1, hist[r])
        pw.grab() if PAINT == "grab" else app.processEvents()
        times.append(time.perf_counter() - t)
    pw.close()
    pw.deleteLater()
    app.processEvents()
    per_msg = statistics.median(times[1:])
    return {"per_message": per_msg, "per_second": per_msg * (n_gpus // 8)}


def main() -> int:
    app = QApplication.instance() or QApplication([])
    assert isinstance(app, QApplication)
    print(f"offscreen, {HISTORY_S} s history, 8 GPUs/host, 1 msg/host/s; frames coalesced to {FPS}/s, paint={PAINT}")
    for n in SIZES:
        a = bench_aether(app, n)
        b = bench_naive(app, n)
        print(f"\n{n} GPUs")
        print(f"  aether frame {a['frame'] * 1e3:7.1f} ms  (heatmap {a['heatmap'] * 1e3:.1f}, table "
              f"{a['table'] * 1e3:.1f}, 16 curves+status {a['plots'] * 1e3:.1f}, paint {a['paint'] * 1e3:.1f})")
        print(f"  aether ingest of one second of telemetry {a['ingest_per_s'] * 1e3:.1f} ms")
        print(f"  naive redraw per message {b['per_message'] * 1e3:7.1f} ms")
        print(f"  UI time per second of telemetry: aether {a['per_second']:.3f} s, naive {b['per_second']:.3f} s"
              f"  -> naive/aether = {b['per_second'] / a['per_second']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
