"""Replay: trace loading, clear errors, determinism under a seed, fifo versus aether (no Qt, no network)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from aether_desktop.cli.replay import main
from aether_desktop.services.fleetsim import FleetSpecError, parse_fleet
from aether_desktop.services.replay import TraceError, TraceJob, declared_memory, load_trace, run_replay
from aether_desktop.services.scheduler import Scheduler, SchedulerConfig
from aether_desktop.services.scheduler_model import load_or_bootstrap

ROOT = Path(__file__).resolve().parents[2]
TIRESIAS = ROOT / "data" / "traces" / "tiresias_60_job.csv"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    load_or_bootstrap(d, seed=0)
    return d


@pytest.fixture(scope="module")
def scheduler(model_dir: Path) -> Scheduler:
    return Scheduler(load_or_bootstrap(model_dir), SchedulerConfig(max_jobs_per_gpu=64))


def test_tiresias_trace_loads_as_is() -> None:
    jobs = load_trace(TIRESIAS)
    assert len(jobs) == 60
    first = jobs[0]
    assert (first.job_id, first.submit_s, first.num_gpu, first.duration_s) == ("0", 0.0, 1, 164.0)
    assert first.model_name == "vgg19" and first.mem_mib is None and first.gpu_milli == 1000
    assert max(j.num_gpu for j in jobs) == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("job_id,submit_s,num_gpu\n1,0,1\n", "missing column(s) duration_s"),
        ("job_id,submit_s,num_gpu,duration_s\n", "no jobs"),
        ("job_id,submit_s,num_gpu,duration_s\n1,zero,1,10\n", "line 2: submit_s='zero' is not a number"),
        ("job_id,submit_s,num_gpu,duration_s\n1,0,1,10\n1,5,1,10\n", "line 3: job_id '1' appears twice"),
        ("job_id,submit_s,num_gpu,duration_s\n1,0,1.5,10\n", "whole number"),
        ("job_id,submit_s,num_gpu,duration_s\n1,0,0,10\n", "num_gpu"),
        ("job_id,submit_s,num_gpu,duration_s\n1,0,1,0\n", "duration_s must be > 0"),
        ("job_id,submit_s,num_gpu,duration_s,gpu_milli\n1,0,1,10,2000\n", "gpu_milli"),
        ("job_id,submit_s,num_gpu,duration_s,kind\n1,0,1,10,batch\n", "kind='batch'"),
        ("job_id,submit_s,num_gpu,duration_s\n1,nan,1,10\n", "finite"),
    ],
)
def test_bad_traces_give_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(TraceError) as err:
        load_trace(p)
    assert message in str(err.value)


def test_bad_fleet_specs_are_explained() -> None:
    assert [h.name for h in parse_fleet("2x4")] == ["gpu-node-01", "gpu-node-02"]
    assert {h.model for h in parse_fleet("1x8:H100-80GB,1x4:V100-16GB")} == {"H100-80GB", "V100-16GB"}
    with pytest.raises(FleetSpecError, match="HOSTSxGPUS"):
        parse_fleet("eight")
    with pytest.raises(FleetSpecError, match="unknown GPU model 'K80'"):
        parse_fleet("2x8:K80")


def test_fifo_replay_is_deterministic_under_a_seed() -> None:
    jobs, hosts = load_trace(TIRESIAS), parse_fleet("2x8")
    a = run_replay(jobs, hosts, "fifo", seed=7)
    b = run_replay(jobs, hosts, "fifo", seed=7)
    assert a.rows == b.rows and a.summary == b.summary
    # The seed is what varies the undeclared memory needs (and the fleet's boards).
    assert [declared_memory(j, 7) for j in jobs] != [declared_memory(j, 8) for j in jobs]
    assert [declared_memory(j, 7) for j in jobs] == [declared_memory(j, 7) for j in jobs]


def test_aether_replay_is_deterministic_under_a_seed(scheduler: Scheduler) -> None:
    jobs, hosts = load_trace(TIRESIAS), parse_fleet("2x8")
    a = run_replay(jobs, hosts, "aether", seed=3, scheduler=scheduler)
    b = run_replay(jobs, hosts, "aether", seed=3, scheduler=scheduler)
    assert a.rows == b.rows


def test_fifo_fails_where_aether_does_not(scheduler: Scheduler) -> None:
    jobs, hosts = load_trace(TIRESIAS), parse_fleet("2x8")
    fifo = run_replay(jobs, hosts, "fifo", seed=0).summary
    aether = run_replay(jobs, hosts, "aether", seed=0, scheduler=scheduler).summary
    assert fifo["failed"] >= 1  # memory-blind first fit really runs out of memory
    assert aether["failed"] == 0
    assert aether["completed"] + aether["rejected"] == 60
    assert aether["mean_jct_s"] <= fifo["mean_jct_s"]


def test_shared_gpus_overflow_memory_under_fifo_only(scheduler: Scheduler) -> None:
    # Four quarter-GPU jobs of 14 GiB each: FIFO packs them onto one 40 GiB GPU.
    jobs = [TraceJob(f"s{i}", float(i), 1, 600.0, mem_mib=14_000.0, gpu_milli=250) for i in range(4)]
    hosts = parse_fleet("1x2")
    fifo = run_replay(jobs, hosts, "fifo", seed=0)
    assert {r.outcome for r in fifo.rows} >= {"oom"}
    assert len({r.gpus for r in fifo.rows}) == 1
    aether = run_replay(jobs, hosts, "aether", seed=0, scheduler=scheduler)
    assert all(r.outcome == "ok" for r in aether.rows)


def test_cli_writes_schedule_and_summary(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, summary = tmp_path / "schedule.csv", tmp_path / "summary.json"
    carbon = ROOT / "data" / "carbon" / "gb_2020_ci.csv"
    rc = main(
        ["--trace", str(TIRESIAS), "--fleet", "2x8", "--policy", "aether", "--out", str(out),
         "--summary", str(summary), "--seed", "1", "--carbon", str(carbon), "--model-dir", str(model_dir)]
    )  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 60
    assert list(rows[0]) == ["job_id", "host", "gpus", "submit_s", "start_s", "end_s", "outcome", "energy_j"]
    assert {r["outcome"] for r in rows} <= {"ok", "oom", "thermal", "failed", "rejected"}
    s = json.loads(summary.read_text())
    for key in (
        "jobs",
        "completed",
        "failed",
        "mean_jct_s",
        "p95_jct_s",
        "mean_wait_s",
        "makespan_s",
        "energy_kwh",
    ):
        assert key in s
    assert s["carbon_kg"] > 0
    assert '"policy": "aether"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "missing.csv", "--fleet", "2x8"], "cannot read trace"),
        (["--fleet", "2x"], "is not HOSTSxGPUS"),
        (["--fleet", "2x8", "--carbon", "missing_ci.csv"], "cannot read carbon file"),
        (["--fleet", "2x8", "--start", "yesterday"], "--start 'yesterday'"),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = {"--trace": str(TIRESIAS), "--policy": "fifo", "--out": str(tmp_path / "o.csv"),
            "--summary": str(tmp_path / "s.json")}  # fmt: skip
    argv = args[:]
    for flag, value in base.items():
        if flag not in argv:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_bad_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--policy", "random"])
    assert exc.value.code == 2
