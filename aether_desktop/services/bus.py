"""The station's NATS client: live telemetry and events, and commands to agents.

The live subscriptions decode each message right in the callback (msgspec,
microseconds) and hand the struct to plain callbacks that must not block;
nothing here awaits the database. Rejected messages are counted and dropped.
Commands are request-reply with a timeout; "no responders" and a timeout
both mean the host is offline, and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import secrets
import time
from collections.abc import Callable

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
    ) -> None:
        self.settings = settings
        self.prefix = prefix
        self.on_telemetry = on_telemetry
        self.on_event = on_event
        self.on_state = on_state
        self.nc: Client | None = None
        self.state = ConnState.CONNECTING
        self.telemetry_rejects = RejectCounter("telemetry")
        self.event_rejects = RejectCounter("event")
        self.slow_consumer_drops = 0
        self.messages = 0
        self._ids = itertools.count(1)
        self._session = secrets.token_hex(3)
        self._stopping = False
        self._connected = asyncio.Event()
        self._connect_task: asyncio.Task[None] | None = None
        self._connect_listeners: list[Callable[[Client], None]] = []

    # ------------------------------------------------------------------ lifecycle

    def add_connect_listener(self, fn: Callable[[Client], None]) -> None:
        """Called with the client on the first connect (and after a from-scratch reconnect)."""
        self._connect_listeners.append(fn)
        if self.nc is not None and self.nc.is_connected:
            fn(self.nc)

    async def start(self, wait: float | None = None) -> None:
        self._connect_task = asyncio.ensure_future(self._connect_forever())
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), wait)

    async def stop(self) -> None:
        self._stopping = True
        if self._connect_task is not None:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    def _set_state(self, state: ConnState, detail: str = "") -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state, detail)

    async def _connect_forever(self) -> None:
        delay = 0.5
        while not self._stopping:
            self._set_state(ConnState.CONNECTING, self.settings.describe())
            try:
                nc = await nats.connect(
                    **connect_kwargs(self.settings),  # type: ignore[arg-type]
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
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
            limits = {"pending_msgs_limit": 500_000, "pending_bytes_limit": 512 * 1024 * 1024}
            await nc.subscribe(subj.all_telemetry(self.prefix), cb=self._on_telemetry_msg, **limits)
            await nc.subscribe(subj.all_events(self.prefix), cb=self._on_event_msg, **limits)
            self._connected.set()
            self._set_state(ConnState.CONNECTED, self.settings.describe())
            log.info("connected to NATS %s", self.settings.describe())
            for fn in self._connect_listeners:
                fn(nc)
            return

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if not self._stopping:
            self._set_state(ConnState.RECONNECTING, "connection lost; reconnecting")

    async def _on_reconnected(self) -> None:
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
        log.warning("NATS error: %s", exc)

    # ------------------------------------------------------------------ live messages

    async def _on_telemetry_msg(self, msg: Msg) -> None:
        self.messages += 1
        try:
            tel = decode_telemetry(msg.data)
        except ProtocolError as exc:
            self.telemetry_rejects.count(exc, msg.subject)
            return
        if tel.host != subj.host_from_subject(msg.subject):
            self.telemetry_rejects.count(ProtocolError("host_mismatch", f"{tel.host} on {msg.subject}"), msg.subject)
            return
        if self.on_telemetry is not None:
            self.on_telemetry(tel, time.time())

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
