"""NvmlBackend against a fake pynvml: field mapping, faults, timeouts, control."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pynvml  # type: ignore[import-untyped]
import pytest

from aether_protocol import MigInstance, Process, Telemetry, decode_telemetry, encode
from headless_agent import nvml_query
from headless_agent.backend import BackendError
from headless_agent.nvml import NvmlBackend
from tests.unit.fake_pynvml import GIB, MIB, FakeGpu, FakeMig, FakeNvml

TIMEOUT_S = 0.2


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    nvml = FakeNvml([FakeGpu(uuid=f"GPU-{i}") for i in range(3)])
    yield nvml
    nvml.release.set()  # free any worker a test left hanging


@pytest.fixture
def backend(fake: FakeNvml, tmp_path: Path) -> Iterator[NvmlBackend]:
    b = NvmlBackend(fake, read_timeout_s=TIMEOUT_S, control_timeout_s=2.0, proc_root=tmp_path)
    yield b
    fake.release.set()
    b.close()


# ---------------------------------------------------------------------- mapping


def test_constants_match_installed_pynvml() -> None:
    assert pynvml.nvmlEventTypeXidCriticalError == nvml_query.NVML_EVENT_TYPE_XID
    for name in [n for n in dir(nvml_query) if n.startswith("NVML_") and n != "NVML_EVENT_TYPE_XID"]:
        assert getattr(nvml_query, name) == getattr(pynvml, name), name
    real_bits = {
        "gpu_idle": pynvml.nvmlClocksEventReasonGpuIdle,
        "app_clocks": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
        "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
        "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
        "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
        "sw_thermal": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
        "hw_thermal": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
        "hw_power_brake": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
    }
    assert dict((name, bit) for bit, name in nvml_query.THROTTLE_BITS) == real_bits


def test_every_field_mapped_with_units(fake: FakeNvml, backend: NvmlBackend) -> None:
    g = fake.gpus[0]
    g.fan_pct = 30
    g.ecc_dbe = 2
    samples = backend.read(0.0)
    assert backend.gpu_count() == 3
    assert [s.index for s in samples] == [0, 1, 2]
    s = samples[0]
    assert s.uuid == "GPU-0" and s.name == "NVIDIA H100 80GB HBM3" and s.state == "ok"
    assert s.temp_c == 45.0
    assert s.mem_used_mib == 1024  # v2 memory info: reserved memory not counted as used
    assert s.mem_total_mib == 80 * 1024
    assert (s.util_pct, s.mem_util_pct) == (37.0, 12.0)
    assert s.power_w == pytest.approx(120.5)
    assert s.power_limit_w == pytest.approx(700.0)
    assert (s.sm_clock_mhz, s.mem_clock_mhz) == (1980, 2619)
    assert isinstance(s.sm_clock_mhz, int)  # whole MHz on the wire, as in the protocol's example
    assert s.fan_pct == 30
    assert s.energy_j == pytest.approx(123456.7)
    assert s.throttle == ["sw_power_cap"]
    assert s.ecc_dbe == 2
    assert s.xid is None
    assert s.processes == []
    assert s.mig is None
    assert s.slowdown_temp_c == 87.0
    # What read() returns is what goes on the wire.
    msg = Telemetry(v=1, host="h", boot="b", seq=0, ts=1.0, state="active", gpus=samples)
    assert decode_telemetry(encode(msg)).gpus == samples


def test_static_facts_read_once(fake: FakeNvml, backend: NvmlBackend) -> None:
    for _ in range(4):
        backend.read(0.0)
    calls = fake.gpus[0].calls
    assert calls["nvmlDeviceGetName"] == 1
    assert calls["nvmlDeviceGetUUID"] == 1
    assert calls["nvmlDeviceGetTemperatureThreshold"] == 1
    assert calls["nvmlDeviceGetHandleByIndex"] == 1
    assert calls["nvmlDeviceGetPowerUsage"] == 4


def test_enforced_limit_preferred_then_management_limit(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].enforced_mw = 500_000
    fake.gpus[1].faults["nvmlDeviceGetEnforcedPowerLimit"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.gpus[1].limit_mw = 650_000
    s0, s1, _ = backend.read(0.0)
    assert s0.power_limit_w == 500.0
    assert s1.power_limit_w == 650.0


def test_memory_v1_when_driver_lacks_v2(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.mem_v2_supported = False
    s = backend.read(0.0)[0]
    assert s.mem_used_mib == 1024 + 512 and s.mem_total_mib == 80 * 1024
    assert s.state == "ok"


@pytest.mark.parametrize(
    ("bits", "names"),
    [
        (0x0, []),
        (0x1, ["gpu_idle"]),
        (0x2, ["app_clocks"]),
        (0x4, ["sw_power_cap"]),
        (0x8, ["hw_slowdown"]),
        (0x10, ["sync_boost"]),
        (0x20, ["sw_thermal"]),
        (0x40, ["hw_thermal"]),
        (0x80, ["hw_power_brake"]),
        (0x4 | 0x8 | 0x40, ["sw_power_cap", "hw_slowdown", "hw_thermal"]),
        (0x100 | 0x200, []),  # display clock / board limit: not in the protocol's list
    ],
)
def test_throttle_bits(bits: int, names: list[str]) -> None:
    assert nvml_query.throttle_names(bits) == names


# ---------------------------------------------------------------------- not supported / old pynvml


def test_not_supported_is_null_and_not_a_failure(fake: FakeNvml, backend: NvmlBackend) -> None:
    g = fake.gpus[0]
    ns = pynvml.NVML_ERROR_NOT_SUPPORTED
    for fn in (
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
        "nvmlDeviceGetTemperatureThreshold",
        "nvmlDeviceGetUtilizationRates",
    ):
        g.faults[fn] = ns
    g.faults["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    g.faults["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_NO_PERMISSION
    for _ in range(5):
        s = backend.read(0.0)[0]
    assert s.state == "ok"
    assert s.fan_pct is None  # passively cooled
    assert s.ecc_dbe is None and s.processes is None and s.slowdown_temp_c is None
    assert s.util_pct is None and s.mem_util_pct is None
    assert s.energy_j is None and s.power_w is None
    assert s.temp_c == 45.0


def test_temperature_from_v_form_when_pynvml_drops_the_old_one(fake: FakeNvml, tmp_path: Path) -> None:
    fake.missing.add("nvmlDeviceGetTemperature")
    b = NvmlBackend(fake, read_timeout_s=TIMEOUT_S, proc_root=tmp_path)
    try:
        assert b.read(0.0)[0].temp_c == 45.0
    finally:
        b.close()


def test_old_pynvml_missing_functions_null_and_logged_once(
    fake: FakeNvml, backend: NvmlBackend, caplog: pytest.LogCaptureFixture
) -> None:
    fake.missing |= {"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetCurrentClocksEventReasons"}
    fake.gpus[0].reasons = 0x40
    with caplog.at_level(logging.INFO, logger="headless_agent"):
        for _ in range(3):
            s = backend.read(0.0)[0]
    assert s.state == "ok"
    assert s.energy_j is None
    assert s.throttle == ["hw_thermal"]  # fell back to the pre-rename ThrottleReasons
    logged = [r for r in caplog.records if "nvmlDeviceGetTotalEnergyConsumption" in r.getMessage()]
    assert len(logged) == 1


# ---------------------------------------------------------------------- lost / failures / timeouts


def test_one_gpu_lost_while_others_report(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.read(0.0)
    fake.gpus[1].lost = True
    s0, s1, s2 = backend.read(1.0)
    assert (s0.state, s2.state) == ("ok", "ok")
    assert s0.power_w is not None and s2.power_w is not None
    assert s1.state == "lost" and s1.uuid == "GPU-1" and s1.name == "NVIDIA H100 80GB HBM3"
    assert (s1.temp_c, s1.power_w, s1.mem_used_mib, s1.processes) == (None, None, None, None)
    fake.gpus[1].lost = False
    s1 = backend.read(2.0)[1]
    assert s1.state == "ok" and s1.temp_c == 45.0
    # After GPU_IS_LOST the handle is found again by UUID, not by a possibly shifted index.
    assert fake.gpus[1].calls["nvmlDeviceGetHandleByUUID"] == 1


def test_gpu_lost_before_first_read_has_placeholder_identity(fake: FakeNvml, tmp_path: Path) -> None:
    fake.gpus[2].lost = True
    b = NvmlBackend(fake, read_timeout_s=TIMEOUT_S, proc_root=tmp_path)
    try:
        s = b.read(0.0)[2]
        assert s.state == "lost" and s.uuid == "" and s.name == "unknown"
    finally:
        b.close()


def test_repeated_failures_mark_lost_then_recover(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].faults["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_UNKNOWN
    first, second, third = (backend.read(float(t))[0] for t in range(3))
    # Below the threshold the GPU still reports what it could read.
    assert first.state == second.state == "ok"
    assert first.power_w is None and first.temp_c == 45.0
    assert third.state == "lost" and third.temp_c is None
    assert backend.read(3.0)[1].state == "ok"
    del fake.gpus[0].faults["nvmlDeviceGetPowerUsage"]
    recovered = backend.read(4.0)[0]
    assert recovered.state == "ok" and recovered.power_w == pytest.approx(120.5)


def test_hanging_call_times_out_without_blocking_the_tick(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[1].hangs.add("nvmlDeviceGetPowerUsage")
    states = []
    for t in range(3):
        started = time.monotonic()
        s0, s1, s2 = backend.read(float(t))
        # Generous bound: the deadline is 0.2 s; a blocked tick would take the 30 s hang limit.
        assert time.monotonic() - started < TIMEOUT_S + 2.0
        assert (s0.state, s2.state) == ("ok", "ok") and s0.power_w is not None
        assert s1.temp_c is None
        states.append(s1.state)
        if t == 0:
            # A stuck GPU refuses control calls at once instead of queueing them behind the hang.
            with pytest.raises(BackendError, match="GPU 1 is not answering NVML"):
                backend.sleep([1])
    assert states == ["ok", "ok", "lost"]
    with pytest.raises(BackendError, match="GPU 1 is lost"):
        backend.set_power_limit([1], 300)
    fake.gpus[1].hangs.clear()
    fake.release.set()
    for t in range(50):  # the stuck call returns when released; then the GPU reads again
        s1 = backend.read(10.0 + t)[1]
        if s1.state == "ok":
            break
    assert s1.state == "ok" and s1.power_w == pytest.approx(120.5)


def test_unexpected_exception_in_read_is_a_failure_not_a_crash(
    fake: FakeNvml, backend: NvmlBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(handle: object) -> int:
        raise TypeError("ctypes said no")

    monkeypatch.setattr(fake, "nvmlDeviceGetPowerUsage", broken)
    s = backend.read(0.0)
    assert [x.state for x in s] == ["ok", "ok", "ok"]  # one failure each, below the threshold
    assert s[0].temp_c is None


# ---------------------------------------------------------------------- XID, processes, MIG


def test_xid_drained_each_tick(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].xids = [13, 79]
    fake.gpus[1].xids = [31]
    s = backend.read(0.0)
    assert [x.xid for x in s] == [79, 31, None]  # the most recent since the previous read
    assert fake.gpus[0].xids == []
    assert [x.xid for x in backend.read(1.0)] == [None, None, None]
    fake.gpus[2].xids = [48]
    assert [x.xid for x in backend.read(2.0)] == [None, None, 48]
    assert fake.gpus[0].calls["nvmlDeviceRegisterEvents"] == 1


def test_xid_not_supported_is_null_and_not_retried(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].faults["nvmlDeviceRegisterEvents"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.gpus[0].xids = [13]
    for t in range(3):
        s = backend.read(float(t))[0]
        assert s.xid is None and s.state == "ok"
    assert fake.gpus[0].calls["nvmlDeviceRegisterEvents"] == 1
    assert all(es.freed for es in fake.event_sets if not es.gpus)


def test_processes_merged_with_names_from_proc(fake: FakeNvml, backend: NvmlBackend, tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "comm").write_text("python\n")
    fake.gpus[0].compute_procs = [(4242, 1000 * MIB), (4343, None)]
    fake.gpus[0].graphics_procs = [(4242, 1000 * MIB), (4444, 2**64 - 1)]
    s = backend.read(0.0)[0]
    assert s.processes == [
        Process(pid=4242, name="python", mem_used_mib=1000),
        Process(pid=4343, name=None, mem_used_mib=None),  # not in /proc (another PID namespace)
        Process(pid=4444, name=None, mem_used_mib=None),  # NVML_VALUE_NOT_AVAILABLE
    ]


def test_process_name_from_real_proc(fake: FakeNvml) -> None:
    if not Path(f"/proc/{os.getpid()}/comm").exists():
        pytest.skip("no /proc here")
    fake.gpus[0].compute_procs = [(os.getpid(), 10 * MIB)]
    b = NvmlBackend(fake, read_timeout_s=TIMEOUT_S)
    try:
        procs = b.read(0.0)[0].processes
        assert procs is not None and procs[0].name and procs[0].mem_used_mib == 10
    finally:
        b.close()


def test_mig_instances(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].mig_enabled = True
    fake.gpus[0].mig = [FakeMig("MIG-a", 1 * GIB, 10 * GIB), None, FakeMig("MIG-b", 0, 20 * GIB), None]
    fake.gpus[1].mig_enabled = None  # MIG not supported on this GPU
    s0, s1, s2 = backend.read(0.0)
    assert s0.mig == [
        MigInstance(index=0, uuid="MIG-a", mem_used_mib=1024, mem_total_mib=10 * 1024),
        MigInstance(index=2, uuid="MIG-b", mem_used_mib=0, mem_total_mib=20 * 1024),
    ]
    assert s0.state == "ok"  # empty slots (NOT_FOUND) are not failures
    assert s1.mig is None and s2.mig is None  # not supported / disabled
    assert s0.uuid == "GPU-0"


# ---------------------------------------------------------------------- control


def test_sleep_lowers_to_min_and_wake_restores(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].limit_mw = 650_000
    fake.gpus[0].enforced_mw = None
    backend.sleep([0])
    assert fake.gpus[0].limit_mw == 200_000
    backend.sleep([0])  # twice: must not forget the limit to restore
    s0, s1, _ = backend.read(0.0)
    assert s0.state == "sleeping" and s0.power_limit_w == 200.0 and s0.temp_c == 45.0
    assert s1.state == "ok"
    backend.wake(None)
    assert fake.gpus[0].limit_mw == 650_000
    assert backend.read(1.0)[0].state == "ok"


def test_sleep_all_and_unknown_gpu(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.sleep(None)
    assert [s.state for s in backend.read(0.0)] == ["sleeping"] * 3
    with pytest.raises(BackendError, match="no GPU with index 7"):
        backend.wake([7])


def test_sleep_without_root_is_a_clear_error(fake: FakeNvml, backend: NvmlBackend) -> None:
    for g in fake.gpus:
        g.faults["nvmlDeviceSetPowerManagementLimit"] = pynvml.NVML_ERROR_NO_PERMISSION
    with pytest.raises(BackendError) as info:
        backend.sleep(None)
    # One reason for all three GPUs, said once.
    assert (
        str(info.value) == "setting the power limit needs root on this host (NVML: Insufficient Permissions)"
    )
    assert [s.state for s in backend.read(0.0)] == ["ok"] * 3
    with pytest.raises(BackendError, match="needs root"):
        backend.set_power_limit([0], 300)


def test_power_limit_not_adjustable(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].faults["nvmlDeviceGetPowerManagementLimitConstraints"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(BackendError, match="GPU 0 does not support changing its power limit"):
        backend.set_power_limit([0], 300)


def test_set_power_limit_validates_range(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[1].min_mw, fake.gpus[1].max_mw = 100_000, 350_000
    with pytest.raises(BackendError, match="400 W is outside GPU 1's power limit range 100-350 W"):
        backend.set_power_limit(None, 400)
    assert [g.limit_mw for g in fake.gpus] == [700_000] * 3  # validated before anything changed
    backend.set_power_limit([0, 1], 300.5)
    assert [g.limit_mw for g in fake.gpus] == [300_500, 300_500, 700_000]
    assert backend.read(0.0)[1].power_limit_w == pytest.approx(300.5)


def test_set_power_limit_while_asleep_applies_on_wake(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.sleep([2])
    backend.set_power_limit([2], 400)
    assert fake.gpus[2].limit_mw == 200_000
    backend.wake([2])
    assert fake.gpus[2].limit_mw == 400_000


def test_control_on_lost_gpu_refused(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].lost = True
    backend.read(0.0)
    with pytest.raises(BackendError, match="GPU 0 is lost"):
        backend.sleep([0])


# ---------------------------------------------------------------------- lifecycle


def test_no_driver_is_a_clear_error_at_construction(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(BackendError, match="NVML unavailable: Driver Not Loaded"):
        NvmlBackend(fake)


def test_library_missing_is_a_clear_error(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    with pytest.raises(BackendError, match="NVML unavailable: NVML Shared Library Not Found"):
        NvmlBackend(fake)


def test_init_once_and_close_frees_everything(fake: FakeNvml, tmp_path: Path) -> None:
    b = NvmlBackend(fake, read_timeout_s=TIMEOUT_S, proc_root=tmp_path)
    b.read(0.0)
    b.read(1.0)
    b.close()
    b.close()
    assert fake.initialised == 1 and fake.shutdowns == 1
    assert fake.event_sets and all(es.freed for es in fake.event_sets)
    with pytest.raises(BackendError, match="closed"):
        b.read(2.0)


def test_bad_arguments_rejected(fake: FakeNvml) -> None:
    with pytest.raises(ValueError):
        NvmlBackend(fake, read_timeout_s=0)


def test_close_with_a_hung_gpu_returns_and_leaves_nvml_alone(fake: FakeNvml, tmp_path: Path) -> None:
    fake.gpus[0].hangs.add("nvmlDeviceGetTemperature")
    b = NvmlBackend(fake, read_timeout_s=TIMEOUT_S, proc_root=tmp_path)
    b.read(0.0)
    started = time.monotonic()
    b.close()
    assert time.monotonic() - started < 2.0  # generous: a join on the hung worker would take 30 s
    assert fake.shutdowns == 0  # nvmlShutdown could block on the call still inside the driver
