"""Detection quality and speed on labelled simulated scenarios, beside two baselines.

    python -m benchmarks.eval_detection            # full: > 1 GPU-week of normal data, every fault kind
    python -m benchmarks.eval_detection --quick    # CI size

Scenarios come from the agent's simulated backend and fault injector (ground
truth = each fault's [onset, end)). Every detector is run through the same
alert lifecycle (k-of-n hysteresis, quiet period, per-host grouping), so the
comparison is about what each detector flags:

* aether    - the station's DetectionPipeline (health rules + IsolationForest on
              relational features, threshold from validation), bootstrapped
              exactly as on first start (different simulator seeds than here);
* temp85    - a fixed 85 C threshold;
* iforest2  - IsolationForest on (temp_c, mem_used_mib), contamination 0.05.

Event-level scoring: a fault is detected when an alert on its GPU is raised
(or the GPU joins a host alert) between onset and end + grace; any other alert
is a false alert. Delay = station time of that alert minus onset.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from aether_desktop.services.alerts import AlertChange, AlertManager
from aether_desktop.services.anomaly import AnomalyModel, bootstrap
from aether_desktop.services.detection import DetectionPipeline
from aether_desktop.services.features import FeatureExtractor
from aether_desktop.services.rules import Finding
from aether_protocol import Telemetry
from headless_agent.faults import FAULT_KINDS, parse_fault
from headless_agent.simulate import SimulatedBackend

GRACE_S = 60.0
START = 1.75e9
GPUS_PER_HOST = 8


@dataclass
class Host:
    name: str
    backend: SimulatedBackend
    faults: list[tuple[int, str, float, float]]  # (gpu, kind, onset, end)


@dataclass
class Result:
    name: str
    raised: list[tuple[str, int, float, str]] = field(default_factory=list)  # host, gpu, station ts, kind


def build(quick: bool, seed: int) -> tuple[list[Host], float, int]:
    """Fault hosts (each kind on a few GPUs) and normal hosts; returns (hosts, duration, normal GPU count)."""
    reps = 1 if quick else 3
    fault_len = 600.0
    onset = 600.0
    duration = 1500 if quick else 3600
    hosts: list[Host] = []
    for k, kind in enumerate(FAULT_KINDS):
        for r in range(reps):
            gpu = (k + 3 * r) % GPUS_PER_HOST
            dur = 120.0 if kind == "gpu_lost" else fault_len
            spec = f"{kind}:gpu={gpu},at={onset:g},duration={dur:g}"
            name = f"f{k}-{r}"
            parse_fault(spec)
            b = SimulatedBackend(GPUS_PER_HOST, seed=seed + 10 * r + k, host=name, faults=[spec], start_ts=START)
            hosts.append(Host(name, b, [(gpu, kind, START + onset, START + onset + dur)]))
    # Normal operation: busy/idle mix from the background load, plus a host kept idle.
    n_normal = 1 if quick else 7
    normal_s = duration
    for h in range(n_normal):
        name = f"n{h}"
        # Mixed boards too: the first-start model must not cry wolf on an L4 or an A100.
        model = ("H100", "A100-80GB,L4", "H200,RTX4090", "A100-40GB")[h % 4]
        hosts.append(Host(name, SimulatedBackend(GPUS_PER_HOST, seed=seed + 500 + h, host=name, start_ts=START,
                                                 model=model, background_load=(h % 4 != 3)), []))
    return hosts, float(normal_s), n_normal * GPUS_PER_HOST


def run_scenario(hosts: Sequence[Host], seconds: int, model: AnomalyModel,
                 baseline_if: object) -> tuple[list[Result], float, int]:
    """One pass over the data: the pipeline and both baselines see the same samples."""
    pipe = DetectionPipeline(model)
    base_mgrs = {"temp85": AlertManager(), "iforest2": AlertManager()}
    results = {n: Result(n) for n in ("aether", *base_mgrs)}
    spent = 0.0
    samples = 0

    def record(res: Result, changes: list[AlertChange]) -> None:
        for ch in changes:
            if ch.change == "raised" or (ch.change == "updated" and ch.new_gpus):
                for g in ch.new_gpus:
                    res.raised.append((ch.alert.host, g, ch.alert.last_ts, ch.alert.kind))

    for i in range(seconds):
        ts = START + i
        msgs = [Telemetry(v=1, host=h.name, boot="b", seq=i, ts=ts, state="active", gpus=h.backend.read(ts))
                for h in hosts]
        t0 = time.perf_counter()
        for m in msgs:
            pipe.add(m)
        record(results["aether"], pipe.tick(ts + 0.5))
        spent += time.perf_counter() - t0
        samples += sum(len(m.gpus) for m in msgs)
        rows = [(m.host, g) for m in msgs for g in m.gpus if g.state == "ok"]
        seen = {(m.host, g.index): ts for m in msgs for g in m.gpus}
        temps = np.array([g.temp_c or 0.0 for _, g in rows])
        mems = np.array([g.mem_used_mib or 0.0 for _, g in rows])
        hot = [Finding(h, g.index, ts, "temp85", "over_85c", "warning", "rule", t, "")
               for (h, g), t in zip(rows, temps, strict=True) if t >= 85.0]
        record(results["temp85"], base_mgrs["temp85"].update(ts + 0.5, seen, hot))
        pred = baseline_if.predict(np.stack([temps, mems], axis=1))  # type: ignore[attr-defined]
        odd = [Finding(h, g.index, ts, "iforest2", "anomaly", "warning", "model", 1.0, "")
               for (h, g), p in zip(rows, pred, strict=True) if p < 0]
        record(results["iforest2"], base_mgrs["iforest2"].update(ts + 0.5, seen, odd))
    return list(results.values()), spent, samples


def score(res: Result, hosts: Sequence[Host], seconds: int) -> dict[str, float]:
    faults = [(h.name, g, kind, on, end) for h in hosts for g, kind, on, end in h.faults]
    detected: dict[int, float] = {}
    false = 0
    false_list: list[str] = []
    for host, gpu, ts, kind in res.raised:
        hit = [i for i, (fh, fg, _, on, end) in enumerate(faults)
               if fh == host and fg == gpu and on <= ts <= end + GRACE_S]
        if hit:
            for i in hit:
                detected.setdefault(i, ts - faults[i][3])
        else:
            false += 1
            false_list.append(f"{kind}@{host}/{gpu}+{ts - START:.0f}s")
    tp_alerts = len(res.raised) - false
    precision = tp_alerts / len(res.raised) if res.raised else 0.0
    recall = len(detected) / len(faults) if faults else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total_gpu_s = len(hosts) * GPUS_PER_HOST * seconds
    fault_gpu_s = sum(end - on + GRACE_S for *_, on, end in faults)
    normal_weeks = (total_gpu_s - fault_gpu_s) / (7 * 24 * 3600)
    delays = list(detected.values())
    per_kind = {}
    for kind in FAULT_KINDS:
        idx = [i for i, f in enumerate(faults) if f[2] == kind]
        d = [detected[i] for i in idx if i in detected]
        per_kind[kind] = (len(d), len(idx), statistics.median(d) if d else float("nan"))
    return {"precision": precision, "recall": recall, "f1": f1,
            "median_delay_s": statistics.median(delays) if delays else float("nan"),
            "false_alerts": float(false), "false_per_gpu_week": false / normal_weeks, "normal_gpu_weeks": normal_weeks,
            "alerts": float(len(res.raised)), "per_kind": per_kind, "false_list": false_list}  # type: ignore[dict-item]


def train_baseline_if(seed: int) -> object:
    """The original design: IsolationForest on (temp, mem), contamination 0.05, on normal simulated data."""
    from sklearn.ensemble import IsolationForest

    b = SimulatedBackend(32, seed=seed, host="base", start_ts=START)
    rows = [(g.temp_c or 0.0, g.mem_used_mib or 0.0) for i in range(1800) for g in b.read(START + i)]
    return IsolationForest(n_estimators=100, contamination=0.05, random_state=seed).fit(np.array(rows))


def throughput(model: AnomalyModel, fleet: int = 1024) -> dict[str, float]:
    """Batched score of a whole fleet per call vs one ``predict`` per sample, same model, same rows."""
    from headless_agent.simulate import SimulatedBackend as Sim

    fx = FeatureExtractor(model.params)
    b = Sim(fleet, seed=7, host="tp", start_ts=START)
    x = np.zeros((0, 0))
    for i in range(40):
        rows = [("tp", START + i, g) for g in b.read(START + i)]
        x, _ = fx.update(fx.columns(rows))
    group = np.zeros(len(x), dtype=np.int64)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        model.score(x, group)
    batched = reps * len(x) / (time.perf_counter() - t0)
    forest = model.forests["*"]
    t0 = time.perf_counter()
    for _ in range(reps):
        forest.score_samples(x)
    sk_batched = reps * len(x) / (time.perf_counter() - t0)
    n1 = 200
    t0 = time.perf_counter()
    for i in range(n1):
        forest.predict(x[i:i + 1])
    single = n1 / (time.perf_counter() - t0)
    return {"fleet": float(len(x)), "batched_per_s": batched, "sklearn_batched_per_s": sk_batched,
            "per_sample_predict_per_s": single}


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    ap = argparse.ArgumentParser(prog="eval_detection", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size (one GPU of each fault kind, short normal run)")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    model = bootstrap(seed=0)
    out(f"bootstrap model: {time.perf_counter() - t0:.1f} s; threshold {model.thresholds}")
    base_if = train_baseline_if(args.seed + 1)
    hosts, seconds, _ = build(args.quick, args.seed)
    t0 = time.perf_counter()
    results, spent, samples = run_scenario(hosts, int(seconds), model, base_if)
    out(f"scenarios: {len(hosts)} hosts x {GPUS_PER_HOST} GPUs x {seconds:.0f} s = {samples:,} GPU-samples "
        f"in {time.perf_counter() - t0:.1f} s (pipeline {samples / spent:,.0f} GPU-samples/s end to end)")
    out(f"{'detector':10s} {'prec':>6s} {'recall':>6s} {'F1':>6s} {'med.delay':>9s} {'false':>6s} "
        f"{'false/GPU-wk':>12s} {'alerts':>7s}")
    scored = {}
    for res in results:
        s = score(res, hosts, int(seconds))
        scored[res.name] = s
        out(f"{res.name:10s} {s['precision']:6.3f} {s['recall']:6.3f} {s['f1']:6.3f} {s['median_delay_s']:8.1f}s "
            f"{s['false_alerts']:6.0f} {s['false_per_gpu_week']:12.2f} {s['alerts']:7.0f}")
    out(f"aether false alerts: {scored['aether']['false_list'][:10]}")
    out(f"normal operation scored: {scored['aether']['normal_gpu_weeks']:.2f} GPU-weeks")
    out("aether per fault kind (detected/total, median delay):")
    for kind, (d, n, med) in scored["aether"]["per_kind"].items():  # type: ignore[union-attr]
        out(f"  {kind:16s} {d}/{n}  {med:6.1f} s")
    tp = throughput(model)
    out(f"scoring throughput, fleet of {tp['fleet']:.0f} GPUs per call: batched {tp['batched_per_s']:,.0f} "
        f"GPU-samples/s (sklearn score_samples batched {tp['sklearn_batched_per_s']:,.0f}); per-sample predict "
        f"{tp['per_sample_predict_per_s']:,.0f}/s")
    out(f"total {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
