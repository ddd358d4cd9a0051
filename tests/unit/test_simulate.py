"""The simulated backend: physics, jobs, control calls, determinism, speed."""

from __future__ import annotations

import time

import pytest

from aether_protocol import PROTOCOL_VERSION, GpuSample, JobSpec, Telemetry, decode_telemetry, encode
from headless_agent.backend import BackendError, GpuBackend, SimulatedJobs
from headless_agent.gpu_models import GPU_MODELS, get_model
from headless_agent.simulate import SimulatedBackend

H100_IDLE, H100_TDP, H100_MAX_MHZ = 70.0, 700.0, 1980.0


def _job(job_id: str, gpus: list[int], expected_s: float = 10_000.0, **kw: object) -> JobSpec:
    return JobSpec(id=job_id, argv=["/usr/bin/python3", "train.py"], gpus=gpus, expected_s=expected_s, **kw)  # type: ignore[arg-type]


def _quiet(n: int = 2, **kw: object) -> SimulatedBackend:
    return SimulatedBackend(n, seed=7, background_load=False, **kw)  # type: ignore[arg-type]


def _run(b: SimulatedBackend, t0: int, t1: int) -> list[list[GpuSample]]:
    return [b.read(float(t)) for t in range(t0, t1)]


def _finish_time(b: SimulatedBackend, job_id: str, t0: int, t1: int) -> tuple[int, str]:
    for t in range(t0, t1):
        for o in b.poll_jobs(float(t)):
            if o.job_id == job_id:
                return t, o.kind
    raise AssertionError(f"{job_id} did not end by {t1}")


def test_implements_the_backend_protocols() -> None:
    b: GpuBackend = SimulatedBackend(1)
    jobs: SimulatedJobs = SimulatedBackend(1)
    assert b.gpu_count() == 1 and jobs is not None


def test_deterministic_under_seed() -> None:
    def trace(seed: int) -> list[list[GpuSample]]:
        b = SimulatedBackend(4, seed=seed, faults=["power_spikes:gpu=1", "ecc_errors:gpu=2,rate=20"])
        out = _run(b, 0, 200)
        b.start_job(_job("j", [0, 3], mem_mib=10_000), 200.0)
        out += [b.read(200.0 + 0.5 * i) for i in range(400)]
        return out

    assert trace(11) == trace(11)
    assert trace(11) != trace(12)


def test_host_name_varies_the_fleet() -> None:
    a = SimulatedBackend(2, host="a").read(0.0)
    b = SimulatedBackend(2, host="b").read(0.0)
    assert a[0].uuid != b[0].uuid and a != b
    assert len({s.uuid for s in a}) == 2


def test_samples_are_valid_telemetry() -> None:
    b = SimulatedBackend(8, seed=2, faults=["gpu_lost:gpu=3,at=5"])
    for t in range(0, 300, 7):
        gpus = b.read(float(t))
        msg = Telemetry(
            v=PROTOCOL_VERSION, host="sim", boot="b", seq=t, ts=float(t), state="active", gpus=gpus
        )
        assert decode_telemetry(encode(msg)).gpus == gpus


def test_idle_gpu() -> None:
    s = _run(_quiet(), 0, 30)[-1][0]
    assert s.state == "ok" and s.name == "NVIDIA H100 80GB HBM3"
    assert s.util_pct == 0.0 and s.processes == []
    assert s.power_w == pytest.approx(H100_IDLE, rel=0.08)
    assert s.throttle == ["gpu_idle"]
    assert s.sm_clock_mhz == 345.0
    assert s.mem_used_mib == pytest.approx(500.0, abs=10.0)
    assert 25.0 <= (s.temp_c or 0.0) <= 45.0
    assert s.power_limit_w == H100_TDP and s.slowdown_temp_c == 87.0 and s.fan_pct is None


def test_busy_gpu_and_temperature_lag() -> None:
    b = _quiet()
    base = _run(b, 0, 10)[-1]
    b.start_job(_job("train", [0]), 10.0)
    ticks = _run(b, 10, 400)
    busy, idle = [s[0] for s in ticks], [s[1] for s in ticks]
    t0 = base[0].temp_c or 0.0
    final = busy[-1].temp_c or 0.0
    assert final > t0 + 25.0
    # Power steps up within seconds...
    assert (busy[5].power_w or 0.0) > 0.8 * H100_TDP and (busy[5].util_pct or 0.0) > 85.0
    assert busy[5].throttle == [] and busy[5].sm_clock_mhz == H100_MAX_MHZ
    # ...but temperature follows over tens of seconds (first-order lag).
    assert (busy[5].temp_c or 0.0) - t0 < 0.3 * (final - t0)
    assert 0.4 * (final - t0) < (busy[45].temp_c or 0.0) - t0 < 0.85 * (final - t0)
    assert (busy[300].temp_c or 0.0) == pytest.approx(final, abs=3.0)
    assert 60.0 <= final <= 80.0  # a healthy H100 at full load
    assert idle[-1].power_w == pytest.approx(H100_IDLE, rel=0.08)


def test_energy_counter_integrates_power() -> None:
    b = _quiet(1)
    b.start_job(_job("j", [0]), 0.0)
    ticks = _run(b, 0, 101)
    energy = [s[0].energy_j or 0.0 for s in ticks]
    assert all(y >= x for x, y in zip(energy, energy[1:], strict=False))
    integral = sum(s[0].power_w or 0.0 for s in ticks[1:])
    assert energy[-1] - energy[0] == pytest.approx(integral, rel=0.03)


def test_jobs_occupy_memory_and_show_processes() -> None:
    b = _quiet()
    b.start_job(_job("j", [0, 1], expected_s=60.0, mem_mib=20_000), 0.0)
    s = _run(b, 0, 30)[-1]
    for g in s:
        assert g.mem_used_mib == pytest.approx(20_500.0, abs=10.0)
        assert g.processes is not None and len(g.processes) == 1
        proc = g.processes[0]
        assert proc.name == "python3" and proc.mem_used_mib == 20_000.0
    assert s[0].processes[0].pid == s[1].processes[0].pid  # type: ignore[index]
    when, kind = _finish_time(b, "j", 30, 120)
    assert kind == "job_finished" and 59 <= when <= 62
    after = b.read(121.0)
    assert after[0].processes == [] and (after[0].mem_used_mib or 0.0) < 600.0


def test_job_outcome_reports_energy() -> None:
    b = _quiet(1)
    b.start_job(_job("j", [0], expected_s=100.0), 0.0)
    _run(b, 0, 110)
    (o,) = b.poll_jobs(110.0)
    assert (o.kind, o.exit_code, o.gpus) == ("job_finished", 0, (0,))
    assert o.energy_j is not None and 0.8 * 100 * 600 < o.energy_j < 100 * H100_TDP
    assert b.poll_jobs(111.0) == []  # reported once


def test_default_memory_and_inference_jobs() -> None:
    b = _quiet()
    b.start_job(JobSpec(id="inf", argv=["tritonserver"], gpus=[0], kind="inference"), 0.0)
    b.start_job(JobSpec(id="trn", argv=["python"], gpus=[1]), 0.0)
    ticks = _run(b, 0, 50)
    inf = [s[0] for s in ticks[10:]]
    assert 30.0 < sum(s.util_pct or 0.0 for s in inf) / len(inf) < 70.0
    assert max(s.util_pct or 0.0 for s in inf) - min(s.util_pct or 0.0 for s in inf) > 20.0  # bursty
    assert ticks[-1][1].mem_used_mib is not None and ticks[-1][1].mem_used_mib > 0.2 * 81559
    assert ticks[-1][0].mem_used_mib is not None and ticks[-1][0].mem_used_mib < 0.2 * 81559
    when, kind = _finish_time(b, "trn", 50, 100)  # default expected_s = 60
    assert kind == "job_finished" and 59 <= when <= 62


def test_oom_when_two_jobs_overflow() -> None:
    b = _quiet()
    b.start_job(_job("big", [0], expected_s=30.0, mem_mib=50_000), 0.0)
    b.start_job(_job("late", [0], expected_s=30.0, mem_mib=40_000), 0.0)
    _run(b, 0, 10)
    (o,) = b.poll_jobs(10.0)
    assert (o.job_id, o.kind, o.exit_code) == ("late", "job_failed", 1)
    assert o.detail is not None and o.detail.startswith("CUDA out of memory")
    assert b.read(11.0)[0].mem_used_mib == pytest.approx(50_500.0, abs=10.0)
    # The two share GPU 0 for a few seconds, so "big" ends a little late.
    assert _finish_time(b, "big", 11, 60)[1] == "job_finished"


def test_power_cap_lowers_clocks_and_slows_jobs() -> None:
    b = _quiet()
    b.set_power_limit([0], 300.0)
    b.start_job(_job("capped", [0], expected_s=200.0), 0.0)
    b.start_job(_job("free", [1], expected_s=200.0), 0.0)
    s = _run(b, 0, 60)[-1]
    assert s[0].power_limit_w == 300.0 and (s[0].power_w or 0.0) <= 300.0
    assert s[0].throttle is not None and "sw_power_cap" in s[0].throttle
    assert (s[0].sm_clock_mhz or 0.0) < 0.8 * H100_MAX_MHZ
    assert s[1].sm_clock_mhz == H100_MAX_MHZ
    free_t, _ = _finish_time(b, "free", 60, 400)
    capped_t, kind = _finish_time(b, "capped", free_t, 600)
    assert kind == "job_finished" and capped_t > 1.2 * free_t


def test_thermal_throttling_drops_clocks_and_slows_jobs() -> None:
    b = _quiet(faults=["fan_failure:gpu=0,at=0,max_factor=1.6"])
    b.start_job(_job("hot", [0], expected_s=600.0), 0.0)
    b.start_job(_job("cool", [1], expected_s=600.0), 0.0)
    ticks = _run(b, 0, 500)
    hot = [s[0] for s in ticks[200:]]
    assert sum(bool(s.throttle and "sw_thermal" in s.throttle) for s in hot) > 0.8 * len(hot)
    assert sum(s.sm_clock_mhz or 0.0 for s in hot) / len(hot) < 0.95 * H100_MAX_MHZ
    cool_t, _ = _finish_time(b, "cool", 500, 700)
    hot_t, kind = _finish_time(b, "hot", cool_t, 900)
    assert kind == "job_finished" and hot_t > cool_t + 10


def test_sustained_overheating_fails_jobs() -> None:
    b = _quiet(faults=["fan_failure:gpu=0"])
    b.start_job(_job("doomed", [0]), 0.0)
    b.start_job(_job("fine", [1]), 0.0)
    when, kind = _finish_time(b, "doomed", 0, 1200)
    assert kind == "job_failed" and 300 < when < 1200
    assert b.cancel_job("fine", float(when))  # the healthy twin was still running


def test_cancel_job() -> None:
    b = _quiet()
    b.start_job(_job("j", [0]), 0.0)
    _run(b, 0, 20)
    assert b.cancel_job("j", 20.0) is True
    assert b.cancel_job("j", 21.0) is False
    assert b.cancel_job("never", 21.0) is False
    (o,) = b.poll_jobs(21.0)
    assert (o.kind, o.exit_code) == ("job_cancelled", -15)
    assert b.read(22.0)[0].processes == []


def test_start_job_errors() -> None:
    b = _quiet()
    with pytest.raises(BackendError, match="no GPU with index 5"):
        b.start_job(_job("j", [5]), 0.0)
    with pytest.raises(BackendError, match="names no GPU"):
        b.start_job(_job("j", []), 0.0)
    b.start_job(_job("j", [0]), 0.0)
    with pytest.raises(BackendError, match="already running"):
        b.start_job(_job("j", [1]), 1.0)


def test_sleep_and_wake() -> None:
    b = _quiet()
    _run(b, 0, 10)
    b.sleep([1])
    s = _run(b, 10, 100)[-1]
    assert [g.state for g in s] == ["ok", "sleeping"]
    assert s[1].util_pct == 0.0 and s[1].processes == []
    assert s[1].power_w == pytest.approx(0.3 * H100_IDLE, rel=0.15)
    assert (s[1].sm_clock_mhz or 0.0) < 345.0 and (s[1].mem_clock_mhz or 0.0) < 1000.0
    assert (s[1].temp_c or 0.0) < (s[0].temp_c or 0.0)
    with pytest.raises(BackendError, match="GPU 1 is sleeping; wake it first"):
        b.start_job(_job("j", [1]), 100.0)
    b.wake(None)
    s = b.read(101.0)
    assert [g.state for g in s] == ["ok", "ok"]
    assert s[1].power_w == pytest.approx(H100_IDLE, rel=0.08)
    b.start_job(_job("j", [1]), 101.0)


def test_sleep_refuses_a_gpu_with_a_job_and_is_atomic() -> None:
    b = _quiet()
    b.start_job(_job("j", [1]), 0.0)
    with pytest.raises(BackendError, match="GPU 1 is running job j"):
        b.sleep(None)
    assert [g.state for g in b.read(1.0)] == ["ok", "ok"]
    with pytest.raises(BackendError, match="no GPU with index 9"):
        b.sleep([9])


def test_sleep_evicts_background_load() -> None:
    b = SimulatedBackend(8, seed=4)
    busy = [g.index for g in _run(b, 0, 10)[-1] if (g.util_pct or 0.0) > 0]
    assert busy, "expected some background load on a demo fleet"
    b.sleep(None)
    assert all(g.state == "sleeping" and g.util_pct == 0.0 for g in _run(b, 10, 20)[-1])


def test_power_limit_range() -> None:
    b = _quiet()
    b.set_power_limit(None, 400.0)
    assert [g.power_limit_w for g in b.read(0.0)] == [400.0, 400.0]
    with pytest.raises(BackendError, match=r"150 W is outside GPU 0's range 200-700 W"):
        b.set_power_limit([0, 1], 150.0)
    with pytest.raises(BackendError, match="outside"):
        b.set_power_limit(None, 701.0)
    assert [g.power_limit_w for g in b.read(1.0)] == [400.0, 400.0]


@pytest.mark.parametrize(
    ("model", "name", "idle_w", "mem_total"),
    [
        ("A100", "NVIDIA A100-SXM4-80GB", 55.0, 81920.0),
        ("a100-40gb", "NVIDIA A100-SXM4-40GB", 52.0, 40960.0),
        ("L4", "NVIDIA L4", 16.0, 23034.0),
        ("RTX4090", "NVIDIA GeForce RTX 4090", 20.0, 24564.0),
        ("H200", "NVIDIA H200", 75.0, 143771.0),
    ],
)
def test_gpu_models(model: str, name: str, idle_w: float, mem_total: float) -> None:
    b = SimulatedBackend(1, model=model, background_load=False)
    s = _run(b, 0, 20)[-1][0]
    assert (s.name, s.mem_total_mib) == (name, mem_total)
    assert s.power_w == pytest.approx(idle_w, rel=0.1)
    spec = get_model(model)
    b.start_job(_job("j", [0]), 20.0)
    busy = _run(b, 20, 60)[-1][0]
    assert 0.75 * spec.tdp_w < (busy.power_w or 0.0) <= spec.tdp_w * 1.02
    assert busy.sm_clock_mhz == spec.max_sm_mhz
    assert (busy.fan_pct is not None) == spec.has_fan


def test_mixed_models_and_unknown_model() -> None:
    names = [s.name for s in SimulatedBackend(4, model="H100,L4").read(0.0)]
    assert names == ["NVIDIA H100 80GB HBM3", "NVIDIA L4"] * 2
    with pytest.raises(ValueError, match="unknown GPU model 'V100'; available: " + ", ".join(GPU_MODELS)):
        SimulatedBackend(2, model="V100")


def test_out_of_memory_on_a_small_gpu() -> None:
    b = SimulatedBackend(1, model="L4", background_load=False)
    b.start_job(_job("j", [0], mem_mib=30_000), 0.0)
    (o,) = b.poll_jobs(5.0)
    assert o.kind == "job_failed" and "23034 MiB total capacity" in (o.detail or "")


def test_demo_fleet_looks_alive() -> None:
    b = SimulatedBackend(8, seed=0)
    ticks = _run(b, 0, 3600)
    busy_frac = [sum((s[i].util_pct or 0.0) > 10 for s in ticks) / len(ticks) for i in range(8)]
    assert 0.15 < sum(busy_frac) / 8 < 0.9  # a mix of busy and idle, not flat
    assert any(0.05 < f < 0.95 for f in busy_frac)  # GPUs change between busy and idle


def test_time_does_not_run_backwards_and_gaps_are_bounded() -> None:
    b = _quiet()
    first = b.read(100.0)
    assert b.read(50.0)[0].energy_j == first[0].energy_j
    t0 = time.perf_counter()
    later = b.read(100.0 + 86_400.0)  # a day-long gap is crossed in bounded work
    assert time.perf_counter() - t0 < 5.0
    assert later[0].state == "ok"


def test_one_hour_of_eight_gpus_is_fast() -> None:
    b = SimulatedBackend(8, seed=5, faults=["fan_failure:gpu=2,at=600", "xid_storm:gpu=5,at=100"])
    t0 = time.perf_counter()
    for t in range(3600):
        b.read(float(t))
    elapsed = time.perf_counter() - t0
    print(f"1 h of 8 simulated GPUs at 1 s ticks: {elapsed:.2f} s")
