"""FleetState: ingest, ring alignment, replays, liveness, growth, rates (pure numpy, no Qt)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aether_desktop.services.fleet import STATE_LOST, STATE_OFFLINE, STATE_OK, STATE_SLEEPING, FleetState
from aether_protocol.messages import GpuSample, Process, Telemetry

T0 = 1_764_262_800.0


def gpu(i: int, temp: float | None = 40.0, state: str = "ok", **kw: object) -> GpuSample:
    fields: dict[str, object] = {
        "temp_c": temp,
        "mem_used_mib": 1000.0 + i,
        "mem_total_mib": 80000.0,
        "util_pct": 50.0,
        "power_w": 200.0,
        "power_limit_w": 700.0,
    }
    if state == "lost":
        fields = {}
    fields.update(kw)
    return GpuSample(index=i, uuid=f"GPU-{i}", name="NVIDIA H100 80GB HBM3", state=state, **fields)  # type: ignore[arg-type]


def tel(host: str, seq: int, ts: float, gpus: list[GpuSample], boot: str = "b1", interval: float = 1.0,
        state: str = "active") -> Telemetry:
    return Telemetry(v=1, host=host, boot=boot, seq=seq, ts=ts, state=state, gpus=gpus,  # type: ignore[arg-type]
                     interval_s=interval)


def test_ingest_creates_slots_and_latest() -> None:
    f = FleetState(history_s=60)
    f.ingest(tel("a", 0, T0, [gpu(0, 41.0), gpu(1, 42.0)]), T0)
    f.ingest(tel("b", 0, T0, [gpu(0, 43.0)]), T0)
    assert f.keys() == [("a", 0), ("a", 1), ("b", 0)]
    assert f.row_of(("b", 0)) == 2
    np.testing.assert_allclose(f.latest("temp_c"), [41.0, 42.0, 43.0])
    assert f.names()[0] == "NVIDIA H100 80GB HBM3"
    assert f.uuid(1) == "GPU-1"
    assert f.n_hosts == 2 and f.version == 2
    rows = f.rows(T0)
    assert rows[2].key == ("b", 0) and rows[2].values["temp_c"] == 43.0 and rows[2].state == "ok"
    assert rows[0].values["fan_pct"] is None


def test_ring_alignment_last_column_is_now() -> None:
    f = FleetState(history_s=10)
    for k in range(5):
        f.ingest(tel("a", k, T0 + k + 0.3, [gpu(0, 40.0 + k)]), T0 + k + 0.4)
    m = f.matrix("temp_c", T0 + 4.9)
    assert m.shape == (1, 10)
    np.testing.assert_allclose(m[0, -5:], [40, 41, 42, 43, 44])
    assert np.isnan(m[0, :-5]).all()
    # Two seconds later without data: the curve shifts left, new columns are NaN.
    m2 = f.matrix("temp_c", T0 + 6.0)
    np.testing.assert_allclose(m2[0, -7:-2], [40, 41, 42, 43, 44])
    assert np.isnan(m2[0, -2:]).all()
    ts = f.time_axis(T0 + 6.0)
    assert ts[-1] == math.floor(T0 + 6.0) and ts[-1] - ts[0] == 9
    t, v = f.series(("a", 0), "temp_c", T0 + 4.0)
    assert t[-1] == T0 + 4 and v[-1] == 44.0


def test_ring_wraps_and_clears_old_columns() -> None:
    f = FleetState(history_s=4)
    for k in range(10):
        f.ingest(tel("a", k, T0 + k, [gpu(0, float(k))]), T0 + k)
    np.testing.assert_allclose(f.matrix("temp_c", T0 + 9)[0], [6, 7, 8, 9])
    # A gap longer than the window: everything old is gone.
    f.ingest(tel("a", 10, T0 + 30, [gpu(0, 99.0)]), T0 + 30)
    m = f.matrix("temp_c", T0 + 30)[0]
    assert m[-1] == 99.0 and np.isnan(m[:-1]).all()


def test_replayed_samples_fill_ring_but_not_latest() -> None:
    f = FleetState(history_s=60)
    f.ingest(tel("a", 0, T0, [gpu(0, 40.0)]), T0)
    f.ingest(tel("a", 10, T0 + 10, [gpu(0, 50.0)]), T0 + 10)
    assert f.host("a").seq_gaps == 9  # type: ignore[union-attr]
    # The agent replays its buffer: seq 5 at its original time, after seq 10.
    f.ingest(tel("a", 5, T0 + 5, [gpu(0, 45.0, throttle=["hw_thermal"])]), T0 + 11)
    assert f.latest("temp_c")[0] == 50.0
    assert f.throttle(0) == ()
    m = f.matrix("temp_c", T0 + 10)[0]
    assert m[-6] == 45.0 and m[-1] == 50.0
    info = f.host("a")
    assert info is not None and info.replayed == 1 and info.seq_gaps == 8 and info.last_seq == 10
    # Older than the window: counted, not stored, no crash.
    f.ingest(tel("a", 1, T0 - 1000, [gpu(0, 1.0)]), T0 + 12)
    assert f.too_old == 1 and f.latest("temp_c")[0] == 50.0


def test_future_clock_does_not_wipe_history() -> None:
    f = FleetState(history_s=60)
    f.ingest(tel("a", 0, T0, [gpu(0, 40.0)]), T0)
    f.ingest(tel("skewed", 0, T0 + 3600, [gpu(0, 70.0)]), T0 + 1)
    m = f.matrix("temp_c", T0 + 1)
    assert m[0, -2] == 40.0 and m[1, -1] == 70.0


def test_offline_after_three_intervals() -> None:
    f = FleetState()
    f.ingest(tel("a", 0, T0, [gpu(0)], interval=2.0), T0)
    f.ingest(tel("b", 0, T0, [gpu(0)], interval=1.0), T0)
    assert f.host_online("a", T0 + 5.9) and f.host_online("a", T0 + 6.0)
    assert not f.host_online("a", T0 + 6.1)
    assert not f.host_online("b", T0 + 3.5)
    assert not f.host_online("nope", T0)
    assert f.hosts_online(T0 + 1) == 2 and f.hosts_online(T0 + 4) == 1
    np.testing.assert_array_equal(f.display_states(T0 + 4), [STATE_OK, STATE_OFFLINE])
    v = f.version
    assert f.poll(T0 + 1) and f.version == v + 1
    assert not f.poll(T0 + 1.5)
    assert f.poll(T0 + 4) and f.version == v + 2


def test_gpu_states_lost_is_nan_and_sleeping() -> None:
    f = FleetState()
    f.ingest(tel("a", 0, T0, [gpu(0), gpu(1, state="lost"), gpu(2, state="sleeping")]), T0)
    np.testing.assert_array_equal(f.gpu_states(), [STATE_OK, STATE_LOST, STATE_SLEEPING])
    assert np.isnan(f.latest("temp_c")[1]) and np.isnan(f.matrix("temp_c", T0)[1, -1])
    assert f.rows(T0)[1].values["temp_c"] is None


def test_growth_beyond_capacity_keeps_data() -> None:
    f = FleetState(history_s=8, capacity=2, max_gpus=100)
    for h in range(30):
        f.ingest(tel(f"h{h}", 0, T0, [gpu(0, float(h)), gpu(1, float(h))]), T0)
    assert f.n_slots == 60
    np.testing.assert_allclose(f.latest("temp_c")[::2], np.arange(30))
    np.testing.assert_allclose(f.matrix("temp_c", T0)[::2, -1], np.arange(30))
    for h in range(30, 60):
        f.ingest(tel(f"h{h}", 0, T0, [gpu(0), gpu(1)]), T0)
    assert f.n_slots == 100 and f.dropped_gpus == 20


def test_non_adjacent_rows_use_fancy_path() -> None:
    f = FleetState()
    f.ingest(tel("a", 0, T0, [gpu(0, 1.0)]), T0)
    f.ingest(tel("b", 0, T0, [gpu(0, 2.0)]), T0)
    f.ingest(tel("a", 1, T0 + 1, [gpu(0, 3.0), gpu(1, 4.0)]), T0 + 1)  # rows 0 and 2
    np.testing.assert_allclose(f.latest("temp_c"), [3.0, 2.0, 4.0])
    np.testing.assert_allclose(f.matrix("temp_c", T0 + 1)[[0, 2], -1], [3.0, 4.0])


def test_mem_pct_and_rows_subset() -> None:
    f = FleetState(history_s=10)
    f.ingest(tel("a", 0, T0, [gpu(0, mem_used_mib=40000.0), gpu(1, mem_total_mib=None)]), T0)
    pct = f.matrix("mem_pct", T0)
    assert pct[0, -1] == pytest.approx(50.0) and np.isnan(pct[1, -1])
    assert f.matrix("temp_c", T0, rows=[1]).shape == (1, 10)


def test_rate_meter() -> None:
    f = FleetState(rate_window_s=5)
    for sec in range(10):
        for k in range(4):
            f.ingest(tel(f"h{k}", sec, T0 + sec, [gpu(0), gpu(1)]), T0 + sec + 0.1 * k)
    msgs, samples = f.rates(T0 + 10.2)
    assert msgs == pytest.approx(4.0) and samples == pytest.approx(8.0)
    assert f.rates(T0 + 100) == (0.0, 0.0)
    assert f.messages_total == 40 and f.samples_total == 80


def test_boot_change_resets_sequence() -> None:
    f = FleetState()
    f.ingest(tel("a", 100, T0, [gpu(0)], boot="x"), T0)
    f.ingest(tel("a", 0, T0 + 1, [gpu(0)], boot="y"), T0 + 1)
    info = f.host("a")
    assert info is not None and info.restarts == 1 and info.seq_gaps == 0 and info.boot == "y"


def test_rejected_counter() -> None:
    f = FleetState()
    f.note_rejected("invalid_json")
    f.note_rejected("invalid_json", 2)
    assert f.rejected_total == 3 and f.version == 2



# --------------------------------------------------------------------------- batched ingest


def _nan_safe(a: np.ndarray) -> list[object]:
    return np.where(np.isnan(a), None, a).tolist()  # type: ignore[no-any-return]


def _state_of(f: FleetState, now: float) -> dict[str, object]:
    """Everything observable about a FleetState except ``version`` (batches bump it once)."""
    hosts = {
        h.host: (h.boot, h.last_seq, h.last_ts, h.last_seen, h.interval_s, h.state, h.gpu_count, h.messages,
                 h.samples, h.seq_gaps, h.replayed, h.restarts)
        for h in f.hosts()
    }
    return {
        "keys": f.keys(),
        "names": f.names(),
        "uuids": [f.uuid(r) for r in range(f.n_slots)],
        "throttle": [f.throttle(r) for r in range(f.n_slots)],
        "latest": {fld: _nan_safe(f.latest(fld)) for fld in ("temp_c", "power_w", "fan_pct", "n_procs", "xid")},
        "states": f.gpu_states().tolist(),
        "rings": {m: _nan_safe(f.matrix(m, now)) for m in ("temp_c", "util_pct", "power_limit_w")},
        "hosts": hosts,
        "totals": (f.messages_total, f.samples_total, f.dropped_gpus, f.too_old),
    }


def _traffic(seed: int) -> list[tuple[Telemetry, float]]:
    """Messy but realistic traffic: replays, restarts, GPUs appearing, lost GPUs, skewed clocks."""
    rng = np.random.default_rng(seed)
    out: list[tuple[Telemetry, float]] = []
    seqs = {f"h{k}": 0 for k in range(6)}
    for step in range(120):
        host = f"h{int(rng.integers(0, 6))}"
        arrival = T0 + step * 0.25
        seq = seqs[host]
        seqs[host] += int(rng.integers(1, 3))  # sometimes skips one: a gap
        ts = arrival - 0.1
        kind = rng.random()
        boot = "b1"
        if kind < 0.1 and seq > 3:
            seq, ts = seq - 2, ts - 2.0  # a replay from the agent's buffer
        elif kind < 0.13:
            ts = arrival + 3600  # clock far ahead
        elif kind < 0.15 and step > 60:
            boot = "b2"
        n_gpus = 2 + (step > 40) + (host == "h0")
        gpus = [
            gpu(i, temp=float(rng.integers(30, 90)), state="lost" if rng.random() < 0.05 else "ok",
                fan_pct=None if rng.random() < 0.5 else 30.0,
                throttle=["hw_slowdown"] if rng.random() < 0.2 else [],
                processes=[Process(pid=1), Process(pid=2)] if rng.random() < 0.3 else None)
            for i in range(n_gpus)
        ]
        out.append((tel(host, seq, ts, gpus, boot=boot), arrival))
    return out


@pytest.mark.parametrize("batch", [1, 3, 8, 50])
def test_ingest_many_matches_one_by_one(batch: int) -> None:
    traffic = _traffic(seed=batch)
    one = FleetState(history_s=30, capacity=4)
    for msg, at in traffic:
        one.ingest(msg, at)
    many = FleetState(history_s=30, capacity=4)
    for i in range(0, len(traffic), batch):
        chunk = traffic[i : i + batch]
        # The bus stamps a chunk with one arrival time; the same time is used one by one below.
        at = chunk[-1][1]
        many.ingest_many([m for m, _ in chunk], at)
    again = FleetState(history_s=30, capacity=4)
    for i in range(0, len(traffic), batch):
        chunk = traffic[i : i + batch]
        for msg, _ in chunk:
            again.ingest(msg, chunk[-1][1])
    now = traffic[-1][1]
    assert _state_of(many, now) == _state_of(again, now)
    assert one.samples_total == many.samples_total


def test_ingest_many_same_host_twice_keeps_newest() -> None:
    f = FleetState(history_s=60)
    f.ingest_many([tel("a", 2, T0 + 2, [gpu(0, 52.0)]), tel("a", 1, T0 + 1, [gpu(0, 51.0)]),
                   tel("b", 0, T0, [gpu(0, 60.0)])], T0 + 2.5)
    np.testing.assert_allclose(f.latest("temp_c"), [52.0, 60.0])
    np.testing.assert_allclose(f.matrix("temp_c", T0 + 2)[0, -3:], [np.nan, 51.0, 52.0])
    info = f.host("a")
    assert info is not None and info.last_seq == 2 and info.replayed == 1 and info.messages == 2
    assert f.version == 1 and f.messages_total == 3 and f.samples_total == 3


def test_ingest_many_empty_and_capacity_limit() -> None:
    f = FleetState(history_s=8, capacity=2, max_gpus=3)
    f.ingest_many([], T0)
    assert f.version == 0 and f.n_slots == 0
    msgs = [tel(f"h{k}", 0, T0, [gpu(0, float(k)), gpu(1, float(k))]) for k in range(3)]
    f.ingest_many(msgs, T0)
    f.ingest_many(msgs, T0 + 1)
    assert f.n_slots == 3 and f.dropped_gpus == 6
    np.testing.assert_allclose(f.latest("temp_c"), [0.0, 0.0, 1.0])
    assert f.samples_total == 6


def test_ingest_many_counts_processes_and_names_follow_newest() -> None:
    f = FleetState()
    f.ingest_many([tel("a", 0, T0, [gpu(0, processes=[Process(pid=1), Process(pid=2)], throttle=["sw_thermal"])])], T0)
    assert f.latest("n_procs")[0] == 2.0 and f.throttle(0) == ("sw_thermal",)
    f.ingest_many([tel("a", 1, T0 + 1, [gpu(0)])], T0 + 1)
    assert np.isnan(f.latest("n_procs")[0]) and f.throttle(0) == ()


# --------------------------------------------------------------------------- backfill from the database

RING = ("temp_c", "mem_used_mib", "mem_total_mib", "util_pct", "power_w", "power_limit_w")


def stored(keys: list[tuple[str, int]], ts: list[float], temps: list[float]) -> tuple[np.ndarray, np.ndarray]:
    vals = np.full((len(keys), len(RING)), np.nan, dtype=np.float32)
    vals[:, 0] = temps
    vals[:, 2] = 80000.0
    return np.array(ts, dtype=np.float64), vals


def test_backfill_fills_an_empty_ring_and_shows_unheard_gpus_offline() -> None:
    f = FleetState(history_s=60)
    keys = [("a", 0), ("a", 0), ("a", 1)]
    ts, vals = stored(keys, [T0 - 2.5, T0 - 1.5, T0 - 1.5], [50.0, 51.0, 60.0])
    placed = f.backfill([("a", 0, "GPU-0", "H100"), ("a", 1, "GPU-1", "H100")], keys, ts, vals, T0)
    assert placed == 3
    assert f.keys() == [("a", 0), ("a", 1)] and f.names() == ["H100", "H100"] and f.uuid(1) == "GPU-1"
    m = f.matrix("temp_c", T0)
    np.testing.assert_allclose(m[0, -4:-2], [50.0, 51.0])  # seconds T0-3 and T0-2
    assert m[1, -3] == 60.0 and np.isnan(m[:, -2:]).all()
    # The newest stored values stand as latest ones; no traffic counted, the host has not reported.
    np.testing.assert_allclose(f.latest("temp_c"), [51.0, 60.0])
    assert np.isnan(f.latest("fan_pct")).all()  # not a ring metric: unknown
    assert f.messages_total == 0 and f.samples_total == 0
    assert (f.display_states(T0) == STATE_OFFLINE).all()
    # The first live message uses the same slots and brings them online.
    f.ingest(tel("a", 9, T0 + 0.2, [gpu(0, 70.0), gpu(1, 71.0)]), T0 + 0.3)
    assert f.keys() == [("a", 0), ("a", 1)]
    assert (f.display_states(T0 + 0.5) == STATE_OK).all()
    m = f.matrix("temp_c", T0 + 0.5)
    np.testing.assert_allclose(m[0, -4:], [50.0, 51.0, np.nan, 70.0])


def test_backfill_never_overwrites_live_samples_and_skips_what_does_not_fit() -> None:
    f = FleetState(history_s=10)
    for k in range(3):
        f.ingest(tel("a", k, T0 + k, [gpu(0, 40.0 + k)]), T0 + k)
    keys = [("a", 0)] * 5 + [("zz", 3)]
    # live second (kept), a gap (filled), older than the ring, newer than now, unknown GPU
    ts, vals = stored(keys, [T0 + 1, T0 - 1, T0 - 30, T0 + 50, T0 - 2, T0 - 1], [99.0, 39.0, 1.0, 2.0, 38.0, 5.0])
    assert f.backfill([], keys, ts, vals, T0 + 2.5) == 2
    m = f.matrix("temp_c", T0 + 2.5)
    np.testing.assert_allclose(m[0, -5:], [38.0, 39.0, 40.0, 41.0, 42.0])
    assert f.keys() == [("a", 0)]
    assert f.latest("temp_c")[0] == 42.0


def test_backfill_with_nothing_stored_changes_nothing() -> None:
    f = FleetState(history_s=10)
    v = f.version
    assert f.backfill([], [], np.empty(0), np.empty((0, len(RING)), np.float32), T0) == 0
    assert f.version == v and f.n_slots == 0
