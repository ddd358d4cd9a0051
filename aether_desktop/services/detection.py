"""The detection pipeline: rules + batched anomaly model + alert lifecycle, once per tick.

The station hands it every decoded telemetry message (``add``, cheap: it only
queues) and calls ``tick`` once per second; ``aether detect`` and the
evaluation drive the very same object from a recording (``run_offline``), so
what is measured is what runs.

Per tick: the rules look at every new GPU sample; the feature extractor
advances every GPU that reported; all valid feature rows of the fleet are
scored in one batched call; findings go through the alert manager's
hysteresis and grouping; the resulting changes are returned (and emitted to
the manager's listeners).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aether_desktop.services.alerts import (
    Alert,
    AlertChange,
    AlertManager,
    AlertPolicy,
    Callbacks,
)
from aether_desktop.services.alerts_store import AlertRepository, AlertWriter
from aether_desktop.services.anomaly import (
    AnomalyModel,
    ModelStore,
    describe,
    ensure_model,
    load_history_ticks,
    retrain_async,
)
from aether_desktop.services.features import FEATURE_KIND, FEATURE_NAMES, Columns, FeatureExtractor
from aether_desktop.services.rules import Finding, RuleEngine, RulesConfig
from aether_protocol import GpuSample, Telemetry

log = logging.getLogger("aether.detection")
_F = {n: i for i, n in enumerate(FEATURE_NAMES)}


@dataclass
class DetectionStats:
    messages: int = 0
    stale_dropped: int = 0  # duplicates and out-of-order messages (older than one already processed)
    clock_resets: int = 0  # a host's clock went back (a new boot or a step): its ordering restarted
    samples: int = 0
    scored: int = 0
    anomalous: int = 0
    last_tick_ms: float = 0.0


class DetectionPipeline:
    """Rules + model + lifecycle. Not thread-safe: call from the event loop only."""

    def __init__(self, model: AnomalyModel | None, rules: RulesConfig | None = None,
                 policy: AlertPolicy | None = None, manager: AlertManager | None = None) -> None:
        self.model = model
        self.rules = RuleEngine(rules)
        self.manager = manager or AlertManager(policy)
        self.features = FeatureExtractor(model.params if model else None)
        self.stats = DetectionStats()
        self._pending: list[Telemetry] = []
        self._pending_lock = threading.Lock()
        self._order: dict[str, tuple[str, int, float]] = {}  # host -> (boot, seq, ts) of the newest message
        self._flagged = np.zeros(0, dtype=bool)
        self.scores: dict[tuple[str, int], float] = {}  # latest model score per GPU (for the UI)

    def set_model(self, model: AnomalyModel) -> None:
        """Swap in a retrained model; per-GPU feature state carries over."""
        self.model = model
        self.features.set_params(model.params)

    def add(self, msg: Telemetry) -> None:
        with self._pending_lock:  # the tick may be swapping the queue in a worker thread
            self._pending.append(msg)

    def tick(self, now: float, emit: bool = True) -> list[AlertChange]:
        """Process everything added since the last tick; ``emit=False``: see ``AlertManager.update``."""
        t0 = time.perf_counter()
        with self._pending_lock:
            msgs, self._pending = self._pending, []
        by_host: dict[str, list[Telemetry]] = {}
        for m in sorted(msgs, key=lambda m: m.ts):
            if self._accept(m):
                by_host.setdefault(m.host, []).append(m)
        self.stats.messages += len(msgs)
        findings: list[Finding] = []
        seen: dict[tuple[str, int], list[float]] = {}  # every sample, so each one counts in k-of-n
        feats: list[np.ndarray] = []
        cols: list[tuple[Columns, np.ndarray, list[tuple[str, float, GpuSample]]]] = []
        # A backlog (catch-up after an outage) is replayed sample by sample per GPU,
        # in rounds, so every GPU's windows see its samples in order.
        rounds = max((len(v) for v in by_host.values()), default=0)
        for r in range(rounds):
            rows: list[tuple[str, float, GpuSample]] = []
            for host, ms in by_host.items():
                if r >= len(ms):
                    continue
                m = ms[r]
                for g in m.gpus:
                    self.stats.samples += 1
                    findings.extend(self.rules.check(host, m.ts, g))
                    seen.setdefault((host, g.index), []).append(m.ts)
                    if g.state == "ok" and m.state == "active":
                        rows.append((host, m.ts, g))
            if rows and self.model is not None:
                c = self.features.columns(rows)
                self._grow(int(c.slot.max()) + 1)
                f, valid = self.features.update(c, learn=~self._flagged[c.slot])
                idx = np.nonzero(valid)[0]
                self._flagged[c.slot[~valid]] = False
                if len(idx):
                    feats.append(f[idx])
                    cols.append((c, idx, rows))
        if feats and self.model is not None:
            findings.extend(self._score(np.concatenate(feats), cols))
        findings.sort(key=lambda f: f.ts)  # stable: per-GPU sample order is kept
        changes = self.manager.update(now, seen, findings, emit=emit)
        self.stats.last_tick_ms = (time.perf_counter() - t0) * 1000.0
        return changes

    def _accept(self, m: Telemetry) -> bool:
        """Whether ``m`` is news for its host; a clock that went back restarts the host's ordering.

        A new boot starts its own order whatever its clock says. Within one boot
        ``seq`` only grows, so a message with a higher ``seq`` but an earlier ``ts``
        means the agent's clock stepped back (an NTP step): it is taken and the
        order restarts from it (dropping it would blind detection for that host
        until the new clock caught up with the old one). A message no newer by
        either is a duplicate or a late redelivery and is dropped.
        """
        last = self._order.get(m.host)
        if last is not None and m.ts <= last[2]:
            boot, seq, ts = last
            if m.boot == boot and m.seq <= seq:
                self.stats.stale_dropped += 1
                return False
            self.stats.clock_resets += 1
            if m.boot == boot:
                log.warning("%s: clock stepped back %.1f s (seq %d -> %d); restarting its sample order",
                            m.host, ts - m.ts, seq, m.seq)
            else:
                log.info("%s: new boot %s with a clock %.1f s behind the last one; restarting its sample order",
                         m.host, m.boot, ts - m.ts)
            self.manager.rebase_host(m.host, m.ts)
        self._order[m.host] = (m.boot, m.seq, m.ts)
        return True

    def _grow(self, n: int) -> None:
        if n > len(self._flagged):
            new = np.zeros(max(n, 2 * len(self._flagged)), dtype=bool)
            new[: len(self._flagged)] = self._flagged
            self._flagged = new

    def _score(self, x: np.ndarray, cols: list[tuple[Columns, np.ndarray, list[tuple[str, float, GpuSample]]]]
               ) -> list[Finding]:
        assert self.model is not None
        model = self.model
        names = [rows[i][2].name for _, idx, rows in cols for i in idx]
        group = np.array([model.group_of(n) for n in names], dtype=np.int64)
        score, thr = model.score(x, group)  # the one batched call for the whole fleet
        bad = score > thr
        self.stats.scored += len(x)
        self.stats.anomalous += int(bad.sum())
        culprit = model.explain(x)
        out: list[Finding] = []
        k = 0
        for c, idx, rows in cols:
            n = len(idx)
            self._flagged[c.slot[idx]] = bad[k:k + n]
            for j in range(n):
                host, ts, g = rows[idx[j]]
                self.scores[(host, g.index)] = float(score[k + j])
                if bad[k + j]:
                    fi = int(culprit[k + j])
                    out.append(Finding(host, g.index, ts, "model", FEATURE_KIND[fi], "warning", "model",
                                       float(score[k + j]), _message(fi, x[k + j], g)))
            k += n
        return out


def _message(fi: int, f: np.ndarray, g: GpuSample) -> str:
    """Say what the features say, in the operator's units."""
    kind = FEATURE_KIND[fi]
    t = f"{g.temp_c:.0f} C" if g.temp_c is not None else "n/a"
    p = f"{g.power_w:.0f} W" if g.power_w is not None else "n/a"
    if FEATURE_NAMES[fi] == "flat_span":
        return (f"temperature reads {t} unchanged while the load says it should have moved "
                f"{f[_F['flat_span']]:.1f} C: is the sensor stuck?")
    if kind == "thermal_anomaly":
        return (f"{t} is {f[_F['temp_resid']]:+.1f} C off what {p} predicts for this GPU "
                f"(trend {f[_F['temp_trend']]:+.1f} C/min at this power): cooling failing or heat source?")
    if kind == "power_anomaly":
        return (f"power {p} is {f[_F['power_excess']] * 100:+.0f} % of range above what "
                f"{g.util_pct or 0:.0f} % utilisation explains: power spikes?")
    if kind == "memory_leak":
        return (f"memory grows {max(f[_F['mem_growth']], f[_F['unattributed_growth']]) * 60:.0f} MiB/min with no "
                f"new process ({g.mem_used_mib or 0:.0f} MiB used): a leak?")
    return (f"SM clock {g.sm_clock_mhz or 0:.0f} MHz is {f[_F['clock_deficit']] * 100:.0f} % below maximum at "
            f"{t}, {f[_F['headroom']]:.0f} C below slowdown: unexpected throttling")


def run_offline(pipeline: DetectionPipeline, messages: Iterable[Telemetry], tick_s: float = 1.0
                ) -> list[AlertChange]:
    """Drive the pipeline from a recording as the station would live: one tick per ``tick_s`` of sample time."""
    changes: list[AlertChange] = []
    next_tick: float | None = None
    for m in messages:
        if next_tick is None:
            next_tick = math.floor(m.ts / tick_s) * tick_s + tick_s
        if m.ts >= next_tick:
            changes.extend(pipeline.tick(next_tick))
            # Jump over silence instead of ticking through it one second at a time.
            next_tick = max(next_tick + tick_s, math.floor(m.ts / tick_s) * tick_s + tick_s)
        pipeline.add(m)
    if next_tick is not None:
        changes.extend(pipeline.tick(next_tick))
    return changes


class AlertsRuntime:
    """Station glue (no Qt): model on first start, 1 Hz ticks off the loop, persistence, retraining.

    ``start()`` loads the newest model (or bootstraps one) in a worker thread;
    until then the rules run alone. Ticks run in a single worker thread so a
    big fleet never stalls the UI; alert callbacks are emitted back on the loop.
    ``open_db(store)`` restores open alerts, loads recent history for the panel
    and starts the write-behind writer. The writer listens from the start, so
    alerts raised while the database is still starting are stored once it opens.
    """

    HISTORY_S = 24 * 3600.0  # cleared alerts shown in the panel after a restart
    HISTORY_LIMIT = 500

    def __init__(self, model_dir: Path, tick_s: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.store = ModelStore(model_dir)
        self.pipeline = DetectionPipeline(None)
        self.tick_s = tick_s
        self._clock = clock
        self._pool: Any = None
        # Queues from the first alert (bounded); writes once open_db gives it the database.
        self._writer = AlertWriter(None, self.manager, lambda: self.pipeline.model.version
                                   if self.pipeline.model else None)
        self._writer_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aether-detect")
        self.history: list[Alert] = []  # recent alerts loaded from the database (for the panel)
        self.on_history: Callbacks[list[Alert]] = Callbacks()
        self.on_model_info: Callbacks[str] = Callbacks()
        self.on_progress: Callbacks[tuple[float, str]] = Callbacks()  # called from worker threads

    @property
    def manager(self) -> AlertManager:
        return self.pipeline.manager

    def on_telemetry(self, msg: Telemetry, _received_at: float = 0.0) -> None:
        self.pipeline.add(msg)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._ticks(), name="alerts-tick"))
        model = await loop.run_in_executor(None, ensure_model, self.store, self._progress)
        self._adopt(model)

    async def open_db(self, store: Any) -> None:
        import psycopg

        self._pool = store.pool
        repo = AlertRepository(self._pool)
        now = self._clock()
        self.manager.restore(await repo.load_open(), now)
        self._writer_task = asyncio.create_task(self._writer.run(repo), name="alerts-writer")
        self._tasks.append(self._writer_task)
        try:
            self.history = await repo.recent(since=now - self.HISTORY_S, limit=self.HISTORY_LIMIT)
        except psycopg.Error as exc:
            log.warning("recent alerts could not be loaded (%s); the panel shows this session's only", exc)
            return
        self.on_history.emit(self.history)

    async def retrain(self, hours: float = 24.0) -> AnomalyModel:
        """Retrain on the last ``hours`` of stored telemetry; GPUs under an alert are left out."""
        if self._pool is None or self.pipeline.model is None:
            raise RuntimeError("retraining needs the history database and a loaded model")
        end = self._clock()
        start = end - hours * 3600.0
        ticks = await load_history_ticks(self._pool, start, end)
        alerts = await AlertRepository(self._pool).recent(since=start, limit=100_000)
        windows = [(a.host, set(a.gpus), a.first_ts - 60.0, (a.cleared_ts or end) + 60.0) for a in alerts]

        def exclude(host: str, gpu: int, ts: float) -> bool:
            return any(h == host and gpu in g and lo <= ts <= hi for h, g, lo, hi in windows)

        model = await retrain_async(ticks, self.pipeline.model, self.store, self._progress, exclude)
        self._adopt(model)
        await AlertRepository(self._pool).save_model_info(model.info)
        return model

    async def stop(self) -> None:
        if self._writer_task is not None:
            try:
                await asyncio.wait_for(self._writer.flush(), 5.0)
            except TimeoutError:
                log.warning("some alert changes were not stored before shutdown")
        for t in self._tasks:
            t.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _adopt(self, model: AnomalyModel) -> None:
        self.pipeline.set_model(model)
        self.on_model_info.emit(describe(model))

    def _progress(self, fraction: float, stage: str) -> None:
        self.on_progress.emit((fraction, stage))

    async def _ticks(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self._clock()
            await asyncio.sleep(self.tick_s - now % self.tick_s)
            try:
                changes = await loop.run_in_executor(self._executor, lambda: self.pipeline.tick(self._clock(),
                                                                                                 emit=False))
            except (ValueError, IndexError, FloatingPointError) as exc:
                log.exception("detection tick failed (%s); the next tick tries again", exc)
                continue
            self.manager.emit(changes)
