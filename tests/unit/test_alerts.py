"""Alert lifecycle: hysteresis, quiet-period clearing, grouping, ack/snooze (pure, no I/O)."""

from __future__ import annotations

import itertools

from aether_desktop.services.alerts import (
    Alert,
    AlertManager,
    AlertPolicy,
    Hysteresis,
)
from aether_desktop.services.alerts_store import alert_from_row, alert_row
from aether_desktop.services.rules import Finding


def finding(gpu: int, ts: float, host: str = "h1", detector: str = "model", kind: str = "thermal_anomaly",
            severity: str = "warning", score: float = 0.8) -> Finding:
    return Finding(host, gpu, ts, detector, kind, severity, "model" if detector == "model" else "rule",  # type: ignore[arg-type]
                   score, f"{kind} on {gpu}")


def manager() -> AlertManager:
    ids = itertools.count()
    return AlertManager(AlertPolicy(per_detector={"model": Hysteresis(3, 5, 60.0), "xid": Hysteresis(1, 1, 30.0)}),
                        id_factory=lambda: f"a{next(ids)}")


def drive(m: AlertManager, gpus: int, seconds: range, bad: dict[int, set[int]], host: str = "h1",
          detector: str = "model") -> list:
    changes = []
    for t in seconds:
        seen = {(host, g): float(t) for g in range(gpus)}
        fs = [finding(g, float(t), host, detector) for g in range(gpus) if t in bad.get(g, set())]
        changes += m.update(float(t) + 0.5, seen, fs)
    return changes


def test_raises_after_k_of_n_with_the_first_triggering_sample_time() -> None:
    m = manager()
    ch = drive(m, 1, range(0, 20), {0: {5, 7, 8}})
    raised = [c for c in ch if c.change == "raised"]
    assert len(raised) == 1
    a = raised[0].alert
    assert a.first_ts == 5.0 and a.raised_ts == 8.5 and a.gpus == (0,)


def test_isolated_anomalies_never_raise() -> None:
    m = manager()
    assert drive(m, 1, range(0, 100), {0: set(range(0, 100, 4))}) == []


def test_clears_only_after_a_quiet_period_of_observed_samples() -> None:
    m = manager()
    drive(m, 1, range(0, 10), {0: {1, 2, 3}})
    assert len(m.open_alerts()) == 1
    # Host goes silent: no samples, no clearing however long it lasts.
    assert m.update(1000.0, {}, []) == []
    assert len(m.open_alerts()) == 1
    ch = drive(m, 1, range(1000, 1100), {})
    cleared = [c for c in ch if c.change == "cleared"]
    assert len(cleared) == 1 and cleared[0].alert.state == "cleared"
    assert m.open_alerts() == []


def test_a_failing_host_is_one_alert_listing_its_gpus() -> None:
    m = manager()
    ch = drive(m, 8, range(0, 10), {g: {1, 2, 3, 4} for g in range(8)})
    assert [c.change for c in ch].count("raised") == 1
    [a] = m.open_alerts()
    assert sorted(a.gpus) == list(range(8))
    joined = [g for c in ch for g in c.new_gpus]
    assert sorted(joined) == list(range(8))  # each GPU announced once, when it joined


def test_other_hosts_get_their_own_alerts() -> None:
    m = manager()
    drive(m, 1, range(0, 5), {0: {0, 1, 2}}, host="a")
    drive(m, 1, range(0, 5), {0: {0, 1, 2}}, host="b")
    assert sorted(a.host for a in m.open_alerts()) == ["a", "b"]


def test_repeated_findings_update_rather_than_duplicate() -> None:
    m = manager()
    ch = drive(m, 1, range(0, 200), {0: set(range(0, 200))})
    assert [c.change for c in ch].count("raised") == 1
    [a] = m.open_alerts()
    assert a.count >= 190 and a.last_ts == 199.0


def test_rule_with_k1_fires_at_once() -> None:
    m = manager()
    ch = m.update(1.0, {("h1", 0): 1.0}, [finding(0, 1.0, detector="xid", kind="xid", severity="critical")])
    assert ch[0].change == "raised" and ch[0].alert.severity == "critical"


def test_acknowledge_snooze_and_expiry() -> None:
    m = manager()
    got: list[Alert] = []
    m.on_alert_updated.connect(got.append)
    drive(m, 1, range(0, 5), {0: {0, 1, 2, 3, 4}})
    [a] = m.open_alerts()
    assert m.health() == "warning"
    m.acknowledge(a.id, 10.0)
    assert m.get(a.id).state == "acknowledged" and m.health() is None  # type: ignore[union-attr]
    m.snooze(a.id, 20.0)
    assert m.get(a.id).state == "snoozed"  # type: ignore[union-attr]
    m.update(21.0, {("h1", 0): 21.0}, [finding(0, 21.0)])
    assert m.get(a.id).state == "active"  # type: ignore[union-attr]
    assert [x.state for x in got][:2] == ["acknowledged", "snoozed"]


def test_escalation_reactivates_an_acknowledged_alert() -> None:
    m = manager()
    drive(m, 1, range(0, 5), {0: {0, 1, 2}})
    [a] = m.open_alerts()
    m.acknowledge(a.id, 5.0)
    m.update(6.0, {("h1", 0): 6.0}, [finding(0, 6.0, severity="critical")])
    assert m.get(a.id).state == "active" and m.get(a.id).severity == "critical"  # type: ignore[union-attr]


def test_callbacks_fire_for_each_change() -> None:
    m = manager()
    seen: list[str] = []
    m.on_alert_raised.connect(lambda a: seen.append("raised"))
    m.on_alert_cleared.connect(lambda a: seen.append("cleared"))
    drive(m, 1, range(0, 200), {0: {0, 1, 2}})
    assert seen == ["raised", "cleared"]


def test_restore_keeps_acknowledged_state() -> None:
    m = manager()
    drive(m, 1, range(0, 5), {0: {0, 1, 2}})
    [a] = m.open_alerts()
    acked = m.acknowledge(a.id, 9.0)
    m2 = manager()
    m2.restore([acked], now=10.0)  # type: ignore[list-item]
    ch = m2.update(11.0, {("h1", 0): 11.0}, [finding(0, 11.0)])
    assert ch == [] or ch[0].alert.id == a.id
    assert m2.get(a.id).state == "acknowledged"  # type: ignore[union-attr]


def test_sql_row_round_trip() -> None:
    a = Alert(id="00000000-0000-0000-0000-000000000001", host="h", kind="xid", severity="critical",
              source="rule", state="snoozed", first_ts=100.5, raised_ts=101.0, last_ts=130.25, message="m",
              score=79.0, count=4, gpu_first_ts=((3, 100.5), (5, 120.0)), snoozed_until=4000.0)
    row = alert_row(a, "v1")
    assert row[-1] == "v1"
    back = alert_from_row(row[:-1])
    assert back == a


async def test_runtime_ticks_in_a_worker_and_emits_on_the_loop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import threading

    from aether_desktop.services.anomaly import ModelStore, bootstrap, simulated_messages
    from aether_desktop.services.detection import AlertsRuntime

    ModelStore(tmp_path).save(bootstrap(seed=2, hosts=1, gpus=2, seconds=700, model="H100"))
    now = [1.7e9]
    rt = AlertsRuntime(tmp_path, tick_s=0.01, clock=lambda: now[0])
    infos: list[str] = []
    rt.on_model_info.connect(infos.append)
    raised: list[tuple[Alert, bool]] = []
    rt.manager.on_alert_raised.connect(lambda a: raised.append((a, threading.current_thread() is threading.main_thread())))
    await rt.start()
    assert infos and "v1" in infos[0]
    for tick in simulated_messages(1, 2, 40, seed=9, faults={0: ["xid_storm:gpu=1,at=20,code=48"]}, start_ts=1.7e9):
        for m in tick:
            rt.on_telemetry(m, m.ts)
        now[0] = tick[0].ts + 0.5
        for _ in range(100):
            await asyncio.sleep(0.01)
            if rt.pipeline.stats.messages and not rt.pipeline._pending:
                break
    for _ in range(200):
        if raised:
            break
        await asyncio.sleep(0.01)
    await rt.stop()
    [(a, on_loop)] = raised
    assert a.kind == "xid" and a.gpus == (1,) and a.first_ts == 1.7e9 + 20 and on_loop
