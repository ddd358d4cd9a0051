"""`aether detect` on a recorded file: malformed lines counted, alerts written as JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aether_desktop.cli.detect import main
from aether_desktop.services.anomaly import ModelStore, bootstrap, simulated_messages
from aether_protocol import encode

START = 1.7e9


def record(path: Path, faults: list[str], seconds: int = 400, seed: int = 5) -> None:
    lines = []
    for tick in simulated_messages(1, 4, seconds, seed=seed, faults={0: faults}, start_ts=START):
        lines += [encode(m).decode() for m in tick]
    # Garbage a real recording may hold: truncated JSON, a wrong version, a NaN.
    lines.insert(10, '{"v": 1, "host": "x"')
    lines.insert(20, lines[5].replace('"v":1', '"v":2'))
    lines.insert(30, "not json at all")
    path.write_text("\n".join(lines) + "\n")


def read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rules_only_xid_storm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "t.jsonl", tmp_path / "a.jsonl"
    record(src, ["xid_storm:gpu=2,at=100,code=79"])
    assert main(["--input", str(src), "--output", str(out), "--rules-only"]) == 0
    err = capsys.readouterr().err
    assert "skipped 3 malformed line(s)" in err and "unsupported_version 1" in err
    recs = read(out)
    assert len(recs) == 1
    r = recs[0]
    assert set(r) >= {"host", "gpu", "ts", "kind", "severity", "source", "score", "message"}
    assert (r["host"], r["gpu"], r["kind"], r["severity"], r["source"]) == ("sim5-0", 2, "xid", "critical", "rule")
    assert r["ts"] == START + 100  # the first sample that carried the XID
    assert "fallen off the bus" in str(r["message"])


def test_model_catches_a_memory_leak(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.save(bootstrap(seed=4, hosts=1, gpus=4, seconds=900, model="H100"))
    src, out = tmp_path / "t.jsonl", tmp_path / "a.jsonl"
    record(src, ["memory_leak:gpu=1,at=200"], seed=6)
    assert main(["-i", str(src), "-o", str(out), "--model-dir", str(tmp_path / "models")]) == 0
    recs = read(out)
    leak = [r for r in recs if r["gpu"] == 1 and r["source"] == "model"]
    assert leak and leak[0]["kind"] == "memory_leak"
    assert START + 200 <= float(leak[0]["ts"]) <= START + 215  # type: ignore[arg-type]
    assert all(r["gpu"] == 1 for r in recs)  # the healthy GPUs stayed quiet


def test_bad_arguments_and_missing_input(tmp_path: Path) -> None:
    assert main(["--output", "x"]) == 2
    assert main(["-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "a"), "--rules-only"]) == 1
    assert main(["-i", str(tmp_path / "nope.jsonl"), "-o", "-", "--model-dir", str(tmp_path)]) == 1
