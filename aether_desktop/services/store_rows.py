"""Rows for binary COPY: decoding wire messages straight into table rows, once per batch.

Telemetry rows are COPYed straight into ``telemetry`` in the table's own types
(:mod:`store_sql` has the column layouts). Values psycopg's C dumpers handle
fast (text, ints, floats) go as Python objects; the rest (timestamps, arrays)
are pre-encoded here into PostgreSQL's binary wire format, once per message or
once per distinct value in a batch (:class:`Encoded`), and copied verbatim by
psycopg's bytes dumper: binary COPY carries no type oids, the server reads each
field as the target column's type. Pure: no I/O, unit-tested without a database.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from aether_protocol.messages import (
    Event,
    Process,
    ProtocolError,
    Telemetry,
    decode_event,
    decode_telemetry,
)

# --------------------------------------------------------------------------- binary encoding

# Element type oids written into binary arrays (pg_type; fixed since PostgreSQL 8).
_OID_TEXT, _OID_INT8, _OID_FLOAT4 = 25, 20, 700


class Encoded(bytes):
    """A value already in PostgreSQL's binary format for its column."""

    __slots__ = ()


_PG_EPOCH_S = 946_684_800.0  # 2000-01-01 UTC, PostgreSQL's timestamp origin
_i64 = struct.Struct(">q").pack
_hdr = struct.Struct(">iiiii").pack  # ndim, has_null, element oid, length, lower bound
_NULL = b"\xff\xff\xff\xff"


def encode_ts(epoch_s: float) -> Encoded:
    """timestamptz as microseconds since 2000, rounded exactly as ``to_timestamp(float8)``
    does (``rint``; Python's ``round`` is also half-to-even), so a sample stored
    by either path gets the same ts and therefore the same unique key."""
    return Encoded(_i64(round((epoch_s - _PG_EPOCH_S) * 1e6)))


def _array(oid: int, items: Sequence[bytes | None]) -> Encoded:
    """A one-dimensional array from already-encoded elements (None: NULL element)."""
    if not items:
        return Encoded(struct.pack(">iii", 0, 0, oid))
    has_null = any(x is None for x in items)
    parts = [_hdr(1, int(has_null), oid, len(items), 1)]
    for x in items:
        parts.append(_NULL if x is None else struct.pack(">i", len(x)) + x)
    return Encoded(b"".join(parts))


def encode_text_array(values: Sequence[str | None]) -> Encoded:
    return _array(_OID_TEXT, [None if v is None else v.encode() for v in values])


def encode_processes(procs: Sequence[Process]) -> tuple[Encoded, Encoded, Encoded]:
    """(pid int8[], name text[], mem float4[]) ordered by pid."""
    ps = sorted(procs, key=lambda p: p.pid)
    pids = _array(_OID_INT8, [_i64(p.pid) for p in ps])
    names = encode_text_array([p.name for p in ps])
    mems = _array(
        _OID_FLOAT4, [None if p.mem_used_mib is None else struct.pack(">f", p.mem_used_mib) for p in ps]
    )
    return pids, names, mems


# --------------------------------------------------------------------------- row building

ROLLUP_BUCKET_S = 60


@dataclass
class TelemetryBatch:
    """Rows for COPY plus the per-batch inventory and rollup bookkeeping."""

    rows: list[tuple[object, ...]] = field(default_factory=list)
    # host -> [first_ts, last_ts, boot at last_ts]
    hosts: dict[str, list[Any]] = field(default_factory=dict)
    # host -> index -> [uuid, name, mem_total_mib, first_ts, last_ts]; by host
    # first, so the hot loop looks a GPU up by its int index, no key tuple.
    host_gpus: dict[str, dict[int, list[Any]]] = field(default_factory=dict)
    # (host, bucket start s) touched: one set add per message
    dirty_buckets: set[tuple[str, int]] = field(default_factory=set)
    processes: int = 0  # process entries in the rows' arrays

    @property
    def gpus(self) -> dict[tuple[str, int], list[object]]:
        """(host, index) -> [uuid, name, mem_total_mib, first_ts, last_ts]"""
        return {(h, i): inv for h, by_index in self.host_gpus.items() for i, inv in by_index.items()}

    @property
    def dirty(self) -> set[tuple[str, int]]:
        """(host, bucket start s) touched by the batch."""
        return set(self.dirty_buckets)

    def host_params(self, keys: Sequence[str] | None = None) -> tuple[list[object], ...]:
        """UNNEST parameters for UPSERT_HOSTS_SQL: every host of the batch, or ``keys``."""
        keys = sorted(self.hosts if keys is None else keys)  # fixed order: no deadlock between writers
        v = [self.hosts[k] for k in keys]
        return (list(keys), [x[0] for x in v], [x[1] for x in v], [x[2] for x in v])

    def gpu_params(self, keys: Sequence[tuple[str, int]] | None = None) -> tuple[list[object], ...]:
        """UNNEST parameters for UPSERT_GPUS_SQL: every GPU of the batch, or ``keys``."""
        keys = sorted(self.gpus if keys is None else keys)
        by_host = self.host_gpus  # no (host, index) dict built for the few rows that usually go
        v = [by_host[h][i] for h, i in keys]
        return (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [x[0] for x in v],
            [x[1] for x in v],
            [x[2] for x in v],
            [x[3] for x in v],
            [x[4] for x in v],
        )

    def dirty_params(self) -> tuple[list[object], ...]:
        keys = sorted(self.dirty_buckets)
        return ([k[0] for k in keys], [float(k[1]) for k in keys])


# An inventory row whose identity did not change is upserted again only when its
# last_seen would move by more than this (so hosts.last_seen / gpus.last_seen are
# exact to this many seconds).
INVENTORY_REFRESH_S = 60.0


class InventoryCache:
    """What the inventory tables are known to hold, so a batch upserts only what changes.

    Without it every batch upserted one ``gpus`` row per GPU it carried: for a
    fleet of thousands of hosts sending one message a second, as many row
    updates as telemetry rows, and most of the ingest's cost. A row is sent
    when it is new, its identity (boot; uuid, name, memory) changed, the batch
    reaches further back than first_seen, or last_seen would move by more
    than ``refresh_s``. :meth:`committed` records what a committed batch sent;
    a rolled-back one changes nothing, and every upsert stays idempotent, so
    concurrent writers (or stations) may still send the same row twice.
    """

    def __init__(self, refresh_s: float = INVENTORY_REFRESH_S) -> None:
        self.refresh_s = refresh_s
        self._hosts: dict[str, tuple[float, float, str]] = {}  # first, last, boot
        # (first, last, uuid, name, mem_total_mib)
        self._gpus: dict[tuple[str, int], tuple[float, float, Any, Any, Any]] = {}

    def hosts_to_send(self, b: TelemetryBatch) -> list[str]:
        out = []
        for host, (first, last, boot) in b.hosts.items():
            known = self._hosts.get(host)
            if (
                known is None
                or first < known[0]
                or last > known[1] + self.refresh_s
                or (boot != known[2] and last >= known[1])
            ):
                out.append(host)
        return out

    def gpus_to_send(self, b: TelemetryBatch) -> list[tuple[str, int]]:
        out = []
        gpus = self._gpus
        refresh = self.refresh_s
        for host, by_index in b.host_gpus.items():
            for index, (uuid, name, mem, first, last) in by_index.items():
                known = gpus.get((host, index))
                if (
                    known is None
                    or first < known[0]
                    or last > known[1] + refresh
                    or (last >= known[1] and (uuid != known[2] or name != known[3]
                                              or (mem is not None and mem != known[4])))
                ):
                    out.append((host, index))
        return out

    def committed(self, b: TelemetryBatch, hosts: Sequence[str], gpus: Sequence[tuple[str, int]]) -> None:
        """Record what a committed batch upserted (merged as the upsert SQL merges it)."""
        for host in hosts:
            first, last, boot = b.hosts[host]
            known = self._hosts.get(host)
            if known is None:
                self._hosts[host] = (first, last, boot)
            else:
                newer = last >= known[1]
                self._hosts[host] = (
                    min(known[0], first),
                    max(known[1], last),
                    boot if newer else known[2],
                )
        for key in gpus:
            uuid, name, mem, first, last = b.host_gpus[key[0]][key[1]]
            g = self._gpus.get(key)
            if g is None:
                self._gpus[key] = (first, last, uuid, name, mem)
            elif last >= g[1]:
                self._gpus[key] = (min(g[0], first), last, uuid, name, mem if mem is not None else g[4])
            else:
                self._gpus[key] = (min(g[0], first), g[1], g[2], g[3], g[4])

    def clear(self) -> None:
        """Forget everything (e.g. after the database may have been replaced)."""
        self._hosts.clear()
        self._gpus.clear()


def build_telemetry_batch(
    messages: Sequence[Telemetry],
    into: TelemetryBatch | None = None,
    *,
    failed: list[tuple[int, Exception]] | None = None,
) -> TelemetryBatch:
    """Flatten host messages into one row per GPU sample (pure; order of TELEMETRY_COLUMNS).

    With ``into``, the rows and bookkeeping are added to that batch (the
    ingest builds a batch in slices, yielding to its event loop in between).

    With ``failed``, a message whose rows cannot be built (a value its column
    cannot hold that got past validation, or a bug) leaves no trace in the
    batch and is reported there as (position, exception); without it the
    exception propagates.

    The hot loop of ingest (under a microsecond per GPU sample): per-message
    work is hoisted out of the GPU loop, and arrays are encoded once per
    distinct value in the batch (throttle reasons and process lists repeat
    from one second to the next).
    """
    b = TelemetryBatch() if into is None else into
    rows = b.rows
    rows_append = rows.append
    throttles: dict[tuple[str, ...], Encoded] = {}
    procs_cache: dict[tuple[Process, ...], tuple[Encoded, Encoded, Encoded]] = {}
    hosts, host_gpus, dirty_buckets = b.hosts, b.host_gpus, b.dirty_buckets
    n_procs = 0
    for k, t in enumerate(messages):
        host, boot, seq, ts, hstate = t.host, t.boot, t.seq, t.ts, t.state
        first_row, procs_before = len(rows), n_procs
        # Rows first, the bookkeeping only once they all built, so a failing
        # message is undone by truncating the rows (try costs nothing unless it raises).
        try:
            ts_enc = encode_ts(ts)
            for g in t.gpus:
                th = g.throttle
                if th is not None:
                    key = tuple(th)
                    th_enc = throttles.get(key)
                    if th_enc is None:
                        th_enc = throttles[key] = encode_text_array(key)
                else:
                    th_enc = None
                ps = g.processes
                if ps is None:
                    p_pid = p_name = p_mem = None
                else:
                    pkey = tuple(ps)
                    pe = procs_cache.get(pkey)
                    if pe is None:
                        pe = procs_cache[pkey] = encode_processes(pkey)
                    p_pid, p_name, p_mem = pe
                    n_procs += len(ps)
                rows_append(
                    (
                        host, g.index, g.uuid, ts_enc, boot, seq, hstate, g.state,
                        g.temp_c, g.mem_used_mib, g.mem_total_mib, g.util_pct, g.mem_util_pct,
                        g.power_w, g.power_limit_w, g.sm_clock_mhz, g.mem_clock_mhz, g.fan_pct,
                        g.energy_j, th_enc, g.ecc_dbe, g.xid, g.slowdown_temp_c, p_pid, p_name, p_mem,
                    )
                )  # fmt: skip
        except Exception as exc:
            if failed is None:
                raise
            del rows[first_row:]
            n_procs = procs_before
            failed.append((k, exc))
            continue
        h = hosts.get(host)
        if h is None:
            hosts[host] = [ts, ts, boot]
            gpus = host_gpus[host] = {}
        else:
            gpus = host_gpus[host]
            if ts < h[0]:
                h[0] = ts
            if ts >= h[1]:
                h[1] = ts
                h[2] = boot
        dirty_buckets.add((host, int(ts // ROLLUP_BUCKET_S) * ROLLUP_BUCKET_S))
        for g in t.gpus:
            idx = g.index
            inv = gpus.get(idx)
            if inv is None:
                gpus[idx] = [g.uuid, g.name, g.mem_total_mib, ts, ts]
            else:
                if ts < inv[3]:
                    inv[3] = ts
                if ts >= inv[4]:
                    inv[0], inv[1], inv[4] = g.uuid, g.name, ts
                    if g.mem_total_mib is not None:
                        inv[2] = g.mem_total_mib
    b.processes += n_procs
    return b


def unstorable(exc: Exception) -> ProtocolError:
    """The rejection of a message whose rows could not be built; ``exc`` is its
    cause, so its traceback is logged with the rejection."""
    err = ProtocolError("unstorable", f"{exc!r}")
    err.__cause__ = exc
    return err


def decode_into(
    payloads: Sequence[bytes], out: TelemetryBatch | list[Event]
) -> list[tuple[int, ProtocolError]]:
    """Decode wire messages: telemetry straight into rows (``out`` a TelemetryBatch),
    events into the list; returns the rejected ones as (position, reason).

    A telemetry message that decodes but whose rows cannot be built is
    rejected too, as ``unstorable`` (the exception is the error's cause), and
    leaves nothing in ``out``: one such message must not hold up the others.

    Telemetry structs die here, only rows live on: kept until written, tens of
    thousands of structs per batch made every full GC pass of the ingest walk
    them (a quarter of its CPU).
    """
    bad: list[tuple[int, ProtocolError]] = []
    if isinstance(out, TelemetryBatch):
        decoded: list[Telemetry] = []
        for i, data in enumerate(payloads):
            try:
                decoded.append(decode_telemetry(data))
            except ProtocolError as exc:
                bad.append((i, exc))
        failed: list[tuple[int, Exception]] = []
        build_telemetry_batch(decoded, out, failed=failed)
        if failed:
            skipped = {i for i, _ in bad}
            positions = [i for i in range(len(payloads)) if i not in skipped]  # decoded[k] came from here
            bad += [(positions[k], unstorable(exc)) for k, exc in failed]
            bad.sort(key=lambda x: x[0])
        return bad
    for i, data in enumerate(payloads):
        try:
            out.append(decode_event(data))
        except ProtocolError as exc:
            bad.append((i, exc))
    return bad


def dedupe_events(events: Sequence[Event]) -> list[Event]:
    """First occurrence of each event id (a batch can hold a redelivered copy)."""
    seen: set[str] = set()
    out: list[Event] = []
    for e in events:
        if e.id not in seen:
            seen.add(e.id)
            out.append(e)
    return out


_json = msgspec.json.Encoder()


def build_event_rows(events: Sequence[Event]) -> list[tuple[object, ...]]:
    return [
        (e.id, e.host, e.ts, e.kind, e.job_id, e.gpus, e.exit_code, e.detail, _json.encode(e).decode())
        for e in events
    ]


@dataclass
class PreparedBatch:
    """Everything one write transaction needs, built before it starts.

    Building is pure CPU work; the ingest does it in its fetch stage, so the
    writer (which waits on PostgreSQL) only streams rows and runs statements.
    """

    telemetry: TelemetryBatch
    events: list[Event]  # deduplicated
    event_rows: list[tuple[object, ...]]


def prepare_batch(telemetry: Sequence[Telemetry], events: Sequence[Event]) -> PreparedBatch:
    evs = dedupe_events(events)
    return PreparedBatch(build_telemetry_batch(telemetry), evs, build_event_rows(evs))


def prepare_events(events: Sequence[Event], failed: list[tuple[int, Exception]]) -> PreparedBatch:
    """:func:`prepare_batch` of events alone; an event whose row cannot be built
    is left out and reported in ``failed`` as (position, exception)."""
    try:
        return prepare_batch((), events)
    except Exception:  # noqa: BLE001 - rare: find the events at fault one by one
        keep: list[Event] = []
        for k, e in enumerate(events):
            try:
                build_event_rows([e])
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                failed.append((k, exc))
            else:
                keep.append(e)
        return prepare_batch((), keep)
