"""`aether detect`: offline alert detection on recorded telemetry, with the station's own pipeline.

    aether detect --input telemetry.jsonl --output alerts.jsonl

The input holds protocol-v1 telemetry messages, one JSON object per line (as
recorded from ``aether.telemetry.>``). Lines that are not valid telemetry are
counted per reason, reported on stderr and skipped. The output gets one JSON
object per raised alert, and one more each time another GPU joins a host's
alert (grouping), so every GPU that triggered is listed with its own time:

    {"host", "gpu", "ts", "kind", "severity", "source", "score", "message", "alert_id"}

``ts`` is the time of the first sample that triggered the alert on that GPU.
The model is the station's (newest in the data folder; bootstrapped and saved
there if none), or a given model folder. Exit status: 0 done, 1 unreadable
input or model, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from aether_desktop.services.alerts import AlertChange
from aether_desktop.services.anomaly import (
    AnomalyModel,
    ModelStore,
    bootstrap,
    default_model_dir,
    ensure_model,
)
from aether_desktop.services.detection import DetectionPipeline, run_offline
from aether_protocol import ProtocolError, Telemetry, decode_telemetry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aether detect", description=__doc__.split("\n")[0],
                                epilog="Exit status: 0 done, 1 unreadable input or model, 2 bad arguments.")
    p.add_argument("--input", "-i", required=True, help="telemetry JSONL file ('-' for stdin)")
    p.add_argument("--output", "-o", required=True, help="alerts JSONL file ('-' for stdout)")
    p.add_argument("--model-dir", type=Path, help="anomaly model folder (default: the station's)")
    p.add_argument("--data-dir", type=Path, help="station data folder (default: the user data folder)")
    p.add_argument("--bootstrap", action="store_true",
                   help="use a freshly bootstrapped model (reproducible; nothing is saved)")
    p.add_argument("--rules-only", action="store_true", help="health rules only, no anomaly model")
    return p


def read_messages(stream: TextIO, rejects: Counter[str]) -> list[Telemetry]:
    """Decode every line; a bad line is counted under its reason and skipped."""
    out: list[Telemetry] = []
    for line in stream:
        if not line.strip():
            continue
        try:
            out.append(decode_telemetry(line))
        except ProtocolError as exc:
            rejects[exc.reason] += 1
    return out


def alert_records(changes: list[AlertChange]) -> list[dict[str, object]]:
    """One record per (alert, GPU) at the moment it was raised or the GPU joined (pure; unit-tested)."""
    recs: list[dict[str, object]] = []
    for ch in changes:
        if ch.change == "cleared" or not ch.new_gpus:
            continue
        first = dict(ch.alert.gpu_first_ts)
        for gpu in ch.new_gpus:
            a = ch.alert
            recs.append({"host": a.host, "gpu": gpu, "ts": first.get(gpu, a.first_ts), "kind": a.kind,
                         "severity": a.severity, "source": a.source, "score": round(a.score, 4),
                         "message": a.message, "alert_id": a.id})
    return recs


def _model(args: argparse.Namespace) -> AnomalyModel | None:
    if args.rules_only:
        return None
    if args.bootstrap:
        return bootstrap()
    folder = args.model_dir or default_model_dir(args.data_dir)
    if args.model_dir is not None:
        model = ModelStore(folder).load_latest()
        if model is None:
            raise FileNotFoundError(f"no usable anomaly model in {folder}")
        return model
    return ensure_model(ModelStore(folder))


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    rejects: Counter[str] = Counter()
    try:
        if args.input == "-":
            messages = read_messages(sys.stdin, rejects)
        else:
            with open(args.input, encoding="utf-8", errors="replace") as f:
                messages = read_messages(f, rejects)
    except OSError as exc:
        print(f"aether detect: cannot read {args.input}: {exc}", file=sys.stderr)
        return 1
    if rejects:
        detail = ", ".join(f"{k} {v}" for k, v in rejects.most_common())
        print(f"aether detect: skipped {sum(rejects.values())} malformed line(s) ({detail})", file=sys.stderr)
    try:
        model = _model(args)
    except (OSError, ValueError) as exc:
        print(f"aether detect: {exc}", file=sys.stderr)
        return 1
    pipeline = DetectionPipeline(model)
    # Recordings interleave hosts; the pipeline wants time order.
    messages.sort(key=lambda m: m.ts)
    records = alert_records(run_offline(pipeline, messages))
    try:
        with contextlib.ExitStack() as stack:
            sink: TextIO = (sys.stdout if args.output == "-"
                            else stack.enter_context(open(args.output, "w", encoding="utf-8")))
            for r in records:
                sink.write(json.dumps(r) + "\n")
    except OSError as exc:
        print(f"aether detect: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    print(f"aether detect: {len(messages)} messages, {pipeline.stats.samples} GPU samples, "
          f"{len(records)} alert record(s)" + (f", model {model.version}" if model else ", rules only"),
          file=sys.stderr)
    return 0
