"""Protocol v1: every rejection rule, round trips, commands and replies (pure, no I/O)."""

from __future__ import annotations

import json

import pytest

from aether_protocol import (
    MAX_MESSAGE_BYTES,
    GpuSample,
    ProtocolError,
    RejectCounter,
    RunJobCmd,
    SleepCmd,
    Telemetry,
    command_id_and_op,
    decode_command,
    decode_event,
    decode_reply,
    decode_telemetry,
    encode,
    reply,
)
from aether_protocol import subjects as subj

GOOD = {
    "v": 1, "host": "gpu-node-01", "boot": "3f9c1a7e", "seq": 1042, "ts": 1764262800.25, "interval_s": 1.0,
    "state": "active",
    "gpus": [{
        "index": 0, "uuid": "GPU-5c2e", "name": "NVIDIA H100 80GB HBM3", "state": "ok", "temp_c": 45.0,
        "mem_used_mib": 1024, "mem_total_mib": 81559, "util_pct": 37.0, "mem_util_pct": 12.0, "power_w": 120.5,
        "power_limit_w": 700.0, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "fan_pct": None, "energy_j": 123456.7,
        "throttle": ["sw_power_cap"], "ecc_dbe": 0, "xid": None,
        "processes": [{"pid": 4242, "name": "python", "mem_used_mib": 1000}],
    }],
}


def reason(data: bytes | str, dec=decode_telemetry) -> str:
    with pytest.raises(ProtocolError) as info:
        dec(data)
    return info.value.reason


def test_documented_example_decodes_and_round_trips() -> None:
    msg = decode_telemetry(json.dumps(GOOD))
    assert msg.host == "gpu-node-01" and msg.seq == 1042
    g = msg.gpus[0]
    assert g.temp_c == 45.0 and g.fan_pct is None and g.throttle == ["sw_power_cap"]
    assert g.processes is not None and g.processes[0].pid == 4242
    assert decode_telemetry(encode(msg)) == msg


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    data = dict(GOOD, future_field={"x": 1})
    data["gpus"] = [dict(GOOD["gpus"][0], new_metric_w=3.0)]
    assert decode_telemetry(json.dumps(data)).host == "gpu-node-01"


def test_oversize_rejected() -> None:
    assert reason(b" " * (MAX_MESSAGE_BYTES + 1)) == "oversize"


@pytest.mark.parametrize("data", [b"{", b"not json", b'{"v":1,', b"\xff\xfe"])
def test_invalid_json_rejected(data: bytes) -> None:
    assert reason(data) in ("invalid_json", "invalid_value")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_nan_and_infinite_numbers_rejected(literal: str) -> None:
    text = json.dumps(GOOD).replace('"temp_c": 45.0', f'"temp_c": {literal}')
    assert literal in text
    assert reason(text) in ("invalid_json", "invalid_value")


def good_with(path: tuple, value: object) -> dict:
    """A copy of GOOD with the field at ``path`` (keys and list indexes) set to ``value``."""
    data = json.loads(json.dumps(GOOD))
    target = data
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize("path,value", [
    (("seq",), "1042"), (("ts",), "now"), (("gpus",), {}), (("state",), "dozing"),
    (("gpus", 0, "index"), -1), (("gpus", 0, "temp_c"), "hot"), (("gpus", 0, "state"), "melted"),
    (("gpus", 0, "processes"), [{"pid": "x"}]), (("gpus", 0, "power_w"), -5.0),
])
def test_wrong_types_rejected(path: tuple, value: object) -> None:
    assert reason(json.dumps(good_with(path, value))) == "invalid_value"


@pytest.mark.parametrize("path,value", [
    (("ts",), 1e300), (("ts",), 253402300800.0), (("ts",), -1.0),
    (("seq",), 2**63), (("gpus", 0, "ecc_dbe"), 2**63), (("gpus", 0, "processes", 0, "pid"), 2**63),
    (("gpus", 0, "index"), 2**31), (("gpus", 0, "xid"), 2**31),
])
def test_values_storage_cannot_hold_rejected(path: tuple, value: object) -> None:
    """The ranges of docs/PROTOCOL.md: past them a timestamp or an int8/int4 column fails (or wraps)."""
    with pytest.raises(ProtocolError) as info:
        decode_telemetry(json.dumps(good_with(path, value)))
    assert info.value.reason == "invalid_value"
    assert path[-1] in info.value.detail


def test_range_limits_themselves_accepted() -> None:
    data = json.loads(json.dumps(GOOD))
    data.update(ts=253402300799.0, seq=2**63 - 1)
    gpu = data["gpus"][0]
    gpu.update(index=2**31 - 1, xid=2**31 - 1, ecc_dbe=2**63 - 1)
    gpu["processes"][0]["pid"] = 2**63 - 1
    msg = decode_telemetry(json.dumps(data))
    assert msg.ts == 253402300799.0 and msg.gpus[0].index == 2**31 - 1
    assert decode_telemetry(json.dumps(dict(GOOD, ts=0))).ts == 0


@pytest.mark.parametrize("field,value", [
    ("exit_code", 4294967297), ("exit_code", -(2**31) - 1), ("gpus", [2**31]), ("xid", 2**31),
    ("ts", 3e11), ("ts", -5.0),
])
def test_event_values_storage_cannot_hold_rejected(field: str, value: object) -> None:
    ev = {"v": 1, "host": "h1", "ts": 1.0, "id": "e-1", "kind": "job_finished", "exit_code": 0, "gpus": [0]}
    assert reason(json.dumps(dict(ev, **{field: value})), decode_event) == "invalid_value"
    edge = dict(ev, exit_code=-(2**31), gpus=[2**31 - 1], ts=253402300799.0)
    assert decode_event(json.dumps(edge)).exit_code == -(2**31)


@pytest.mark.parametrize("field", ["v", "host", "boot", "seq", "ts", "state", "gpus"])
def test_missing_required_fields_rejected(field: str) -> None:
    data = {k: v for k, v in GOOD.items() if k != field}
    assert reason(json.dumps(data)) == "missing_field"


@pytest.mark.parametrize("field", ["index", "uuid", "name", "state"])
def test_missing_required_gpu_fields_rejected(field: str) -> None:
    data = json.loads(json.dumps(GOOD))
    del data["gpus"][0][field]
    assert reason(json.dumps(data)) == "missing_field"


@pytest.mark.parametrize("v", [0, 2, 99])
def test_unknown_version_rejected(v: int) -> None:
    assert reason(json.dumps(dict(GOOD, v=v))) == "unsupported_version"


@pytest.mark.parametrize("host", ["", "a.b", "a b", "x" * 65, "ünï", "a/b", "a*"])
def test_bad_host_id_rejected(host: str) -> None:
    assert reason(json.dumps(dict(GOOD, host=host))) == "invalid_value"


def test_events_decode_and_reject() -> None:
    ev = {"v": 1, "host": "gpu-node-01", "ts": 1764262801.0, "id": "e-7f3a", "kind": "job_finished",
          "job_id": "job-001", "gpus": [0], "exit_code": 0, "detail": None}
    assert decode_event(json.dumps(ev)).kind == "job_finished"
    assert reason(json.dumps(dict(ev, kind="exploded")), decode_event) == "invalid_value"
    assert reason(json.dumps(dict(ev, v=3)), decode_event) == "unsupported_version"
    assert reason(json.dumps({k: v for k, v in ev.items() if k != "id"}), decode_event) == "missing_field"


def test_documented_commands_decode() -> None:
    docs = [
        '{"v": 1, "id": "c-91b2", "op": "sleep", "gpus": [0, 1]}',
        '{"v": 1, "id": "c-91b3", "op": "wake", "gpus": null}',
        '{"v": 1, "id": "c-91b4", "op": "set_power_limit", "gpus": [0], "watts": 250}',
        '{"v": 1, "id": "c-91b5", "op": "run_job", "job": {"id": "job-001", "argv": ["python", "train.py"], '
        '"gpus": [0], "env": {"EPOCHS": "3"}, "cwd": null, "kind": "training", "mem_mib": 8000, "expected_s": 3600}}',
        '{"v": 1, "id": "c-91b6", "op": "cancel_job", "job_id": "job-001"}',
        '{"v": 1, "id": "c-91b7", "op": "ping"}',
    ]
    cmds = [decode_command(d) for d in docs]
    assert isinstance(cmds[0], SleepCmd) and cmds[0].gpus == [0, 1]
    assert isinstance(cmds[3], RunJobCmd) and cmds[3].job.argv == ["python", "train.py"]
    for c in cmds:
        assert decode_command(encode(c)) == c


def test_unknown_op_and_malformed_commands_have_clear_reasons() -> None:
    assert reason('{"v":1,"id":"c1","op":"format_disk"}', decode_command) == "unknown_op"
    assert reason('{"v":1,"id":"c1","op":"set_power_limit","gpus":[0]}', decode_command) == "missing_field"
    assert reason('{"v":1,"id":"c1","op":"run_job","job":{"id":"j","argv":[],"gpus":[0]}}',
                  decode_command) == "invalid_value"
    assert command_id_and_op('{"v":1,"id":"c1","op":"format_disk"}') == ("c1", "format_disk")
    assert command_id_and_op(b"garbage") == (None, None)


def test_reply_round_trip() -> None:
    r = decode_reply(reply("c-1", False, "argv[0] 'rm' is not in the agent's allowed commands"))
    assert r.id == "c-1" and r.ok is False and "rm" in (r.error or "")
    assert json.loads(reply("c-2", True)) == {"v": 1, "id": "c-2", "ok": True, "error": None, "data": None}


def test_encoded_sample_omits_absent_optional_fields_and_keeps_required() -> None:
    s = GpuSample(index=0, uuid="GPU-1", name="x", state="lost")
    msg = Telemetry(v=1, host="h", boot="b", seq=0, ts=1.0, state="active", gpus=[s])
    assert json.loads(encode(msg))["gpus"][0] == {"index": 0, "uuid": "GPU-1", "name": "x", "state": "lost"}


def test_reject_counter_counts_per_reason() -> None:
    rc = RejectCounter("telemetry", log_interval_s=3600)
    for data in (b"{", b"{", json.dumps(dict(GOOD, v=7))):
        try:
            decode_telemetry(data)
        except ProtocolError as exc:
            rc.count(exc, "aether.telemetry.x")
    assert rc.total == 3 and rc.by_reason["unsupported_version"] == 1


def test_subjects() -> None:
    assert subj.telemetry("aether", "gpu-01") == "aether.telemetry.gpu-01"
    assert subj.command("site.a", "h") == "site.a.cmd.h"
    assert subj.all_events("aether") == "aether.events.*"
    assert subj.sanitize_host_id("gpu01.cluster.local") == "gpu01"
    assert subj.sanitize_host_id("weird host!") == "weird-host"
    assert subj.stream_name("AETHER_TELEMETRY", "aether") == "AETHER_TELEMETRY"
    assert subj.stream_name("AETHER_TELEMETRY", "site.a") == "AETHER_TELEMETRY_SITE_A"
    with pytest.raises(ValueError):
        subj.telemetry("aether", "bad.host")
    with pytest.raises(ValueError):
        subj.check_prefix("bad prefix")
