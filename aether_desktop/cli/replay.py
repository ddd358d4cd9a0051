"""``aether replay``: what-if replay of a job trace on a simulated fleet, faster than real time.

    aether replay --trace jobs.csv --fleet 2x8[:MODEL] --policy {fifo,aether} \\
                  --out schedule.csv --summary summary.json [--seed S] [--carbon ci.csv]

Bad input ends with a one-line message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from aether_desktop.services.carbon import CarbonDataError, CarbonForecaster, load_carbon_csv
from aether_desktop.services.fleetsim import GPU_MODELS, FleetSpecError, parse_fleet
from aether_desktop.services.replay import (
    DEFAULT_START_TS,
    POLICIES,
    TraceError,
    load_trace,
    run_replay,
    write_schedule,
)

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aether replay", description=__doc__.split("\n")[0])
    p.add_argument("--trace", required=True, type=Path, help="CSV: job_id,submit_s,num_gpu,duration_s[,...]")
    p.add_argument(
        "--fleet", required=True, help=f"HOSTSxGPUS[:MODEL][,...]; models: {', '.join(GPU_MODELS)}"
    )
    p.add_argument("--policy", required=True, choices=POLICIES)
    p.add_argument("--out", required=True, type=Path, help="schedule CSV to write")
    p.add_argument("--summary", required=True, type=Path, help="summary JSON to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--carbon", type=Path, help="carbon-intensity CSV (Time,Carbon Intensity) for carbon figures"
    )
    p.add_argument(
        "--start", help="UTC time of trace second 0, e.g. 2020-03-02T09:00 (default 2020-01-06T09:00)"
    )
    p.add_argument("--model-dir", type=Path, help="scheduler model directory (default: the user data dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse itself exits 2 with usage on bad flags
    try:
        return _run(args)
    except (TraceError, FleetSpecError, CarbonDataError, ValueError) as exc:
        print(f"aether replay: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"aether replay: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(args: argparse.Namespace) -> int:
    jobs = load_trace(args.trace)
    hosts = parse_fleet(args.fleet)
    start_ts = DEFAULT_START_TS
    if args.start:
        try:
            start_ts = datetime.fromisoformat(args.start).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise ValueError(
                f"--start {args.start!r} is not an ISO date-time such as 2020-03-02T09:00"
            ) from None
    carbon = load_carbon_csv(args.carbon) if args.carbon else None
    scheduler = None
    if args.policy == "aether":
        # Imported here so `fifo` replays work without XGBoost installed.
        from aether_desktop.services.scheduler import Scheduler, SchedulerConfig
        from aether_desktop.services.scheduler_model import load_or_bootstrap

        model = load_or_bootstrap(args.model_dir, seed=0)
        # Traces may share GPUs (gpu_milli); the replay masks GPUs by free share itself.
        scheduler = Scheduler(
            model, SchedulerConfig(max_jobs_per_gpu=64), carbon=CarbonForecaster(carbon) if carbon else None
        )
    for path in (args.out, args.summary):
        if not path.parent.is_dir():
            raise ValueError(f"output directory {path.parent} does not exist")
    result = run_replay(
        jobs, hosts, args.policy, seed=args.seed, scheduler=scheduler, carbon=carbon, start_ts=start_ts
    )
    write_schedule(result.rows, args.out)
    summary = {"policy": args.policy, "fleet": args.fleet, "seed": args.seed, **result.summary}
    if scheduler is not None:
        summary["model_version"] = scheduler.model.version
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
