"""`aether submit`: put a job into the queue from a script (the dispatching station places it).

    aether submit --gpus 1 --mem 8G --kind training --expected 1h -- python train.py --epochs 3

The job is written as ``pending`` into the station's database and its id printed;
whichever station holds the dispatcher lock picks it up. ``--wait`` follows the job
to its end. Exit status: 0 submitted (with ``--wait``: finished), 1 the job ended
otherwise or the database failed, 2 invalid input.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

from aether_desktop.config import default_data_dir
from aether_desktop.services.jobs import JobRecord, JobRepository
from aether_desktop.services.jobspec import JobFields, parse_job
from aether_desktop.services.jobtypes import JobRequest
from aether_desktop.services.store import apply_migrations

# Field names in jobspec -> the flag the user typed, so errors name what they can fix.
_FLAG = {
    "command": "command (after --)",
    "gpus": "--gpus",
    "mem": "--mem",
    "kind": "--kind",
    "expected": "--expected",
    "priority": "--priority",
    "deadline": "--deadline",
    "env": "--env",
    "cwd": "--cwd",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse exits 2 as well; this keeps the one-line style of the other errors.
        self.exit(2, f"aether submit: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="aether submit",
        description="Submit a job to the Aether fleet. The command goes after '--' and runs without a shell.",
        epilog="Example: aether submit --gpus 1 --mem 8G --expected 1h -- python train.py --epochs 3",
    )
    p.add_argument("--gpus", default="1", help="number of GPUs on one host, or specific GPUs as HOST:0,1")
    p.add_argument("--mem", default="", help="GPU memory needed per GPU: 8G, 8000M or 8000 (MiB)")
    p.add_argument("--kind", default="training", choices=("training", "inference"))
    p.add_argument("--expected", default="10m", help="expected duration: 90m, 2h, 1h30m, 3600 (default 10m)")
    p.add_argument("--priority", default="0", help="whole number, higher runs first (default 0)")
    p.add_argument("--deadline", default="", help="finish by: ISO date-time (local) or +4h")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment (repeatable)")
    p.add_argument("--cwd", default="", help="working directory on the GPU host (absolute)")
    p.add_argument(
        "--db", metavar="DSN", help="PostgreSQL DSN (default: $AETHER_DB_DSN, else the embedded one)"
    )
    p.add_argument("--data-dir", type=Path, help=f"station data folder for the embedded database "
                   f"(default {default_data_dir()})")  # fmt: skip
    p.add_argument("--wait", action="store_true", help="follow the job to its end, printing state changes")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Options before the first ``--``, the job's argv after it (taken verbatim, never re-split)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str]) -> int:
    opts, command = split_argv(argv)
    args = build_parser().parse_args(opts)
    fields = JobFields(
        # shlex.join then shlex.split inside parse_job gives back exactly this argv.
        command=shlex.join(command),
        gpus=args.gpus,
        mem=args.mem,
        kind=args.kind,
        expected=args.expected,
        priority=args.priority,
        deadline=args.deadline,
        env="\n".join(args.env),
        cwd=args.cwd,
    )
    parsed = parse_job(fields, now=time.time())
    if isinstance(parsed, list):
        for err in parsed:
            msg = "give the command after --, e.g. -- python train.py" if err.field == "command" and not command \
                else err.message  # fmt: skip
            print(f"aether submit: {_FLAG[err.field]}: {msg}", file=sys.stderr)
        return 2
    dsn = args.db or os.environ.get("AETHER_DB_DSN") or None
    embedded = None
    if dsn is None:
        from aether_desktop.services.embedded_pg import EmbeddedPgError, EmbeddedPostgres

        # The same per-user PostgreSQL the station uses; a running one is adopted, not restarted.
        embedded = EmbeddedPostgres(args.data_dir or default_data_dir())
        try:
            dsn = embedded.start().dsn
        except EmbeddedPgError as exc:
            print(f"aether submit: no database: {exc}; give one with --db DSN", file=sys.stderr)
            return 1
    try:
        # psycopg's async mode needs a selector loop (the Windows default is proactor).
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            return runner.run(_submit(dsn, parsed, wait=args.wait, poll_s=args.poll))
    except (psycopg.Error, TimeoutError) as exc:
        print(f"aether submit: database error: {exc}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            embedded.stop()


async def _submit(dsn: str, req: JobRequest, *, wait: bool, poll_s: float) -> int:
    # The station normally migrates; doing it here too (under the same lock) lets a
    # script submit into a database no station has opened yet.
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await apply_migrations(conn)
    async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
        repo = JobRepository(pool)
        rec = await repo.submit(req, submitted_by=f"{getpass.getuser()}@{socket.gethostname()}")
        print(rec.id, flush=True)
        if not wait:
            return 0
        return await _follow(repo, rec, poll_s)


def describe(rec: JobRecord) -> str:
    """One line per state change, as printed by --wait."""
    where = f" on {rec.host}:{','.join(map(str, rec.gpus))}" if rec.host else ""
    code = f" (exit {rec.exit_code})" if rec.exit_code is not None else ""
    why = f": {rec.reason}" if rec.reason else ""
    return f"{time.strftime('%H:%M:%S')} {rec.id} {rec.state}{where}{code}{why}"


async def _follow(repo: JobRepository, rec: JobRecord, poll_s: float) -> int:
    # Polling, not LISTEN: one cheap query a second is fine for a script and survives
    # a database restart without reconnect logic.
    last = (rec.state, rec.reason)
    print(describe(rec), flush=True)
    while not rec.terminal:
        await asyncio.sleep(poll_s)
        got = await repo.get(rec.id)
        if got is None:
            print(f"aether submit: job {rec.id} disappeared from the database", file=sys.stderr)
            return 1
        rec = got
        if (rec.state, rec.reason) != last:
            last = (rec.state, rec.reason)
            print(describe(rec), flush=True)
    return 0 if rec.state == "finished" else 1
