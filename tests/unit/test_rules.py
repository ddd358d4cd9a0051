"""Health rules: pure per-sample checks (no Qt, no network)."""

from __future__ import annotations

import pytest

from aether_desktop.services.rules import XID_TABLE, GpuThresholds, RuleEngine, RulesConfig, xid_info
from aether_protocol import GpuSample

COMMON_XIDS = (13, 31, 43, 45, 48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119)


def gpu(**kw: object) -> GpuSample:
    base: dict[str, object] = {"index": 0, "uuid": "GPU-x", "name": "NVIDIA H100 80GB HBM3", "state": "ok",
                               "temp_c": 60.0, "ecc_dbe": 0}
    base.update(kw)
    return GpuSample(**base)  # type: ignore[arg-type]


def test_xid_table_covers_the_common_codes_with_meaning_and_action() -> None:
    for code in COMMON_XIDS:
        info = XID_TABLE[code]
        assert info.meaning and info.action and info.title
        assert info.severity in ("info", "warning", "critical")
    assert XID_TABLE[79].severity == "critical"
    assert XID_TABLE[48].severity == "critical"
    assert XID_TABLE[43].severity == "info"


def test_unknown_xid_gets_a_generic_entry() -> None:
    info = xid_info(999)
    assert info.code == 999 and "catalogue" in info.action


def test_xid_finding_carries_meaning_and_action() -> None:
    [f] = RuleEngine().check("h", 1.0, gpu(xid=79))
    assert (f.kind, f.severity, f.source, f.detector) == ("xid", "critical", "rule", "xid")
    assert "fallen off the bus" in f.message and "Action" in f.message


def test_ecc_fires_only_on_an_increase() -> None:
    eng = RuleEngine()
    assert eng.check("h", 1.0, gpu(ecc_dbe=3)) == []  # first sight: a baseline, not an event
    assert eng.check("h", 2.0, gpu(ecc_dbe=3)) == []
    [f] = eng.check("h", 3.0, gpu(ecc_dbe=5))
    assert f.kind == "ecc_dbe" and f.score == 2.0 and f.severity == "critical"
    assert eng.check("h", 4.0, gpu(ecc_dbe=0)) == []  # reset by a GPU reset: no alert


def test_lost_gpu_is_critical_and_nothing_else_is_checked() -> None:
    [f] = RuleEngine().check("h", 1.0, GpuSample(index=2, uuid="u", name="n", state="lost"))
    assert (f.kind, f.gpu, f.severity) == ("gpu_lost", 2, "critical")


def test_over_slowdown_uses_the_reported_threshold_first() -> None:
    eng = RuleEngine()
    assert eng.check("h", 1.0, gpu(temp_c=86.0)) == []  # H100 slowdown is 87 C
    assert [f.kind for f in eng.check("h", 1.0, gpu(temp_c=87.0))] == ["over_slowdown_temp"]
    assert [f.kind for f in eng.check("h", 1.0, gpu(temp_c=80.0, slowdown_temp_c=79.0))] == ["over_slowdown_temp"]


@pytest.mark.parametrize(("name", "temp", "fires"), [
    ("NVIDIA A100-SXM4-80GB", 88.0, False), ("NVIDIA A100-SXM4-80GB", 89.0, True),
    ("NVIDIA L4", 89.0, False), ("Some Future GPU", 88.0, True),
])
def test_thresholds_per_gpu_model(name: str, temp: float, fires: bool) -> None:
    found = RuleEngine().check("h", 1.0, gpu(name=name, temp_c=temp))
    assert bool(found) is fires


def test_thresholds_are_configurable() -> None:
    cfg = RulesConfig(thresholds=(("H100", GpuThresholds(80.0, 90.0)),))
    assert RuleEngine(cfg).check("h", 1.0, gpu(temp_c=81.0))


def test_hardware_throttle_but_not_policy_throttle() -> None:
    eng = RuleEngine()
    assert eng.check("h", 1.0, gpu(throttle=["sw_power_cap", "gpu_idle"])) == []
    [f] = eng.check("h", 1.0, gpu(throttle=["hw_power_brake"]))
    assert f.kind == "hw_throttle" and "hw_power_brake" in f.message
