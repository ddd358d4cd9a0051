"""The station's NATS client: live telemetry and events, and commands to agents.

Live telemetry is batched: the subscription callback only queues the raw
message (a bounded deque; when it is full the oldest message is dropped and
counted), and one drain task decodes a chunk of a few milliseconds' worth
(msgspec), hands the decoded structs to plain callbacks that must not block,
then yields to the loop. At ~12,500 messages/s this keeps the UI responsive and
lets the fleet model write each numpy array once per chunk instead of once per
message. Nothing here awaits the database. Rejected messages are counted and
dropped. Events are rare and are still decoded one by one in their callback.
Commands are request-reply with a timeout; "no responders" and a timeout
both mean the host is offline, and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from aether_protocol import (
    PROTOCOL_VERSION,
    CancelJobCmd,
    Command,
    Event,
    InjectFaultCmd,
    JobLogCmd,
    PingCmd,
    ProtocolError,
    RejectCounter,
    Reply,
    SetPowerLimitCmd,
    SleepCmd,
    Telemetry,
    WakeCmd,
    decode_event,
    decode_reply,
    decode_telemetry,
    encode,
)
from aether_protocol import subjects as subj
from aether_protocol.connection import NatsSettings, connect_kwargs

log = logging.getLogger("aether.bus")


class ConnState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class HostOffline(Exception):
    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"host {host} is offline ({reason})")
        self.host = host
        self.reason = reason


TelemetryFn = Callable[[Telemetry, float], None]
TelemetryBatchFn = Callable[[Sequence[Telemetry], float], None]
EventFn = Callable[[Event], None]
StateFn = Callable[[ConnState, str], None]


def build_command(op: str, cmd_id: str, gpus: list[int] | None = None, **fields: object) -> Command:
    """Pure: a protocol command struct from UI-level arguments (raises ValueError if incomplete)."""
    base = {"v": PROTOCOL_VERSION, "id": cmd_id}
    if op == "ping":
        return PingCmd(**base)  # type: ignore[arg-type]
    if op == "sleep":
        return SleepCmd(**base, gpus=gpus)  # type: ignore[arg-type]
    if op == "wake":
        return WakeCmd(**base, gpus=gpus)  # type: ignore[arg-type]
    if op == "set_power_limit":
        return SetPowerLimitCmd(**base, gpus=gpus, watts=float(fields["watts"]))  # type: ignore[arg-type]
    if op == "cancel_job":
        return CancelJobCmd(**base, job_id=str(fields["job_id"]))  # type: ignore[arg-type]
    if op == "job_log":
        return JobLogCmd(**base, job_id=str(fields["job_id"]))  # type: ignore[arg-type]
    if op == "inject_fault":
        return InjectFaultCmd(**base, spec=str(fields["spec"]))  # type: ignore[arg-type]
    raise ValueError(f"unknown command op {op!r}")


class Bus:
    def __init__(
        self,
        settings: NatsSettings,
        prefix: str = subj.DEFAULT_PREFIX,
        on_telemetry: TelemetryFn | None = None,
        on_event: EventFn | None = None,
        on_state: StateFn | None = None,
        *,
        on_telemetry_batch: TelemetryBatchFn | None = None,
        queue_limit: int = 100_000,
        decode_budget_s: float = 0.003,
    ) -> None:
        """``on_telemetry`` gets each decoded message, ``on_telemetry_batch`` each decoded chunk
        (arrival order, one ``received_at``); either, both or neither may be given.

        ``queue_limit`` bounds the raw backlog (100,000 is 8 s of a 12,500-host fleet);
        ``decode_budget_s`` is how long one chunk decodes before it is delivered and the
        loop gets a turn (delivery, e.g. ``FleetState.ingest_many``, adds about half again).
        """
        self.settings = settings
        self.prefix = prefix
        self.on_telemetry = on_telemetry
        self.on_telemetry_batch = on_telemetry_batch
        self.decode_budget_s = decode_budget_s
        self.on_event = on_event
        self.on_state = on_state
        self.nc: Client | None = None
        self.state = ConnState.CONNECTING
        self.telemetry_rejects = RejectCounter("telemetry")
        self.event_rejects = RejectCounter("event")
        self.slow_consumer_drops = 0
        self.overflow_drops = 0  # live messages dropped because the station fell queue_limit behind
        self.messages = 0
        self._tel_queue: deque[Msg] = deque(maxlen=max(1, queue_limit))
        self._tel_ready = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._session = secrets.token_hex(3)
        self._stopping = False
        self._connected = asyncio.Event()
        self._connect_task: asyncio.Task[None] | None = None
        self._connect_listeners: list[Callable[[Client], None]] = []
        # Bumped when the client is replaced (set_servers): callbacks of an older client are ignored.
        self._generation = 0
        self._last_error: tuple[str, float] | None = None

    # ------------------------------------------------------------------ lifecycle

    def add_connect_listener(self, fn: Callable[[Client], None]) -> None:
        """Called with the client on the first connect (and after a from-scratch reconnect)."""
        self._connect_listeners.append(fn)
        if self.nc is not None and self.nc.is_connected:
            fn(self.nc)

    async def start(self, wait: float | None = None) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain_telemetry())
        self._connect_task = asyncio.ensure_future(self._connect_forever())
        if wait:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._connected.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._connect_task is not None:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
        if self._drain_task is not None:
            # After nc.drain() so that what NATS had already delivered is still ingested.
            self.process_pending()
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
            self._drain_task = None

    @property
    def started(self) -> bool:
        return self._drain_task is not None

    async def reconnect_to(self, settings: NatsSettings) -> None:
        """Use other settings: reconnect from scratch if started (the embedded server came back on
        another port), else just remember them for start().

        nats-py only ever retries the server list it was given, so the old client is
        closed (its callbacks are ignored from now on) and a new one connects; the
        connect listeners see the new client.
        """
        self.settings = settings
        self._generation += 1
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        old, self.nc = self.nc, None
        self._connected.clear()
        if old is not None and not old.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), 5)
        if self.started and not self._stopping:
            self._connect_task = asyncio.ensure_future(self._connect_forever())

    async def set_servers(self, servers: Sequence[str]) -> None:
        """Same credentials and options, other servers (see ``reconnect_to``)."""
        await self.reconnect_to(replace(self.settings, servers=tuple(servers)))

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        return self._connected.is_set()

    def _set_state(self, state: ConnState, detail: str = "") -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state, detail)

    async def _connect_forever(self) -> None:
        delay = 0.5
        gen = self._generation
        while not self._stopping:
            self._set_state(ConnState.CONNECTING, self.settings.describe())
            try:
                nc = await nats.connect(
                    **connect_kwargs(self.settings),  # type: ignore[arg-type]
                    disconnected_cb=self._current(gen, self._on_disconnected),
                    reconnected_cb=self._current(gen, self._on_reconnected),
                    closed_cb=self._current(gen, self._on_closed),
                    error_cb=self._on_error,
                )
            except Exception as exc:  # nats-py raises several unrelated types on a failed first connect
                detail = f"cannot reach {self.settings.describe()}: {exc or type(exc).__name__}"
                self._set_state(ConnState.RECONNECTING, detail)
                log.warning("%s; retrying in %.1f s", detail, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.nc = nc
            # Large pending limits: a burst is absorbed here instead of being dropped as a slow consumer.
            # (The telemetry callback only queues, so its NATS backlog stays small; the
            # bounded queue behind it is what absorbs a slow station.)
            n_lim, b_lim = 500_000, 512 * 1024 * 1024
            await nc.subscribe(subj.all_telemetry(self.prefix), cb=self._on_telemetry_msg,
                               pending_msgs_limit=n_lim, pending_bytes_limit=b_lim)
            await nc.subscribe(subj.all_events(self.prefix), cb=self._on_event_msg,
                               pending_msgs_limit=n_lim, pending_bytes_limit=b_lim)
            self._connected.set()
            self._set_state(ConnState.CONNECTED, self.settings.describe())
            log.info("connected to NATS %s", self.settings.describe())
            for fn in self._connect_listeners:
                fn(nc)
            return

    def _current(self, gen: int, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """A client callback that does nothing once that client has been replaced."""

        async def cb() -> None:
            if gen == self._generation:
                await fn()

        return cb

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if not self._stopping:
            self._set_state(ConnState.RECONNECTING, "connection lost; reconnecting")

    async def _on_reconnected(self) -> None:
        self._last_error = None
        self._connected.set()
        self._set_state(ConnState.CONNECTED, self.settings.describe())

    async def _on_closed(self) -> None:
        self._connected.clear()
        if self._stopping:
            self._set_state(ConnState.CLOSED, "stopped")
            return
        # A closed connection (e.g. an authorization violation) never comes back by itself.
        self._set_state(ConnState.RECONNECTING, "connection closed by the server; starting over")
        self.nc = None
        self._connect_task = asyncio.ensure_future(self._connect_forever())

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer_drops += 1
            if self.slow_consumer_drops in (1, 10, 100) or self.slow_consumer_drops % 1000 == 0:
                log.warning("live view is behind: %d message(s) dropped by NATS (storage is unaffected)",
                            self.slow_consumer_drops)
            return
        # While a server is down nats-py reports the same refused connect every second: log it once a minute.
        text, now = str(exc) or type(exc).__name__, time.monotonic()
        if self._last_error is not None and self._last_error[0] == text and now - self._last_error[1] < 60:
            return
        self._last_error = (text, now)
        log.warning("NATS error: %s", text)

    # ------------------------------------------------------------------ live messages

    @property
    def telemetry_backlog(self) -> int:
        """Live messages received but not decoded yet."""
        return len(self._tel_queue)

    async def _on_telemetry_msg(self, msg: Msg) -> None:
        # Runs once per message inside nats-py's dispatch loop: keep it to an append.
        q = self._tel_queue
        self.messages += 1
        if len(q) == q.maxlen:
            self._count_overflow()
        q.append(msg)
        if len(q) == 1:
            self._tel_ready.set()

    def _count_overflow(self) -> None:
        self.overflow_drops += 1
        n = self.overflow_drops
        if n in (1, 10, 100) or n % 10_000 == 0:
            log.warning("live view is behind: %d telemetry message(s) dropped from a full queue of %d "
                        "(storage is unaffected)", n, self._tel_queue.maxlen)

    async def _drain_telemetry(self) -> None:
        q = self._tel_queue
        ready = self._tel_ready
        while True:
            if not q:
                ready.clear()
                await ready.wait()
            self.process_pending(self.decode_budget_s)
            # Let Qt paint, the NATS reader read and the other tasks run between chunks.
            await asyncio.sleep(0)

    def process_pending(self, budget_s: float | None = None) -> int:
        """Decode queued telemetry (for at most ``budget_s``; None = all) and deliver it; returns how many."""
        # A chunk briefly holds a few thousand GC-tracked objects (structs, lists,
        # tuples) that all die together at its end. With the collector on, they set
        # off generation-0/1 passes mid-chunk and get promoted, then swept again by
        # full collections: measured at 100,000 GPU samples/s that was ~25 % of the
        # loop's time. Pausing it for one chunk (milliseconds) is free: the garbage
        # is freed by reference counting, and the collector's state is restored.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._process_chunk(budget_s)
        finally:
            if was_enabled:
                gc.enable()

    def _process_chunk(self, budget_s: float | None) -> int:
        q = self._tel_queue
        rejects = self.telemetry_rejects
        decoded: list[Telemetry] = []
        deadline = math.inf if budget_s is None else time.perf_counter() + budget_s
        n = 0
        while q:
            msg = q.popleft()
            n += 1
            subject = msg.subject
            try:
                tel = decode_telemetry(msg.data)
            except ProtocolError as exc:
                rejects.count(exc, subject)
                continue
            if tel.host != subj.host_from_subject(subject):
                rejects.count(ProtocolError("host_mismatch", f"{tel.host} on {subject}"), subject)
                continue
            decoded.append(tel)
            # Reading the clock costs about as much as a small decode: check every 16.
            if not n & 15 and time.perf_counter() >= deadline:
                break
        if decoded:
            self._deliver(decoded, time.time())
        return n

    def _deliver(self, decoded: list[Telemetry], received_at: float) -> None:
        # A failing consumer must not stop the live view: log it and carry on with the next chunk.
        try:
            if self.on_telemetry_batch is not None:
                self.on_telemetry_batch(decoded, received_at)
            if self.on_telemetry is not None:
                fn = self.on_telemetry
                for tel in decoded:
                    fn(tel, received_at)
        except Exception:
            log.exception("telemetry consumer failed on a chunk of %d message(s)", len(decoded))

    async def _on_event_msg(self, msg: Msg) -> None:
        try:
            ev = decode_event(msg.data)
        except ProtocolError as exc:
            self.event_rejects.count(exc, msg.subject)
            return
        if self.on_event is not None:
            self.on_event(ev)

    # ------------------------------------------------------------------ commands

    def next_id(self) -> str:
        return f"c-{self._session}-{next(self._ids)}"

    async def request(self, host: str, cmd: Command, timeout: float = 5.0) -> Reply:
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise HostOffline(host, "the station is not connected to NATS")
        try:
            resp = await nc.request(subj.command(self.prefix, host), encode(cmd), timeout=timeout)
        except NoRespondersError:
            raise HostOffline(host, "no responders: no agent listens for this host") from None
        except (NatsTimeout, TimeoutError):
            raise HostOffline(host, f"no reply within {timeout:.0f} s") from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise HostOffline(host, f"NATS connection problem: {exc}") from None
        try:
            return decode_reply(resp.data)
        except ProtocolError as exc:
            raise HostOffline(host, f"unreadable reply ({exc.reason})") from None

    async def send(self, host: str, op: str, gpus: list[int] | None = None, **fields: object) -> tuple[bool, str]:
        """UI-level command: never raises for an offline host; returns (ok, message in words)."""
        try:
            cmd = build_command(op, self.next_id(), gpus, **fields)
        except (KeyError, ValueError) as exc:
            return False, f"{op}: invalid request ({exc})"
        what = f"{op} {host}" + (f" GPU {','.join(map(str, gpus))}" if gpus else "")
        try:
            rep = await self.request(host, cmd)
        except HostOffline as exc:
            return False, f"{what}: {exc}"
        if rep.ok:
            return True, f"{what}: done"
        return False, f"{what}: refused: {rep.error}"
