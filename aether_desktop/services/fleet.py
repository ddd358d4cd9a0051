"""Live fleet model: latest values, 1-second ring history and host liveness (numpy, no Qt).

The bus hands every decoded telemetry message to ``FleetState.ingest``; the UI
reads arrays from it at frame rate. Everything is keyed by slot row: a GPU
``(host, index)`` gets a row the first time it is seen and keeps it, so views
can hold row numbers and index arrays with them.

Clock: ``received_at`` and every ``now`` argument are wall-clock epoch seconds
(``time.time()``), the same clock as the messages' ``ts``, because the ring is
placed by sample time and the views align it to ``now``.

Per-host bookkeeping, liveness and the rate meter live in
:mod:`aether_desktop.services.fleet_hosts` (``HostInfo`` is re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np

from aether_desktop.services.fleet_hosts import HostInfo as HostInfo
from aether_desktop.services.fleet_hosts import HostTable, RateMeter, grow
from aether_protocol.messages import GpuSample, Telemetry

Key = tuple[str, int]

# Metrics kept per second for the last ``history_s`` seconds (row order of the ring).
RING_METRICS: tuple[str, ...] = (
    "temp_c",
    "mem_used_mib",
    "mem_total_mib",
    "util_pct",
    "power_w",
    "power_limit_w",
)
# Latest value per slot: the ring metrics first (same order), then the rest.
LATEST_FIELDS: tuple[str, ...] = RING_METRICS + (
    "mem_util_pct",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "fan_pct",
    "energy_j",
    "slowdown_temp_c",
    "ecc_dbe",
    "xid",
    "n_procs",
)
# Computed on read from ring metrics.
DERIVED_METRICS: tuple[str, ...] = ("mem_pct",)

STATE_OK, STATE_SLEEPING, STATE_LOST, STATE_OFFLINE = 0, 1, 2, 3
STATE_NAMES: tuple[str, ...] = ("ok", "sleeping", "lost", "offline")
_STATE_CODE = {"ok": STATE_OK, "sleeping": STATE_SLEEPING, "lost": STATE_LOST}

_RING_INDEX = {m: i for i, m in enumerate(RING_METRICS)}
_LATEST_INDEX = {m: i for i, m in enumerate(LATEST_FIELDS)}
_NAN = np.float32(np.nan)
# Every latest field but the computed n_procs is a GpuSample attribute of the same name.
_VALUE_FIELDS = LATEST_FIELDS[:-1]
_GET_VALUES = attrgetter(*_VALUE_FIELDS)
_GET_INDEX = attrgetter("index")
_GET_NAME = attrgetter("name")
_GET_UUID = attrgetter("uuid")
_GET_THROTTLE = attrgetter("throttle")
_GET_STATE = attrgetter("state")
_GET_PROCESSES = attrgetter("processes")


@dataclass(frozen=True, slots=True)
class GpuRow:
    """A snapshot of one GPU for consumers that want objects (scheduler, dialogs), not arrays."""

    key: Key
    row: int
    uuid: str
    name: str
    state: str  # "ok" | "sleeping" | "lost" | "offline"
    throttle: tuple[str, ...]
    values: dict[str, float | None]


class FleetState:
    """Latest values, per-second ring history and host liveness for every GPU seen."""

    def __init__(
        self,
        history_s: int = 600,
        capacity: int = 64,
        max_gpus: int = 65536,
        offline_intervals: float = 3.0,
        rate_window_s: int = 5,
        skew_tolerance_s: float = 5.0,
    ) -> None:
        if history_s < 2:
            raise ValueError("history_s must be at least 2")
        self.history_s = int(history_s)
        self.max_gpus = int(max_gpus)
        self.skew_tolerance_s = float(skew_tolerance_s)
        self.version = 0

        cap = max(1, min(int(capacity), self.max_gpus))
        self._cap = cap
        self._n = 0
        self._index: dict[Key, int] = {}
        self._keys: list[Key] = []
        self._names: list[str] = []
        self._uuids: list[str] = []
        self._throttle: list[tuple[str, ...]] = []
        # Ring layout (metric, second, slot): the ingest writes one second for many
        # slots and the clock clears whole seconds, so both touch contiguous memory
        # (a strided per-second clear took 10-100 ms at 100,000 GPUs; this takes <1 ms).
        self._ring = np.full((len(RING_METRICS), self.history_s, cap), np.nan, dtype=np.float32)
        self._latest = np.full((cap, len(LATEST_FIELDS)), np.nan, dtype=np.float32)
        self._state = np.zeros(cap, dtype=np.int8)
        self._slot_ts = np.full(cap, -np.inf, dtype=np.float64)
        self._slot_host = np.zeros(cap, dtype=np.int32)
        self._head_sec = -1  # newest second held by the ring; -1 = empty

        self._host_table = HostTable(offline_intervals)
        self._rate = RateMeter(rate_window_s)

        self.messages_total = 0
        self.samples_total = 0
        self.dropped_gpus = 0  # samples of GPUs beyond max_gpus
        self.too_old = 0  # samples older than the ring window (kept out of history)
        self.rejected: dict[str, int] = {}

    @property
    def offline_intervals(self) -> float:
        return self._host_table.offline_intervals

    @offline_intervals.setter
    def offline_intervals(self, value: float) -> None:
        self._host_table.offline_intervals = float(value)

    @property
    def rate_window_s(self) -> int:
        return self._rate.window_s

    @rate_window_s.setter
    def rate_window_s(self, value: int) -> None:
        self._rate.window_s = value

    # ------------------------------------------------------------------ ingest

    def ingest(self, msg: Telemetry, received_at: float) -> None:
        """Take one host's telemetry message (same rules as ``ingest_many``)."""
        self.ingest_many((msg,), received_at)

    def ingest_many(self, msgs: Sequence[Telemetry], received_at: float) -> None:
        """Take a batch of telemetry messages in arrival order. Hot path.

        Per message only the host bookkeeping runs in Python; the GPU values of
        the whole batch are gathered with C-level iterators and each numpy array
        is written once, which is what makes ~100,000 GPU samples/s affordable.
        A batch is split where a host repeats, so within one write every slot
        appears once and "newest sample wins" can be decided with one mask.
        """
        i, n = 0, len(msgs)
        while i < n:
            i = self._ingest_run(msgs, i, received_at)
        if n:
            self.version += 1

    def _ingest_run(self, msgs: Sequence[Telemetry], start: int, received_at: float) -> int:
        """Ingest msgs[start:k] where k is the first repeat of a host; return k."""
        table = self._host_table
        hosts = table.by_name
        # A host whose clock runs far ahead must not push the shared ring forward
        # and wipe everyone's history; place its samples at arrival time instead.
        skew_limit = received_at + self.skew_tolerance_s
        seen: set[str] = set()
        gpus: list[GpuSample] = []
        rows: list[int] = []
        counts: list[int] = []
        tss: list[float] = []
        secs: list[int] = []
        i, n_msgs = start, len(msgs)
        while i < n_msgs:
            msg = msgs[i]
            host = msg.host
            if host in seen:
                break
            seen.add(host)
            i += 1
            info = hosts.get(host)
            if info is None:
                info = table.add(host)
            ts = msg.ts
            mg = msg.gpus
            layout = tuple(map(_GET_INDEX, mg))
            if layout and layout == info.layout:
                mrows: Sequence[int] = info.slot_rows
            else:
                mrows, mg = self._resolve_rows(info, mg, layout)
            # Names and throttle reasons come from the newest message only; a replay
            # from an agent's buffer must not bring back an old value.
            if ts >= info.last_ts and mrows:
                self._update_identity(info, mrows, mg)
            k = len(mrows)
            rows.extend(mrows)
            gpus.extend(mg)
            counts.append(k)
            tss.append(ts)
            secs.append(math.floor(ts if ts <= skew_limit else received_at))
            table.note_message(info, msg, ts, received_at, k)
        if rows:
            self._write(rows, gpus, counts, tss, secs)
        taken, n_samples = i - start, len(rows)
        self._rate.count(received_at, taken, n_samples)
        self.messages_total += taken
        self.samples_total += n_samples
        return i

    def _resolve_rows(
        self, info: HostInfo, mg: Sequence[GpuSample], layout: tuple[int, ...]
    ) -> tuple[list[int], list[GpuSample]]:
        """Slot rows of a message's GPUs (adding slots); GPUs beyond max_gpus are left out."""
        host = info.host
        index = self._index
        rows: list[int] = []
        kept: list[GpuSample] = []
        for g in mg:
            r = index.get((host, g.index))
            if r is None:
                r = self._add_slot((host, g.index), info.row)
                if r < 0:
                    continue
                self._names[r] = g.name
                self._uuids[r] = g.uuid
                self._throttle[r] = tuple(g.throttle) if g.throttle else ()
            rows.append(r)
            kept.append(g)
        # Cache only a complete layout: with dropped GPUs the slow path must keep counting them.
        if len(kept) == len(layout):
            info.layout, info.slot_rows = layout, tuple(rows)
        else:
            info.layout, info.slot_rows = (), ()
        info.identity = None
        return rows, kept

    def _update_identity(self, info: HostInfo, rows: Sequence[int], mg: Sequence[GpuSample]) -> None:
        # Comparing three C-built tuples is cheaper than three stores per GPU, and
        # names, UUIDs and throttle reasons rarely change between messages.
        ident = (tuple(map(_GET_NAME, mg)), tuple(map(_GET_UUID, mg)), tuple(map(_GET_THROTTLE, mg)))
        if ident == info.identity:
            return
        info.identity = ident
        names, uuids, throttle = self._names, self._uuids, self._throttle
        for r, name, uuid, thr in zip(rows, *ident, strict=True):
            names[r] = name
            uuids[r] = uuid
            throttle[r] = tuple(thr) if thr else ()

    def _write(self, rows: list[int], gpus: list[GpuSample], counts: list[int], tss: list[float],
               secs: list[int]) -> None:
        """One numpy write per array for a run in which every slot appears once."""
        n = len(rows)
        nv = len(_VALUE_FIELDS)
        arr = np.empty((n, len(LATEST_FIELDS)), dtype=np.float32)
        # Through an object array: the cast turns None into NaN, and is several
        # times faster than np.array() on a list of tuples.
        flat = np.fromiter(chain.from_iterable(map(_GET_VALUES, gpus)), dtype=object, count=n * nv)
        arr[:, :nv] = flat.reshape(n, nv)
        procs = list(map(_GET_PROCESSES, gpus))
        if procs.count(None) == n:
            arr[:, nv] = np.nan
        else:
            arr[:, nv] = [np.nan if p is None else len(p) for p in procs]
        states = np.fromiter(map(_STATE_CODE.__getitem__, map(_GET_STATE, gpus)), dtype=np.int8, count=n)
        ridx = np.array(rows, dtype=np.intp)
        r0 = rows[0]
        # A batch of hosts is usually a run of adjacent rows (added together):
        # slices are several times cheaper than fancy indexing on this hot path.
        sel: slice | np.ndarray
        sel = slice(r0, r0 + n) if rows[-1] - r0 == n - 1 and (n == 1 or bool((np.diff(ridx) == 1).all())) else ridx
        ts_g = np.repeat(np.array(tss, dtype=np.float64), counts) if len(tss) > 1 else tss[0]
        nr = len(RING_METRICS)

        smin, smax = min(secs), max(secs)
        self._advance_ring(smax)
        h = self.history_s
        oldest = self._head_sec - h  # this second and older are outside the ring
        if smin == smax and smin > oldest:
            self._ring[:, smax % h, sel] = arr[:, :nr].T
        else:
            sec_g = np.repeat(np.array(secs, dtype=np.int64), counts)
            ok = sec_g > oldest
            self.too_old += n - int(np.count_nonzero(ok))
            self._ring[:, sec_g[ok] % h, ridx[ok]] = arr[ok, :nr].T

        # Replayed samples fill the ring at their own time but never replace a
        # newer "latest" value.
        newer = self._slot_ts[sel] <= ts_g
        if newer.all():
            self._latest[sel] = arr
            self._state[sel] = states
            self._slot_ts[sel] = ts_g
        elif newer.any():
            upd = ridx[newer]
            self._latest[upd] = arr[newer]
            self._state[upd] = states[newer]
            self._slot_ts[upd] = ts_g[newer] if isinstance(ts_g, np.ndarray) else ts_g

    def backfill(
        self,
        identities: Sequence[tuple[str, int, str, str]],
        keys: Sequence[Key],
        ts: np.ndarray,
        values: np.ndarray,
        now: float,
    ) -> int:
        """Refill the ring from stored samples (after a restart); returns the samples placed.

        ``identities`` are (host, index, uuid, name) of GPUs that reported
        recently: one not yet heard from live gets its slot now, shown offline
        (its host has not reported) until it does. ``values`` has one column
        per RING_METRICS entry. A GPU without live data yet also gets its
        newest stored values as its latest ones (the table shows what it last
        reported, marked offline). Liveness, counters and rates stay what live
        telemetry made them, and live samples are never overwritten. Samples
        outside the ring window, newer than ``now`` (a skewed clock) or of
        unknown GPUs are skipped.
        """
        table = self._host_table
        for host, index, uuid, name in identities:
            if (host, index) in self._index:
                continue
            info = table.by_name.get(host) or table.add(host)
            r = self._add_slot((host, index), info.row)
            if r >= 0:
                self._names[r], self._uuids[r] = name, uuid
                info.layout, info.slot_rows = (), ()  # the next live message maps its GPUs afresh
        n = len(keys)
        if n == 0:
            return 0
        slot_of = self._index
        rows = np.fromiter((slot_of.get(k, -1) for k in keys), dtype=np.intp, count=n)
        secs = np.floor(np.asarray(ts, dtype=np.float64)).astype(np.int64)
        ok = (rows >= 0) & (secs <= math.floor(now))
        if not ok.any():
            return 0
        self._advance_ring(int(secs[ok].max()))  # an empty ring starts at the newest stored second
        h = self.history_s
        ok &= secs > self._head_sec - h
        rows, cols, vals = rows[ok], secs[ok] % h, np.asarray(values, dtype=np.float32)[ok]
        times = np.asarray(ts, dtype=np.float64)[ok]
        # Live samples win: only cells the live feed left empty are filled.
        empty = np.isnan(self._ring[:, cols, rows]).all(axis=0)
        rows, cols, vals, times = rows[empty], cols[empty], vals[empty], times[empty]
        self._ring[:, cols, rows] = vals.T
        if len(rows):
            # Newest stored sample per row, for rows that have no live value at all.
            order = np.lexsort((times, rows))  # by row, then time
            last = order[np.r_[rows[order][1:] != rows[order][:-1], True]]
            fresh = last[np.isneginf(self._slot_ts[rows[last]])]
            fresh_rows = rows[fresh]
            self._latest[fresh_rows, : len(RING_METRICS)] = vals[fresh]
            self._slot_ts[fresh_rows] = times[fresh]
        self.version += 1
        return len(rows)

    def note_rejected(self, reason: str, count: int = 1) -> None:
        """Count a message the bus could not decode (shown in the status bar)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + count
        self.version += 1

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def _advance_ring(self, sec: int) -> None:
        """Make ``sec`` the ring's newest second if it is newer, clearing the columns it skips."""
        h = self.history_s
        head = self._head_sec
        if sec > head:
            # Before the first write (head < 0) the ring is still all NaN: filling it
            # again would stall the loop for a third of a second at 100,000 GPUs.
            if head >= 0 and sec - head >= h:
                self._ring.fill(np.nan)
            elif head >= 0:
                cols = np.arange(head + 1, sec + 1) % h
                self._ring[:, cols, :] = _NAN
            self._head_sec = sec

    def _add_slot(self, key: Key, host_row: int) -> int:
        if self._n >= self.max_gpus:
            self.dropped_gpus += 1
            return -1
        if self._n >= self._cap:
            self._grow_slots(min(self._cap * 2, self.max_gpus))
        r = self._n
        self._n += 1
        self._index[key] = r
        self._keys.append(key)
        self._names.append("")
        self._uuids.append("")
        self._throttle.append(())
        self._slot_host[r] = host_row
        return r

    def _grow_slots(self, cap: int) -> None:
        ring = np.full((len(RING_METRICS), self.history_s, cap), np.nan, dtype=np.float32)
        ring[:, :, : self._cap] = self._ring
        self._ring = ring
        self._latest = grow(self._latest, cap, np.nan)
        self._state = grow(self._state, cap, 0)
        self._slot_ts = grow(self._slot_ts, cap, -np.inf)
        self._slot_host = grow(self._slot_host, cap, 0)
        self._cap = cap

    # ------------------------------------------------------------------ slots

    @property
    def n_slots(self) -> int:
        return self._n

    def keys(self) -> list[Key]:
        """All GPU keys in row order (a copy)."""
        return list(self._keys)

    def row_of(self, key: Key) -> int | None:
        return self._index.get(key)

    def names(self) -> list[str]:
        """Model name per row (a copy)."""
        return list(self._names)

    def uuid(self, row: int) -> str:
        return self._uuids[row]

    def throttle(self, row: int) -> tuple[str, ...]:
        return self._throttle[row]

    def latest(self, field: str) -> np.ndarray:
        """Latest value of ``field`` per row (read-only view, NaN = not reported)."""
        view = self._latest[: self._n, _LATEST_INDEX[field]]
        view.flags.writeable = False
        return view

    def gpu_states(self) -> np.ndarray:
        """Reported state code per row (STATE_OK / STATE_SLEEPING / STATE_LOST), a copy."""
        return self._state[: self._n].copy()

    def display_states(self, now: float) -> np.ndarray:
        """State code per row with STATE_OFFLINE where the host stopped reporting."""
        states = self._state[: self._n].copy()
        states[~self.online_mask(now)] = STATE_OFFLINE
        return states

    def rows(self, now: float) -> list[GpuRow]:
        """One snapshot object per GPU; for callers that are not on a per-frame path."""
        states = self.display_states(now)
        latest = self._latest[: self._n]
        out = []
        for r, key in enumerate(self._keys):
            vals = {f: (None if math.isnan(v) else float(v)) for f, v in zip(LATEST_FIELDS, latest[r].tolist(), strict=True)}
            out.append(
                GpuRow(
                    key=key,
                    row=r,
                    uuid=self._uuids[r],
                    name=self._names[r],
                    state=STATE_NAMES[states[r]],
                    throttle=self._throttle[r],
                    values=vals,
                )
            )
        return out

    # ------------------------------------------------------------------ hosts

    def host(self, host: str) -> HostInfo | None:
        return self._host_table.by_name.get(host)

    def hosts(self) -> list[HostInfo]:
        return list(self._host_table.infos)

    @property
    def n_hosts(self) -> int:
        return len(self._host_table.infos)

    def host_online(self, host: str, now: float) -> bool:
        """False once the host sent nothing for ``offline_intervals`` × its interval."""
        return self._host_table.online(host, now)

    def hosts_online(self, now: float) -> int:
        return int(np.count_nonzero(self._host_table.online_mask(now)))

    def online_mask(self, now: float) -> np.ndarray:
        """Per row: is the GPU's host still reporting?"""
        return self._host_table.online_mask(now)[self._slot_host[: self._n]]

    def poll(self, now: float) -> bool:
        """Bump ``version`` when a host went offline or came back; liveness is time-driven."""
        if not self._host_table.changed(now):
            return False
        self.version += 1
        return True

    # ------------------------------------------------------------------ history

    def time_axis(self, now: float) -> np.ndarray:
        """Epoch second of each column of ``matrix(..., now)``."""
        end = math.floor(now)
        return np.arange(end - self.history_s + 1, end + 1, dtype=np.float64)

    def matrix(self, metric: str, now: float, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """History of ``metric``, shape (rows, history_s), last column = second of ``now``; NaN = no data."""
        if metric in DERIVED_METRICS:
            used = self.matrix("mem_used_mib", now, rows)
            total = self.matrix("mem_total_mib", now, rows)
            with np.errstate(invalid="ignore", divide="ignore"):
                pct: np.ndarray = 100.0 * used / total
            pct[~np.isfinite(pct)] = np.nan
            return pct
        m = _RING_INDEX[metric]
        h = self.history_s
        end = math.floor(now)
        start = end - h + 1
        order = np.arange(start, end + 1) % h  # ring column of each output second
        ring = self._ring[m]
        src = ring[:, : self._n] if rows is None else ring[:, np.asarray(rows, dtype=np.intp)]
        out = np.ascontiguousarray(src[order].T)
        head = self._head_sec
        lo = max(start, head - h + 1)
        hi = min(end, head)
        if head < 0 or hi < lo:
            out[:] = np.nan
        else:
            out[:, : lo - start] = np.nan
            out[:, hi - start + 1 :] = np.nan
        return out

    def series(self, key: Key, metric: str, now: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(epoch seconds, values) of one GPU over the ring window ending at ``now`` (default: newest data)."""
        r = self._index.get(key)
        t_end = float(self._head_sec) if now is None else now
        ts = self.time_axis(t_end)
        if r is None:
            return ts, np.full(self.history_s, np.nan, dtype=np.float32)
        return ts, self.matrix(metric, t_end, [r])[0]

    # ------------------------------------------------------------------ rates

    def rates(self, now: float) -> tuple[float, float]:
        """(messages/s, GPU samples/s) over the last ``rate_window_s`` whole seconds before ``now``."""
        return self._rate.rates(now)
