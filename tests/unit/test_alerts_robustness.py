"""Alerting under real-world input: replayed backlogs, clocks that go back, thread safety, no database yet.

Pure (no Qt, no network): the pipeline and the manager are driven with
explicit timestamps, so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from aether_desktop.services.alerts import Alert, AlertManager
from aether_desktop.services.alerts_store import AlertWriter
from aether_desktop.services.detection import AlertsRuntime, DetectionPipeline
from aether_desktop.services.rules import Finding
from aether_protocol import GpuSample, Telemetry


def msg(ts: float, bad: bool = False, *, host: str = "h1", boot: str = "b", seq: int | None = None,
        lost: bool = False) -> Telemetry:
    if lost:
        g = GpuSample(index=0, uuid="u0", name="NVIDIA H100", state="lost")
    else:
        g = GpuSample(index=0, uuid="u0", name="NVIDIA H100", state="ok", temp_c=60.0, power_w=300.0,
                      throttle=["hw_slowdown"] if bad else None)
    return Telemetry(v=1, host=host, boot=boot, seq=int(ts) if seq is None else seq, ts=ts, state="active",
                     gpus=[g])


def live(p: DetectionPipeline, msgs: list[Telemetry], per_tick: int = 1) -> list[str]:
    out: list[str] = []
    for i in range(0, len(msgs), per_tick):
        chunk = msgs[i:i + per_tick]
        for m in chunk:
            p.add(m)
        out += [c.change for c in p.tick(chunk[-1].ts + 0.5)]
    return out


def xid(host: str, t: float, severity: str = "critical") -> Finding:
    return Finding(host, 0, t, "xid", "xid", severity, "rule", 79.0, "XID 79")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- 1: every sample counts


def test_a_replayed_backlog_gets_the_same_verdict_as_live_samples() -> None:
    msgs = [msg(1000.0 + i, i in {100, 250, 400}) for i in range(600)]  # three isolated throttle blips
    assert live(DetectionPipeline(None), msgs) == []
    p = DetectionPipeline(None)
    for m in msgs:
        p.add(m)
    assert p.tick(5000.0) == []  # the agent's outbox replayed after a reconnect: one tick
    assert p.manager.open_alerts() == []


def test_two_samples_per_tick_count_like_one_per_tick() -> None:
    msgs = [msg(2000.0 + i, i % 3 == 0) for i in range(12)]  # b g g b g g ...: at most 2 of any 5
    assert live(DetectionPipeline(None), msgs, per_tick=1) == []
    assert live(DetectionPipeline(None), msgs, per_tick=2) == []
    # And a real 3-of-5 still raises when its samples come two at a time.
    bad = [msg(3000.0 + i, i in {1, 2, 3}) for i in range(6)]
    assert live(DetectionPipeline(None), bad, per_tick=2) == ["raised"]


def test_manager_takes_every_sample_ts_of_a_gpu() -> None:
    m = AlertManager()
    # Bad samples at 0, 2, 4 with healthy ones between: 3 of 5 -> raised.
    fs = [Finding("h", 0, t, "model", "thermal_anomaly", "warning", "model", 0.9, "hot") for t in (0.0, 2.0, 4.0)]
    assert m.update(4.5, {("h", 0): [0.0, 1.0, 2.0, 3.0, 4.0]}, fs)[0].change == "raised"
    # Bad at 10 and 12 only, healthy 11, 13, 14: the window (last 5) holds 2 bad -> nothing new.
    m2 = AlertManager()
    fs2 = [Finding("h", 0, t, "model", "thermal_anomaly", "warning", "model", 0.9, "hot") for t in (10.0, 12.0)]
    assert m2.update(15.0, {("h", 0): [10.0, 11.0, 12.0, 13.0, 14.0]}, fs2) == []


def test_an_alert_raised_and_cleared_within_one_replay_is_stored_but_not_news() -> None:
    m = AlertManager()
    seen = {("n1", 0): [float(t) for t in range(1000, 1400)]}  # an XID at 1000, then 400 s of health
    changes = m.update(1400.5, seen, [xid("n1", 1000.0)])
    assert [c.change for c in changes] == ["raised", "cleared"]
    assert not any(c.alert.notify for c in changes)


def test_an_alert_found_in_old_samples_is_not_news() -> None:
    m = AlertManager()
    m.update(100.5, {("n1", 0): 100.0}, [])  # live: the host's clock agrees with the station
    # Ten minutes later its outbox replays: ECC errors taken 9 minutes ago, then samples up to now.
    seen = {("n1", 0): [160.0 + i for i in range(541)]}
    ecc = Finding("n1", 0, 160.0, "ecc_dbe", "ecc_dbe", "critical", "rule", 1.0, "ECC rose")
    [ch] = m.update(700.5, seen, [ecc])
    assert ch.change == "raised" and not ch.alert.notify and ch.alert.first_ts == 160.0
    # A fresh XID on another host is news.
    [fresh] = m.update(701.0, {("n2", 0): 700.5}, [xid("n2", 700.5)])
    assert fresh.alert.notify


def test_a_host_clock_minutes_off_is_still_news() -> None:
    m = AlertManager()
    m.update(10_000.5, {("n1", 0): 9_100.0}, [])  # the agent's clock runs 15 minutes behind
    [ch] = m.update(10_001.5, {("n1", 0): 9_101.0}, [xid("n1", 9_101.0)])
    assert ch.alert.notify


# ---------------------------------------------------------------------- 2: clocks that go back


def test_a_new_boot_with_an_earlier_clock_is_not_dropped() -> None:
    p = DetectionPipeline(None)
    live(p, [msg(10_000.0 + i, boot="b1") for i in range(10)])
    out = live(p, [msg(9_110.0 + i, boot="b2", lost=True) for i in range(5)])
    assert out[0] == "raised" and p.stats.stale_dropped == 0 and p.stats.clock_resets == 1


def test_a_clock_step_within_one_boot_restarts_the_order_but_duplicates_are_dropped() -> None:
    p = DetectionPipeline(None)
    live(p, [msg(10_000.0 + i, seq=i) for i in range(10)])
    live(p, [msg(10_005.0, seq=5)])  # a redelivered duplicate: dropped
    assert p.stats.stale_dropped == 1 and p.stats.clock_resets == 0
    # NTP steps the clock back 15 minutes: seq keeps growing, so these are new samples.
    out = live(p, [msg(9_110.0 + i, seq=10 + i, lost=True) for i in range(5)])
    assert out[0] == "raised" and p.stats.clock_resets == 1 and p.stats.stale_dropped == 1


def test_an_open_alert_clears_on_the_new_clock_after_a_step_back() -> None:
    p = DetectionPipeline(None)
    live(p, [msg(10_000.0 + i, seq=i, lost=i < 3) for i in range(10)])
    assert len(p.manager.open_alerts()) == 1
    # The clock steps back 15 minutes; the GPU stays healthy past gpu_lost's quiet period (60 s).
    changes = live(p, [msg(9_100.0 + i, seq=10 + i) for i in range(70)])
    assert "cleared" in changes and p.manager.open_alerts() == []


# ---------------------------------------------------------------------- 3: restored alerts are announced


def test_restore_announces_the_reopened_alerts() -> None:
    m = AlertManager()
    got: list[list[Alert]] = []
    raised: list[Alert] = []
    m.on_alerts_restored.connect(got.append)
    m.on_alert_raised.connect(raised.append)
    a = Alert(id="a1", host="n1", kind="xid", severity="critical", source="rule", state="active", first_ts=1.0,
              raised_ts=1.0, last_ts=1.0, message="XID 79", score=79.0, count=1, gpu_first_ts=((2, 1.0),))
    cleared = Alert(**{**a.__dict__, "id": "a2", "state": "cleared", "cleared_ts": 2.0})
    assert m.restore([a, cleared], now=10.0) == [a]
    assert got == [[a]] and raised == [] and m.health() == "critical"
    assert m.restore([a], now=11.0) == [] and got == [[a]]  # already open: not announced twice


# ---------------------------------------------------------------------- 5: alerts before the database


def test_writer_queues_before_it_has_a_database_and_is_bounded() -> None:
    ids = itertools.count()
    m = AlertManager(id_factory=lambda: f"a{next(ids)}")
    w = AlertWriter(None, m, max_pending=3)
    for h in range(5):
        m.update(1.0, {(f"h{h}", 0): 1.0}, [xid(f"h{h}", 1.0)])
    assert w.pending == 3 and w.dropped == 2


def test_runtime_keeps_alerts_raised_before_the_database_opens(tmp_path: Path) -> None:
    saved: list[Alert] = []

    class Repo:
        async def load_open(self) -> list[Alert]:
            return []

        async def save_many(self, alerts: list[Alert], _version: str | None = None) -> None:
            saved.extend(alerts)

    async def go() -> None:
        rt = AlertsRuntime(tmp_path, clock=lambda: 5.0)
        rt.manager.update(1.0, {("n1", 3): 1.0}, [Finding("n1", 3, 1.0, "gpu_lost", "gpu_lost", "critical",
                                                          "rule", 1.0, "GPU 3 lost")])
        task = asyncio.create_task(rt._writer.run(Repo()))  # type: ignore[arg-type]
        await asyncio.wait_for(rt._writer.flush(), 5.0)
        task.cancel()

    asyncio.run(go())
    assert [(a.host, a.kind) for a in saved] == [("n1", "gpu_lost")]


# ---------------------------------------------------------------------- 7: health under the lock


def test_health_reads_the_open_alerts_under_the_lock() -> None:
    m = AlertManager()
    m.update(1.0, {("n1", 0): 1.0}, [xid("n1", 1.0)])
    unlocked: list[str] = []

    class Checked(dict):  # type: ignore[type-arg]
        def values(self):  # type: ignore[no-untyped-def]
            if not m._lock._is_owned():  # type: ignore[attr-defined]
                unlocked.append("values")
            return super().values()

        def items(self):  # type: ignore[no-untyped-def]
            if not m._lock._is_owned():  # type: ignore[attr-defined]
                unlocked.append("items")
            return super().items()

        def __iter__(self):  # type: ignore[no-untyped-def]
            if not m._lock._is_owned():  # type: ignore[attr-defined]
                unlocked.append("iter")
            return super().__iter__()

    m._open = Checked(m._open)
    assert m.health() == "critical"
    assert m.get(next(iter(dict(m._open)))) is not None
    assert unlocked == []
