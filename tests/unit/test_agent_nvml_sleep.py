"""Sleep outlives the agent: the GPU keeps its minimum power limit, so a new agent reads it back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pynvml  # type: ignore[import-untyped]
import pytest

from headless_agent.backend import BackendError
from headless_agent.nvml import NvmlBackend
from tests.unit.fake_pynvml import FakeGpu, FakeNvml


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    nvml = FakeNvml([FakeGpu(uuid=f"GPU-{i}", limit_mw=650_000, min_mw=200_000, max_mw=700_000,
                             default_mw=700_000) for i in range(2)])
    yield nvml
    nvml.release.set()


def backend(fake: FakeNvml, tmp_path: Path) -> NvmlBackend:
    return NvmlBackend(fake, read_timeout_s=0.2, control_timeout_s=2.0, proc_root=tmp_path)


def test_a_gpu_slept_by_an_earlier_agent_is_sleeping_and_wakes_to_its_default(
        fake: FakeNvml, tmp_path: Path) -> None:
    """The reviewer's reproduction: sleep, restart the agent, wake."""
    first = backend(fake, tmp_path)
    first.sleep([0])
    first.close()
    assert fake.gpus[0].limit_mw == 200_000
    second = backend(fake, tmp_path)
    try:
        s0, s1 = second.read(0.0)
        assert (s0.state, s1.state) == ("sleeping", "ok")
        second.wake([0])
        # What the earlier agent saved (650 W) died with it: NVML's default is the best known limit.
        assert fake.gpus[0].limit_mw == 700_000
        assert second.read(1.0)[0].state == "ok"
        # Sleeping again saves a real limit, not the minimum.
        second.sleep([0])
        second.wake([0])
        assert fake.gpus[0].limit_mw == 700_000
    finally:
        second.close()


def test_sleeping_a_gpu_already_at_its_minimum_never_saves_the_minimum(fake: FakeNvml, tmp_path: Path) -> None:
    b = backend(fake, tmp_path)
    try:
        fake.gpus[1].limit_mw = 200_000  # set there behind the agent's back (nvidia-smi -pl)
        b.sleep([1])
        b.wake([1])
        assert fake.gpus[1].limit_mw == 700_000
    finally:
        b.close()


def test_a_gpu_whose_minimum_is_its_default_is_not_asleep(fake: FakeNvml, tmp_path: Path) -> None:
    fake.gpus[0].limit_mw = fake.gpus[0].min_mw = fake.gpus[0].default_mw = 200_000
    fake.gpus[1].faults["nvmlDeviceGetPowerManagementLimitConstraints"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    b = backend(fake, tmp_path)
    try:
        assert [s.state for s in b.read(0.0)] == ["ok", "ok"]
    finally:
        b.close()


def test_waking_without_a_known_limit_or_default_is_a_clear_error(fake: FakeNvml, tmp_path: Path) -> None:
    fake.gpus[0].limit_mw = 200_000
    b = backend(fake, tmp_path)
    try:
        b.sleep([0])
        fake.gpus[0].faults["nvmlDeviceGetPowerManagementDefaultLimit"] = pynvml.NVML_ERROR_NOT_SUPPORTED
        with pytest.raises(BackendError, match="no power limit to restore is known.*set_power_limit"):
            b.wake([0])
        assert b.read(0.0)[0].state == "sleeping"
        b.set_power_limit([0], 500)  # what wake restores now
        b.wake([0])
        assert fake.gpus[0].limit_mw == 500_000 and b.read(1.0)[0].state == "ok"
    finally:
        b.close()


def test_a_gpu_that_hangs_at_start_does_not_hold_the_agent(fake: FakeNvml, tmp_path: Path) -> None:
    fake.gpus[1].hangs.add("nvmlDeviceGetPowerManagementLimit")
    fake.gpus[0].limit_mw = 200_000
    b = NvmlBackend(fake, read_timeout_s=0.2, control_timeout_s=0.3, proc_root=tmp_path)
    try:
        assert b.read(0.0)[0].state == "sleeping"  # the answering GPU is still found asleep
    finally:
        fake.release.set()
        b.close()
