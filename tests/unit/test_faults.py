"""Fault specs (pure parsing, ground truth) and the signature each fault leaves in telemetry."""

from __future__ import annotations

import pytest

from aether_protocol import GpuSample, JobSpec
from headless_agent.backend import BackendError
from headless_agent.faults import FAULT_KINDS, FaultSpec, parse_fault
from headless_agent.simulate import SimulatedBackend


def _job(job_id: str, gpu: int, expected_s: float = 10_000.0, **kw: object) -> JobSpec:
    return JobSpec(id=job_id, argv=["python", "train.py"], gpus=[gpu], expected_s=expected_s, **kw)  # type: ignore[arg-type]


def _run(b: SimulatedBackend, t0: int, t1: int) -> list[list[GpuSample]]:
    """Samples at 1 s ticks over [t0, t1)."""
    return [b.read(float(t)) for t in range(t0, t1)]


def _quiet(spec: str, n: int = 2) -> SimulatedBackend:
    return SimulatedBackend(n, seed=3, faults=[spec], background_load=False)


# --------------------------------------------------------------------------- parsing


def test_parse_full_spec() -> None:
    f = parse_fault("xid_storm:gpu=0,at=10,code=79")
    assert (f.kind, f.gpu, f.at, f.duration) == ("xid_storm", 0, 10.0, None)
    assert f.param("code") == 79.0
    assert f.param("period") == 5.0  # the kind's default


def test_parse_defaults_and_spaces() -> None:
    f = parse_fault("  Fan_Failure : gpu = 2 ")
    assert f == FaultSpec(kind="fan_failure", gpu=2)
    assert f.at == 0.0


def test_spec_round_trips_through_str() -> None:
    f = parse_fault("gpu_lost:gpu=1,at=30,duration=120")
    assert parse_fault(str(f)) == f


def test_fault_kinds_are_exported() -> None:
    assert set(FAULT_KINDS) == {
        "fan_failure",
        "thermal_runaway",
        "memory_leak",
        "power_spikes",
        "stuck_sensor",
        "xid_storm",
        "gpu_lost",
        "ecc_errors",
    }
    for kind in FAULT_KINDS:
        assert parse_fault(f"{kind}:gpu=0").kind == kind


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="unknown fault kind 'fan_fail'") as exc:
        parse_fault("fan_fail:gpu=1")
    for kind in FAULT_KINDS:
        assert kind in str(exc.value)


@pytest.mark.parametrize("spec", ["ecc_errors", "ecc_errors:", "ecc_errors:at=5"])
def test_missing_gpu(spec: str) -> None:
    with pytest.raises(ValueError, match="missing 'gpu=N'"):
        parse_fault(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fan_failure:gpu=x", "gpu='x' is not a number"),
        ("fan_failure:gpu=1,at=soon", "at='soon' is not a number"),
        ("fan_failure:gpu=1.5", "whole number"),
        ("fan_failure:gpu=-1", "must not be negative"),
        ("fan_failure:gpu=1,at=nan", "finite"),
        ("xid_storm:gpu=1,code=7.5", "whole number"),
        (
            "fan_failure:gpu=1,code=79",
            "unknown parameter 'code'; it takes gpu, at, duration, rate, max_factor",
        ),
        ("fan_failure:gpu=1,gpu=2", "given twice"),
        ("fan_failure:gpu=1,at", "'at' is not key=value"),
        ("gpu_lost:gpu=1,duration=0", "duration must be positive"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fault(spec)


def test_ground_truth_window() -> None:
    f = parse_fault("gpu_lost:gpu=0,at=10,duration=5")
    assert [f.active(t) for t in (0.0, 9.9, 10.0, 14.9, 15.0)] == [False, False, True, True, False]
    assert f.window(1000.0) == (1010.0, 1015.0)
    assert parse_fault("ecc_errors:gpu=0").active(1e9)


def test_backend_rejects_fault_on_missing_gpu() -> None:
    with pytest.raises(ValueError, match="no GPU 4 on this host"):
        SimulatedBackend(4, faults=["fan_failure:gpu=4"])
    b = SimulatedBackend(2, background_load=False)
    with pytest.raises(ValueError, match="unknown fault kind"):
        b.inject_fault("meltdown:gpu=0", 0.0)


def test_backend_labels_faults_relative_to_their_origin() -> None:
    b = SimulatedBackend(2, faults=["fan_failure:gpu=1,at=60"], start_ts=1000.0, background_load=False)
    b.read(1000.0)
    b.inject_fault("xid_storm:gpu=0,at=10,duration=20", 1100.0)
    assert [(s.kind, o) for s, o in b.faults] == [("fan_failure", 1000.0), ("xid_storm", 1100.0)]
    assert b.active_faults(1059.0) == []
    assert [s.kind for s in b.active_faults(1060.0)] == ["fan_failure"]
    assert [s.kind for s in b.active_faults(1115.0)] == ["fan_failure", "xid_storm"]
    assert [s.kind for s in b.active_faults(1130.0)] == ["fan_failure"]


# --------------------------------------------------------------------------- signatures


def test_fan_failure_heats_at_constant_power() -> None:
    b = _quiet("fan_failure:gpu=0,at=60")
    b.set_power_limit(None, 250.0)  # pin the power so only cooling differs
    b.start_job(_job("a", 0), 0.0)
    b.start_job(_job("b", 1), 0.0)
    ticks = _run(b, 0, 601)
    for t in (300, 450, 600):
        assert ticks[t][0].power_w == pytest.approx(250.0, rel=0.03)
        assert ticks[t][1].power_w == pytest.approx(250.0, rel=0.03)
    sick = [s[0].temp_c or 0.0 for s in ticks]
    well = [s[1].temp_c or 0.0 for s in ticks]
    assert well[600] == pytest.approx(well[300], abs=2.0)  # healthy: settled
    assert sick[300] < sick[450] < sick[600]  # sick: still drifting up
    assert sick[600] > well[600] + 15.0
    assert sick[59] == pytest.approx(well[59], abs=4.0)  # fine before it starts


def test_fan_failure_stops_the_fan_on_fanned_boards() -> None:
    b = SimulatedBackend(2, model="RTX4090", faults=["fan_failure:gpu=0,at=5"], background_load=False)
    s = _run(b, 0, 10)
    assert s[0][0].fan_pct is not None and s[0][0].fan_pct >= 30.0
    assert s[9][0].fan_pct == 0.0
    assert s[9][1].fan_pct is not None and s[9][1].fan_pct >= 30.0


def test_thermal_runaway_throttles_hard_then_kills_the_job() -> None:
    b = _quiet("thermal_runaway:gpu=0,at=30")
    b.start_job(_job("a", 0), 0.0)
    ticks = _run(b, 0, 500)
    sick = [s[0] for s in ticks]
    hot = [s for s in sick if s.throttle and "hw_thermal" in s.throttle]
    assert hot, "hw_thermal never reported"
    first = sick.index(hot[0])
    assert first < 150  # climbs fast: minutes, not hours
    assert (sick[first].sm_clock_mhz or 0.0) < 0.5 * 1980
    assert sick[20].sm_clock_mhz == 1980.0
    outcomes = b.poll_jobs(500.0)
    assert [(o.kind, o.exit_code) for o in outcomes] == [("job_failed", 1)]
    assert outcomes[0].detail is not None and outcomes[0].detail.startswith("thermal")


def test_memory_leak_grows_without_jobs_until_full() -> None:
    b = _quiet("memory_leak:gpu=0,at=10,rate=1000")
    ticks = _run(b, 0, 120)
    mem = [s[0].mem_used_mib or 0.0 for s in ticks]
    assert mem[9] < 600.0
    assert mem[40] - mem[20] == pytest.approx(20_000.0, rel=0.01)  # steady, at the given rate
    assert all(b2 >= a - 10.0 for a, b2 in zip(mem, mem[1:], strict=False))
    assert mem[-1] == pytest.approx(81559.0, abs=10.0)  # full, and no further
    assert ticks[-1][0].processes == [] and ticks[-1][0].util_pct == 0.0
    assert (ticks[-1][1].mem_used_mib or 0.0) < 600.0
    # A job that starts on the full GPU fails with OOM.
    b.start_job(_job("late", 0, mem_mib=4000), 120.0)
    outcomes = b.poll_jobs(125.0)
    assert outcomes[0].kind == "job_failed" and "CUDA out of memory" in (outcomes[0].detail or "")


def test_power_spikes_are_intermittent_and_far_above_normal() -> None:
    b = _quiet("power_spikes:gpu=0,at=0")
    ticks = _run(b, 0, 600)
    sick = [s[0].power_w or 0.0 for s in ticks]
    well = [s[1].power_w or 0.0 for s in ticks]
    spikes = [p for p in sick if p > 70.0 + 0.3 * 630.0]
    assert len(spikes) >= 20
    assert len(spikes) < 0.5 * len(sick)  # intermittent, not a new normal
    assert max(well) < 80.0
    assert all(s[0].util_pct == 0.0 for s in ticks)  # no work explains them


def test_stuck_sensor_freezes_temperature_only() -> None:
    b = _quiet("stuck_sensor:gpu=0,at=10")
    ticks = _run(b, 0, 30)
    b.start_job(_job("a", 0), 30.0)
    b.start_job(_job("b", 1), 30.0)
    ticks += _run(b, 30, 200)
    frozen = {s[0].temp_c for s in ticks[10:]}
    assert len(frozen) == 1
    assert max(s[0].power_w or 0.0 for s in ticks[100:]) > 400.0  # power moves...
    assert (ticks[150][1].temp_c or 0.0) > (ticks[20][1].temp_c or 0.0) + 15.0  # ...and a twin heats up


def test_xid_storm_repeats_the_code_on_one_gpu() -> None:
    b = _quiet("xid_storm:gpu=0,at=10,code=48")
    ticks = _run(b, 0, 110)
    xids = [s[0].xid for s in ticks]
    assert all(x is None for x in xids[:10])
    assert xids[10] == 48
    assert sum(x == 48 for x in xids) >= 15
    assert {x for x in xids if x is not None} == {48}
    assert all(s[1].xid is None for s in ticks)


def test_xid_storm_default_code_is_79() -> None:
    b = _quiet("xid_storm:gpu=1")
    assert b.read(0.0)[1].xid == 79


def test_gpu_lost_only_that_gpu_and_recovers() -> None:
    b = SimulatedBackend(3, seed=1, faults=["gpu_lost:gpu=1,at=20,duration=60"], background_load=False)
    b.start_job(_job("on-lost", 1), 0.0)
    b.start_job(_job("on-ok", 2), 0.0)
    ticks = _run(b, 0, 100)
    lost = ticks[30][1]
    assert lost.state == "lost"
    assert lost.uuid and lost.name == "NVIDIA H100 80GB HBM3"
    for name in ("temp_c", "power_w", "mem_used_mib", "util_pct", "energy_j", "processes", "throttle"):
        assert getattr(lost, name) is None, name
    assert all(s[1].state == "lost" for s in ticks[20:80])
    assert all(s[0].state == "ok" and s[2].state == "ok" for s in ticks)
    assert (ticks[30][2].power_w or 0.0) > 400.0
    assert ticks[85][1].state == "ok" and ticks[85][1].temp_c is not None
    outcomes = b.poll_jobs(100.0)
    assert [(o.job_id, o.kind) for o in outcomes] == [("on-lost", "job_failed")]
    assert "lost" in (outcomes[0].detail or "")


def test_jobs_cannot_start_on_a_lost_gpu() -> None:
    b = _quiet("gpu_lost:gpu=0")
    with pytest.raises(BackendError, match="GPU 0 is lost"):
        b.start_job(_job("x", 0), 1.0)
    with pytest.raises(BackendError, match="GPU 0 is lost"):
        b.sleep([0])
    b.sleep(None)  # "every GPU" skips the lost one rather than failing
    assert [s.state for s in b.read(2.0)] == ["lost", "sleeping"]


def test_ecc_errors_accumulate() -> None:
    b = _quiet("ecc_errors:gpu=0,at=60,rate=30")
    ticks = _run(b, 0, 600)
    ecc = [s[0].ecc_dbe or 0 for s in ticks]
    assert ecc[59] == 0
    assert all(b2 >= a for a, b2 in zip(ecc, ecc[1:], strict=False))
    assert 150 <= ecc[-1] <= 400  # ~30/min over 9 min
    assert all(s[1].ecc_dbe == 0 for s in ticks)


def test_fault_injected_at_run_time_counts_from_injection() -> None:
    b = SimulatedBackend(1, background_load=False)
    _run(b, 0, 100)
    b.inject_fault("gpu_lost:gpu=0,at=5", 100.0)
    assert b.read(104.0)[0].state == "ok"
    assert b.read(105.0)[0].state == "lost"
