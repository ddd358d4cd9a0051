"""Alert lifecycle: hysteresis, de-duplication, grouping per host, acknowledge, snooze.

Detectors (rules, the anomaly model) emit ``Finding``s per GPU sample. The
manager keeps, per GPU and detector, the last ``n`` sample verdicts and raises
only when ``k`` of them are anomalous, so one noisy sample never pages anyone.
An alert is grouped per host and kind: eight GPUs of a host losing their fans
together are one alert listing eight GPUs, not eight alerts. An alert clears
after a quiet period of *observed* healthy samples (a host that stopped
reporting keeps its alerts open: silence is not health).

The manager is synchronous and pure (no I/O): the station calls ``update``
once per tick; persistence (``alerts_store``) and the UI listen through the
callbacks.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

from aether_desktop.services.rules import SEVERITY_RANK, Finding, Severity

AlertState = Literal["active", "acknowledged", "snoozed", "cleared"]
ChangeKind = Literal["raised", "updated", "cleared"]
T = TypeVar("T")


class Callbacks(Generic[T]):
    """A tiny listener list: services expose these, the Qt bridge turns them into signals."""

    def __init__(self) -> None:
        self._subs: list[Callable[[T], None]] = []

    def connect(self, fn: Callable[[T], None]) -> None:
        self._subs.append(fn)

    def disconnect(self, fn: Callable[[T], None]) -> None:
        self._subs.remove(fn)

    def emit(self, value: T) -> None:
        for fn in list(self._subs):
            fn(value)


@dataclass(frozen=True)
class Alert:
    """A snapshot of one alert (immutable: listeners may keep it)."""

    id: str
    host: str
    kind: str
    severity: Severity
    source: Literal["rule", "model"]
    state: AlertState
    first_ts: float  # time of the first sample that triggered it
    raised_ts: float  # station time when it was raised
    last_ts: float  # last anomalous sample
    message: str
    score: float
    count: int  # anomalous samples seen while open
    gpu_first_ts: tuple[tuple[int, float], ...]  # (gpu, first triggering sample) in joining order
    cleared_ts: float | None = None
    acked_ts: float | None = None
    snoozed_until: float | None = None
    # Whether this snapshot is news worth a notification. False for alerts found in
    # samples taken long before (an agent's outbox replayed after a reconnect) and for
    # alerts raised and cleared within one tick: stored and listed, never popped up.
    # Not stored: it describes this change, not the alert.
    notify: bool = field(default=True, compare=False)

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(g for g, _ in self.gpu_first_ts)

    @property
    def gpu(self) -> int:
        """The first GPU that triggered it (where a click should focus)."""
        return self.gpu_first_ts[0][0]

    @property
    def is_open(self) -> bool:
        return self.state != "cleared"


@dataclass(frozen=True)
class AlertChange:
    change: ChangeKind
    alert: Alert
    new_gpus: tuple[int, ...] = ()  # GPUs that joined the alert with this change


@dataclass(frozen=True)
class Hysteresis:
    k: int  # anomalous samples needed ...
    n: int  # ... among the last n samples of that GPU
    quiet_s: float  # healthy time before an alert clears


@dataclass(frozen=True)
class AlertPolicy:
    # Hard faults fire on the first sample; a temperature or throttle reading
    # must persist; the model needs a majority of a short window.
    per_detector: Mapping[str, Hysteresis] = field(default_factory=lambda: {
        "xid": Hysteresis(1, 1, 300.0),
        "ecc_dbe": Hysteresis(1, 1, 600.0),
        "gpu_lost": Hysteresis(1, 1, 60.0),
        "over_slowdown_temp": Hysteresis(3, 5, 120.0),
        "hw_throttle": Hysteresis(3, 5, 120.0),
        "model": Hysteresis(3, 5, 180.0),
    })
    default: Hysteresis = Hysteresis(3, 5, 180.0)
    # An open alert re-announces its last_ts/count at most this often (persistence refresh).
    refresh_s: float = 30.0
    # An alert whose triggering sample is older than this when it is detected is
    # history, not news (a backlog replayed after an outage): stored and listed but
    # not notified. Age is measured on the host's own clock (see ``_offset``), so
    # a host whose clock is off by minutes is still notified.
    stale_s: float = 300.0

    def for_detector(self, detector: str) -> Hysteresis:
        return self.per_detector.get(detector, self.default)


@dataclass
class _Tracker:
    window: deque[tuple[float, bool]]  # (sample ts, anomalous) for the last n samples of one GPU


@dataclass
class _Open:
    alert: Alert
    gpu_last_hit: dict[int, float]
    detectors: set[str]
    last_emit: float


class AlertManager:
    """Turns per-sample findings into alerts with a lifecycle; emits changes to listeners."""

    def __init__(self, policy: AlertPolicy | None = None, id_factory: Callable[[], str] | None = None) -> None:
        self.policy = policy or AlertPolicy()
        self._new_id = id_factory or (lambda: str(uuid.uuid4()))
        self._trackers: dict[tuple[str, int], dict[str, _Tracker]] = {}  # (host, gpu) -> detector -> window
        self._open: dict[str, _Open] = {}
        self._by_group: dict[tuple[str, str], str] = {}  # (host, kind) -> open alert id
        self._by_gpu: dict[tuple[str, int, str], str] = {}  # (host, gpu, detector) -> open alert id
        self._last_seen: dict[tuple[str, int], float] = {}
        # host -> smallest (station time - newest sample ts) seen per tick: its clock offset
        # plus the least delivery delay. A sample's age is what exceeds that.
        self._offset: dict[str, float] = {}
        # The tick may run in a worker thread while the operator acknowledges on the loop.
        self._lock = threading.RLock()
        self.on_alert_raised: Callbacks[Alert] = Callbacks()
        self.on_alert_updated: Callbacks[Alert] = Callbacks()
        self.on_alert_cleared: Callbacks[Alert] = Callbacks()
        # Open alerts re-opened from storage (``restore``): shown, never notified again.
        self.on_alerts_restored: Callbacks[list[Alert]] = Callbacks()

    # ------------------------------------------------------------------ queries

    def open_alerts(self) -> list[Alert]:
        with self._lock:
            return [o.alert for o in self._open.values()]

    def get(self, alert_id: str) -> Alert | None:
        with self._lock:
            o = self._open.get(alert_id)
            return o.alert if o else None

    def health(self) -> Severity | None:
        """Worst severity among open alerts that still want attention (None = all quiet)."""
        worst: Severity | None = None
        for a in self.open_alerts():  # a copy taken under the lock: the tick may run in a worker
            if a.state != "active":
                continue
            if worst is None or SEVERITY_RANK[a.severity] > SEVERITY_RANK[worst]:
                worst = a.severity
        return worst

    # ------------------------------------------------------------------ operator actions

    def acknowledge(self, alert_id: str, now: float) -> Alert | None:
        with self._lock:
            o = self._open.get(alert_id)
            if o is None:
                return None
            o.alert = replace(o.alert, state="acknowledged", acked_ts=now, snoozed_until=None)
        self.on_alert_updated.emit(o.alert)
        return o.alert

    def snooze(self, alert_id: str, until: float) -> Alert | None:
        with self._lock:
            o = self._open.get(alert_id)
            if o is None:
                return None
            o.alert = replace(o.alert, state="snoozed", snoozed_until=until)
        self.on_alert_updated.emit(o.alert)
        return o.alert

    def restore(self, alerts: Iterable[Alert], now: float) -> list[Alert]:
        """Re-open alerts loaded from storage so acks and snoozes survive a restart.

        Listeners hear of them through ``on_alerts_restored`` (not "raised": they
        are neither new nor to be stored again), so the panel lists them, the
        health colour counts them and the tray does not notify them twice.
        """
        restored: list[Alert] = []
        with self._lock:
            for a in alerts:
                if not a.is_open or a.id in self._open:
                    continue
                hits = {g: a.last_ts for g in a.gpus}
                self._open[a.id] = _Open(a, hits, set(), now)
                # An alert raised before the database opened keeps its group: two
                # open alerts of one kind beat a live one losing its findings.
                group = self._by_group.get((a.host, a.kind))
                if group is None or group not in self._open:
                    self._by_group[(a.host, a.kind)] = a.id
                restored.append(a)
        if restored:
            self.on_alerts_restored.emit(restored)
        return restored

    def rebase_host(self, host: str, ts: float) -> None:
        """The host's clock went back (a new boot, or a step): count its quiet periods from ``ts``.

        Without this an open alert of the host would wait for the new clock to
        catch up with the old one before it could clear.
        """
        with self._lock:
            for o in self._open.values():
                if o.alert.host == host:
                    for g, last in o.gpu_last_hit.items():
                        o.gpu_last_hit[g] = min(last, ts)
            for key in [k for k in self._last_seen if k[0] == host]:
                self._last_seen[key] = min(self._last_seen[key], ts)
            self._offset.pop(host, None)  # re-measured from the new clock

    # ------------------------------------------------------------------ the tick

    def update(self, now: float, seen: Mapping[tuple[str, int], float | Sequence[float]],
               findings: Iterable[Finding], emit: bool = True) -> list[AlertChange]:
        """One tick: ``seen`` maps (host, gpu) -> the ts of every sample processed (or the newest one).

        Every sample is one verdict per tracked detector, in time order: anomalous
        if it has a finding of that detector, healthy otherwise. So the k-of-n rule
        gives the same answer whether samples arrive one per tick or as a backlog
        replayed in one tick. Findings must be in sample order per GPU.
        With ``emit=False`` (a tick run in a worker thread) the caller passes the
        changes to ``emit`` on the event loop, so listeners never run off-loop.
        """
        with self._lock:
            changes = self._update(now, seen, findings)
        if emit:
            self.emit(changes)
        return changes

    def emit(self, changes: Iterable[AlertChange]) -> None:
        for ch in changes:
            {"raised": self.on_alert_raised, "updated": self.on_alert_updated,
             "cleared": self.on_alert_cleared}[ch.change].emit(ch.alert)

    def _update(self, now: float, seen: Mapping[tuple[str, int], float | Sequence[float]],
                findings: Iterable[Finding]) -> list[AlertChange]:
        # Every sample of the tick, with its findings: (host, gpu, ts) -> findings.
        samples: dict[tuple[str, int, float], list[Finding]] = {}
        for (host, gpu), ts_list in seen.items():
            for ts in (ts_list,) if isinstance(ts_list, int | float) else ts_list:
                samples.setdefault((host, gpu, float(ts)), [])
        for f in findings:
            samples.setdefault((f.host, f.gpu, f.ts), []).append(f)
        newest: dict[str, float] = {}
        for host, _, ts in samples:
            newest[host] = max(ts, newest.get(host, -math.inf))
        for host, ts in newest.items():
            self._offset[host] = min(now - ts, self._offset.get(host, math.inf))
        changes: list[AlertChange] = []
        for host, gpu, ts in sorted(samples, key=lambda s: s[2]):  # stable: per-GPU order is kept
            changes.extend(self._sample(now, host, gpu, ts, samples[(host, gpu, ts)]))
            if ts > self._last_seen.get((host, gpu), -math.inf):
                self._last_seen[(host, gpu)] = ts
        changes.extend(self._expire(now))
        # Raised (or escalated) and cleared within this one tick: a replayed burst
        # that is already over. Stored and listed, but nobody should be paged for it.
        over = {ch.alert.id for ch in changes if ch.change == "cleared"}
        return [replace(ch, alert=replace(ch.alert, notify=False)) if ch.alert.id in over and ch.alert.notify
                else ch for ch in changes]

    def _sample(self, now: float, host: str, gpu: int, ts: float, findings: list[Finding]) -> list[AlertChange]:
        """One sample of one GPU: one verdict for every detector tracked on that GPU."""
        changes: list[AlertChange] = []
        trackers = self._trackers.setdefault((host, gpu), {})
        hit: set[str] = set()
        for f in findings:
            key = (host, gpu, f.detector)
            if f.detector not in hit:  # several findings of one detector in one sample are one verdict
                hit.add(f.detector)
                self._push(trackers, f.detector, ts, True)
            tr = trackers[f.detector]
            # Hard to raise, easy to keep: once a GPU is in an open alert, any
            # further finding extends it even if k-of-n is not met right now.
            if self._triggered(key, tr) or self._by_gpu.get(key) in self._open:
                first = next(t for t, bad in tr.window if bad)
                changes.extend(self._apply(f, first, now))
        for detector in [d for d in trackers if d not in hit]:
            tr = self._push(trackers, detector, ts, False)
            if not any(bad for _, bad in tr.window):
                del trackers[detector]
        if not trackers:
            del self._trackers[(host, gpu)]
        return changes

    # ------------------------------------------------------------------ internals

    def _push(self, trackers: dict[str, _Tracker], detector: str, ts: float, bad: bool) -> _Tracker:
        tr = trackers.get(detector)
        if tr is None:
            n = self.policy.for_detector(detector).n
            tr = trackers[detector] = _Tracker(deque(maxlen=n))
        tr.window.append((ts, bad))
        return tr

    def _triggered(self, key: tuple[str, int, str], tr: _Tracker) -> bool:
        h = self.policy.for_detector(key[2])
        return sum(1 for _, bad in tr.window if bad) >= h.k

    def _apply(self, f: Finding, first_ts: float, now: float) -> list[AlertChange]:
        gkey = (f.host, f.gpu, f.detector)
        aid = self._by_gpu.get(gkey)
        if aid is None or aid not in self._open:
            # Group per host and kind; the model's kind for a GPU is fixed by the
            # finding that first triggered, so a GPU is not counted twice.
            aid = self._by_group.get((f.host, f.kind))
        o = self._open.get(aid) if aid else None
        fresh = now - self._offset.get(f.host, 0.0) - f.ts <= self.policy.stale_s
        if o is None:
            alert = Alert(id=self._new_id(), host=f.host, kind=f.kind, severity=f.severity, source=f.source,
                          state="active", first_ts=first_ts, raised_ts=now, last_ts=f.ts, message=f.message,
                          score=f.score, count=1, gpu_first_ts=((f.gpu, first_ts),), notify=fresh)
            self._open[alert.id] = _Open(alert, {f.gpu: f.ts}, {f.detector}, now)
            self._by_group[(f.host, f.kind)] = alert.id
            self._by_gpu[gkey] = alert.id
            return [AlertChange("raised", alert, (f.gpu,))]
        a = o.alert
        self._by_gpu[gkey] = a.id
        o.detectors.add(f.detector)
        joined = f.gpu not in o.gpu_last_hit
        o.gpu_last_hit[f.gpu] = f.ts
        escalated = SEVERITY_RANK[f.severity] > SEVERITY_RANK[a.severity]
        state: AlertState = a.state
        if escalated and state != "active":
            state = "active"  # a worse fault deserves attention again even if acknowledged
        o.alert = replace(
            a, last_ts=max(a.last_ts, f.ts), count=a.count + 1, score=max(a.score, f.score),
            severity=f.severity if escalated else a.severity, state=state,
            message=f.message if (escalated or f.score > a.score) else a.message,
            gpu_first_ts=a.gpu_first_ts + ((f.gpu, first_ts),) if joined else a.gpu_first_ts, notify=fresh,
        )
        if joined or escalated or now - o.last_emit >= self.policy.refresh_s:
            o.last_emit = now
            return [AlertChange("updated", o.alert, (f.gpu,) if joined else ())]
        return []

    def _expire(self, now: float) -> list[AlertChange]:
        out: list[AlertChange] = []
        for aid, o in list(self._open.items()):
            a = o.alert
            if a.state == "snoozed" and a.snoozed_until is not None and now >= a.snoozed_until:
                o.alert = a = replace(a, state="active", snoozed_until=None)
                out.append(AlertChange("updated", a))
            quiet = max((self.policy.for_detector(d).quiet_s for d in o.detectors), default=self.policy.default.quiet_s)
            # Clear only when every GPU has been *seen* healthy for the quiet period.
            if all(self._last_seen.get((a.host, g), -1e300) - last >= quiet for g, last in o.gpu_last_hit.items()):
                o.alert = a = replace(a, state="cleared", cleared_ts=now)
                del self._open[aid]
                if self._by_group.get((a.host, a.kind)) == aid:
                    del self._by_group[(a.host, a.kind)]
                for k in [k for k, v in self._by_gpu.items() if v == aid]:
                    del self._by_gpu[k]
                out.append(AlertChange("cleared", a))
        return out
