"""Arrival bookkeeping behind ``FleetState``: per-host sequence tracking, liveness and the rate meter.

numpy only, no Qt. Clock: ``received_at`` and every ``now`` argument are
wall-clock epoch seconds (``time.time()``), as in :mod:`aether_desktop.services.fleet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from aether_protocol.messages import Telemetry


@dataclass(slots=True)
class HostInfo:
    """What the station knows about one agent (mutable; owned by FleetState)."""

    host: str
    row: int  # index into the per-host arrays
    boot: str = ""
    last_seq: int = -1
    last_ts: float = -math.inf  # newest sample time seen (sender's clock)
    last_seen: float = -math.inf  # newest arrival (station's clock)
    interval_s: float = 1.0
    state: str = "active"
    gpu_count: int = 0
    messages: int = 0
    samples: int = 0
    seq_gaps: int = 0  # sequence numbers skipped and not (yet) filled by a replay
    replayed: int = 0  # messages older than the newest one seen (agent buffer replays)
    restarts: int = 0  # boot id changes
    # Ingest caches: the GPU indices of the last message and their slot rows, and
    # the (names, uuids, throttle) last written, so steady traffic skips per-GPU work.
    layout: tuple[int, ...] = field(default=(), repr=False)
    slot_rows: tuple[int, ...] = field(default=(), repr=False)
    identity: object = field(default=None, repr=False)


class HostTable:
    """Every host seen, in arrival order, plus the per-host arrays that make liveness one numpy expression."""

    def __init__(self, offline_intervals: float) -> None:
        self.offline_intervals = float(offline_intervals)
        self.by_name: dict[str, HostInfo] = {}
        self.infos: list[HostInfo] = []
        self._seen = np.full(8, -np.inf, dtype=np.float64)
        self._interval = np.ones(8, dtype=np.float64)
        self._online_snapshot = np.zeros(0, dtype=bool)

    def add(self, host: str) -> HostInfo:
        row = len(self.infos)
        if row >= len(self._seen):
            self._seen = grow(self._seen, 2 * row, -np.inf)
            self._interval = grow(self._interval, 2 * row, 1.0)
        info = HostInfo(host=host, row=row)
        self.by_name[host] = info
        self.infos.append(info)
        return info

    def note_message(self, info: HostInfo, msg: Telemetry, ts: float, received_at: float, n: int) -> None:
        """Counters, boot/sequence bookkeeping and liveness for one message carrying ``n`` samples."""
        info.messages += 1
        info.samples += n
        if received_at > info.last_seen:
            info.last_seen = received_at
            self._seen[info.row] = received_at
        if msg.boot != info.boot:
            if ts >= info.last_ts:
                # A new boot restarts the sequence; the old boot's gaps are history.
                if info.boot:
                    info.restarts += 1
                info.boot = msg.boot
                info.last_seq = msg.seq
            else:
                info.replayed += 1
        elif msg.seq > info.last_seq:
            info.seq_gaps += msg.seq - info.last_seq - 1
            info.last_seq = msg.seq
        else:
            # An older seq from this boot: a replay that fills one earlier gap.
            info.replayed += 1
            if info.seq_gaps > 0:
                info.seq_gaps -= 1
        if ts >= info.last_ts:
            info.last_ts = ts
            info.state = msg.state
            info.gpu_count = len(msg.gpus)
            if msg.interval_s:
                info.interval_s = float(msg.interval_s)
                self._interval[info.row] = info.interval_s

    def online(self, host: str, now: float) -> bool:
        """False once the host sent nothing for ``offline_intervals`` × its interval."""
        info = self.by_name.get(host)
        if info is None:
            return False
        return now - info.last_seen <= self.offline_intervals * info.interval_s

    def online_mask(self, now: float) -> np.ndarray:
        """Per host row: is the host still reporting?"""
        nh = len(self.infos)
        return (now - self._seen[:nh]) <= self.offline_intervals * self._interval[:nh]

    def changed(self, now: float) -> bool:
        """True when the set of online hosts differs from the one seen by the previous call."""
        mask = self.online_mask(now)
        if mask.shape == self._online_snapshot.shape and np.array_equal(mask, self._online_snapshot):
            return False
        self._online_snapshot = mask
        return True


class RateMeter:
    """Messages and GPU samples per arrival second, one bucket per second, a few more than the window."""

    def __init__(self, window_s: int) -> None:
        self.window_s = max(1, int(window_s))
        nb = self.window_s + 2
        self._sec = [-1] * nb
        self._msgs = [0] * nb
        self._samples = [0] * nb

    def count(self, received_at: float, msgs: int, samples: int) -> None:
        sec = int(received_at)
        i = sec % len(self._sec)
        if self._sec[i] != sec:
            self._sec[i] = sec
            self._msgs[i] = 0
            self._samples[i] = 0
        self._msgs[i] += msgs
        self._samples[i] += samples

    def rates(self, now: float) -> tuple[float, float]:
        """(messages/s, GPU samples/s) over the last ``window_s`` whole seconds before ``now``."""
        cur = int(now)
        lo = cur - self.window_s
        msgs = samples = 0
        for sec, m, s in zip(self._sec, self._msgs, self._samples, strict=True):
            if lo <= sec < cur:
                msgs += m
                samples += s
        return msgs / self.window_s, samples / self.window_s


def grow(arr: np.ndarray, n: int, fill: float) -> np.ndarray:
    """A copy of ``arr`` with ``n`` rows, the new ones set to ``fill``."""
    out = np.full((n, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out
