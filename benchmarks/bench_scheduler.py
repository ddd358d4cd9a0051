"""Scheduler benchmark: aether vs fifo on the Tiresias 60-job trace, placement latency, carbon forecast and deferral.

    .venv/bin/python benchmarks/bench_scheduler.py [--json out.json] [--seeds 5]

Baselines are measured in the same run, beside the thing they are compared to:
fifo beside aether, a per-GPU prediction loop beside the batched call,
persistence beside the forecast, immediate execution beside deferral (and a
perfect-foresight oracle as the ceiling). Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aether_desktop.services.carbon import (  # noqa: E402
    CarbonForecaster,
    CarbonSeries,
    forecast_mae,
    load_carbon_csv,
    plan_deferral,
)
from aether_desktop.services.fleetsim import FleetSim, SimJob, parse_fleet  # noqa: E402
from aether_desktop.services.jobtypes import JobRequest  # noqa: E402
from aether_desktop.services.replay import load_trace, run_replay  # noqa: E402
from aether_desktop.services.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from aether_desktop.services.scheduler_model import feature_matrix, load_or_bootstrap  # noqa: E402

FLEETS = ("2x8", "1x8:A100-80GB,1x8:A100-40GB", "2x8:V100-32GB")
# % emissions avoided: Wiesner et al. 2021, ad-hoc ML jobs, next-workday deadline.
WIESNER = {"gb": 6.56, "de": 5.91}


def bench_replay(sched: Scheduler, seeds: int) -> dict[str, Any]:
    jobs = load_trace(ROOT / "data" / "traces" / "tiresias_60_job.csv")
    out: dict[str, Any] = {}
    print("\n== Tiresias 60-job trace: fifo vs aether (same fleet, same seed) ==")
    print(f"{'fleet':30} {'seed':>4} {'policy':7} {'ok':>3} {'oom':>3} {'therm':>5} {'rej':>3} "
          f"{'meanJCT':>8} {'p95JCT':>7} {'wait':>6} {'makespan':>8} {'kWh':>6} {'JCT∩':>7} {'ms':>5}")  # fmt: skip
    for fleet in FLEETS:
        per_seed = []
        for seed in range(seeds):
            res = {}
            for policy in ("fifo", "aether"):
                t = time.perf_counter()
                r = run_replay(jobs, parse_fleet(fleet), policy, seed=seed, scheduler=sched)
                res[policy] = (r, (time.perf_counter() - t) * 1000)
            both = {
                j
                for j in (row.job_id for row in res["fifo"][0].rows if row.outcome == "ok")
                if next(x for x in res["aether"][0].rows if x.job_id == j).outcome == "ok"
            }
            row_out = {}
            for policy, (r, ms) in res.items():
                s = r.summary
                jct_both = np.mean([x.end_s - x.submit_s for x in r.rows if x.job_id in both and x.end_s])  # type: ignore[operator]
                print(f"{fleet:30} {seed:>4} {policy:7} {s['completed']:>3} {s['oom']:>3} {s['thermal']:>5} "
                      f"{s['rejected']:>3} {s['mean_jct_s']:>8} {s['p95_jct_s']:>7} {s['mean_wait_s']:>6} "
                      f"{s['makespan_s']:>8} {s['energy_kwh']:>6} {jct_both:>7.1f} {ms:>5.0f}")  # fmt: skip
                row_out[policy] = {
                    **s,
                    "mean_jct_common_s": round(float(jct_both), 1),
                    "replay_ms": round(ms, 1),
                }
            per_seed.append(row_out)
        out[fleet] = per_seed
        agg = {
            p: {
                "failed": sum(x[p]["failed"] for x in per_seed),
                "rejected": sum(x[p]["rejected"] for x in per_seed),
                "mean_jct_s": round(float(np.mean([x[p]["mean_jct_s"] for x in per_seed])), 1),
                "mean_jct_common_s": round(float(np.mean([x[p]["mean_jct_common_s"] for x in per_seed])), 1),
            }
            for p in ("fifo", "aether")
        }
        print(f"  {fleet} over {seeds} seeds: {json.dumps(agg)}")
        out[fleet + " (all seeds)"] = agg
    return out


def bench_latency(sched: Scheduler) -> dict[str, Any]:
    sim = FleetSim(parse_fleet("125x8"), seed=11)
    rng = np.random.default_rng(0)
    # A busy fleet: 40 % of the GPUs run something.
    for i, g in enumerate(rng.choice(1000, 400, replace=False)):
        sim.start(SimJob(f"bg{i}", float(rng.uniform(2e3, 3e4)), 3600.0), int(g) // 8, [int(g) % 8])
    sim.advance(600.0)
    cands = sim.candidates()
    out: dict[str, Any] = {"candidates": len(cands)}
    print(f"\n== Placement latency over {len(cands)} candidate GPUs (1 thread per predict) ==")
    for k in (1, 4):
        job = JobRequest(id="lat", argv=("x",), num_gpus=k, mem_mib=12_000.0, expected_s=900.0)
        for _ in range(20):
            sched.place(job, cands, 0.0)
        ts = []
        for _ in range(500):
            t = time.perf_counter()
            d = sched.place(job, cands, 0.0)
            ts.append(time.perf_counter() - t)
        p50, p99 = np.percentile(ts, [50, 99]) * 1000
        out[f"batched_{k}gpu_ms"] = {"p50": round(p50, 3), "p99": round(p99, 3), "action": d.action}
        print(f"  Scheduler.place, {k}-GPU job, one batched call per booster: p50 {p50:.2f} ms  p99 {p99:.2f} ms"
              f"  (target p99 <= 5 ms) -> {d.action}")  # fmt: skip
    # Baseline: the same model asked one GPU at a time (feature row + 2 predictions per GPU).
    job = JobRequest(id="lat", argv=("x",), num_gpus=1, mem_mib=12_000.0, expected_s=900.0)
    model = sched.model
    ts = []
    for _ in range(15):
        t = time.perf_counter()
        best_p = -1.0
        for c in cands:
            p, s = model.predict(feature_matrix(job, [c]))
            best_p = max(best_p, float(p[0] / s[0]))
        ts.append(time.perf_counter() - t)
    p50, p99 = np.percentile(ts, [50, 99]) * 1000
    out["per_gpu_loop_ms"] = {"p50": round(p50, 1), "p99": round(p99, 1)}
    print(f"  baseline per-GPU loop (1,000 x 2 single-row predictions): p50 {p50:.1f} ms  p99 {p99:.1f} ms")
    return out


def bench_forecast() -> dict[str, Any]:
    out: dict[str, Any] = {}
    print("\n== Carbon forecast MAE (gCO2/kWh), whole 2020 series, origins every 3 h ==")
    for region in ("gb", "de"):
        s = load_carbon_csv(ROOT / "data" / "carbon" / f"{region}_2020_ci.csv")
        maes = forecast_mae(CarbonForecaster(s))
        out[region] = maes
        cells = "  ".join(f"{h}: {v['forecast']:.1f} vs {v['persistence']:.1f}" for h, v in maes.items())
        print(f"  {region.upper()} forecast vs persistence  {cells}")
    return out


class _Oracle(CarbonForecaster):
    """Perfect foresight: the ceiling a forecast can reach."""

    def forecast(self, now_ts: float, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
        s = self.series
        i = s.index_at(now_ts)
        n = int(np.ceil(horizon_s / s.step_s)) + 1
        idx = np.minimum(i + np.arange(n), len(s.ci) - 1)
        return s.ts[i] + np.arange(n) * s.step_s, s.ci[idx]


def _next_workday_9(t: datetime) -> datetime:
    d = t.date() + timedelta(days=1)
    while d.weekday() >= 5:
        d += timedelta(days=1)
    return datetime(d.year, d.month, d.day, 9, tzinfo=UTC)


def _wiesner_deadline(oft: datetime) -> datetime:
    """Their `next_workday` rule (strategy.py, AdHocStrategy._forecast_duration), quirks included.

    A job whose original finish time falls on a weekday between 09:00 and 17:00
    may not move at all; otherwise it must finish by the next 09:00 (Saturday:
    Monday; note Friday evening maps to Saturday 09:00 in their code).
    """
    hour = oft.hour + (0.5 if oft.minute == 30 else 0.0)
    nine = oft.replace(hour=9, minute=0, second=0, microsecond=0)
    if oft.weekday() == 5:
        return nine + timedelta(days=2)
    if oft.weekday() == 6 or hour > 17:
        return nine + timedelta(days=1)
    if hour < 9:
        return nine
    return oft


def _workday_submits(rng: np.random.Generator, n: int, grid_s: float | None) -> list[datetime]:
    days = [datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=i) for i in range(366)]
    workdays = [d for d in days if d.weekday() < 5 and d.year == 2020]
    out = []
    for _ in range(n):
        sec = float(rng.uniform(9 * 3600, 17 * 3600))
        if grid_s:
            sec = float(np.floor(sec / grid_s) * grid_s)
        out.append(workdays[int(rng.integers(len(workdays)))] + timedelta(seconds=sec))
    return out


def bench_deferral(n_jobs: int = 3387, seed: int = 0) -> dict[str, Any]:
    """Two scenarios, each with our forecast, a perfect-foresight oracle and run-now as the baseline.

    * replication: Wiesner et al.'s ad-hoc ML scenario as their simulate.py builds it -- 3,387 jobs
      starting on the half hour 09:00-16:30 on 2020 workdays, durations 4-90 *hours* (their code
      counts minutes: range(4*60, 90*60, 30); data/README.md's "4-90 min" misreads it), their
      next-workday deadline rule, no interruption, greenest window by mean intensity;
    * aether policy: 4-90 minute jobs submitted 09-17, every one allowed to finish by 09:00 on the
      next workday, with the shipped margins (x1.15 duration, >= 2 % forecast saving to wait).
    """
    rng = np.random.default_rng(seed)
    scenarios = {
        "replication": (
            _workday_submits(rng, n_jobs, 1800.0),
            rng.choice(np.arange(240, 5400, 30), n_jobs) * 60.0,
            "wiesner",
        ),
        "aether_policy": (_workday_submits(rng, n_jobs, None), rng.uniform(4 * 60, 90 * 60, n_jobs), "next9"),
    }
    out: dict[str, Any] = {"jobs": n_jobs}
    print(f"\n== Deferral: {n_jobs} ad-hoc jobs on 2020 workdays, no interruption (saving vs run-now) ==")
    for region in ("gb", "de"):
        s = load_carbon_csv(ROOT / "data" / "carbon" / f"{region}_2020_ci.csv")
        out[region] = {"wiesner_headline_pct": WIESNER[region]}
        for scen, (submits, durations, rule) in scenarios.items():
            res = {}
            for name, fc in (("forecast", CarbonForecaster(s)), ("oracle", _Oracle(s))):
                base = planned = 0.0
                deferred = 0
                for sub, dur in zip(submits, durations, strict=True):
                    now, d = sub.timestamp(), float(dur)
                    if rule == "wiesner":
                        deadline = _wiesner_deadline(sub + timedelta(seconds=d)).timestamp()
                        plan = plan_deferral(
                            fc, now, d, deadline, 1.0, duration_margin=1.0, min_saving_frac=0.0
                        )
                    else:
                        plan = plan_deferral(fc, now, d, _next_workday_9(sub).timestamp(), 1.0)
                    base += _actual(s, now, d)
                    planned += _actual(s, plan.not_before_ts, d)
                    deferred += plan.deferred
                res[name] = {"saving_pct": round(100 * (1 - planned / base), 2), "deferred_jobs": deferred}
            out[region][scen] = res
            print(f"  {region.upper()} {scen:13}: forecast {res['forecast']['saving_pct']:6.2f} % "
                  f"({res['forecast']['deferred_jobs']} moved)  oracle {res['oracle']['saving_pct']:6.2f} %"
                  f"  | Wiesner et al. headline {WIESNER[region]:.2f} %")  # fmt: skip
    return out


def _actual(s: CarbonSeries, t0: float, dur: float) -> float:
    return s.mean_between(t0, t0 + dur) * dur  # constant power: emissions ∝ mean intensity x duration


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        model = load_or_bootstrap(Path(d), seed=0)
        print(f"bootstrap model {model.version}: trained in {time.perf_counter() - t:.1f} s "
              f"on {model.meta['training_rows']} simulated rows; validation {json.dumps(model.meta['validation'])}")  # fmt: skip
    sched = Scheduler(model, SchedulerConfig(max_jobs_per_gpu=64))
    result = {
        "model": model.meta,
        "replay": bench_replay(sched, args.seeds),
        "latency": bench_latency(Scheduler(model)),
        "forecast_mae": bench_forecast(),
        "deferral": bench_deferral(),
    }
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
