"""The agent: read every GPU once per tick, publish, answer commands, run jobs.

One asyncio loop. The backend read runs in a worker thread (NVML calls can
block); publishing goes through the outbox so a NATS outage loses nothing
the buffer can hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from aether_protocol import PROTOCOL_VERSION, Event, GpuSample, Telemetry, encode
from aether_protocol import subjects as subj
from aether_protocol.connection import NatsSettings, connect_kwargs
from headless_agent.backend import GpuBackend
from headless_agent.commands import CommandHandler
from headless_agent.jobs import JobPolicy, ProcessJobRunner
from headless_agent.outbox import NotCaptured, Outbox, Outgoing, PublishFailed

log = logging.getLogger("aether.agent")

AGENT_VERSION = "0.1.0"


@dataclass(frozen=True)
class AgentConfig:
    host: str
    nats: NatsSettings
    interval_s: float = 1.0
    prefix: str = subj.DEFAULT_PREFIX
    policy: JobPolicy = field(default_factory=JobPolicy)
    jobs_mode: str = "auto"  # auto | process | simulate
    buffer_messages: int = 20_000
    ack_timeout_s: float = 2.0


class Agent:
    def __init__(self, config: AgentConfig, backend: GpuBackend) -> None:
        self.config = config
        self.backend = backend
        self.boot = secrets.token_hex(4)
        self.seq = 0
        self.outbox = Outbox(max_messages=config.buffer_messages)
        self.nc: Client | None = None
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()
        self._gpu_states: dict[int, str] = {}
        # Whether a JetStream stream stores our subjects: then each publish waits for the stream's ack
        # (at-least-once); otherwise only live subscribers exist and a plain publish is all there is.
        self._stored: dict[str, bool] = {}
        self._stored_checked = 0.0
        self._event_n = 0
        simulated_jobs = hasattr(backend, "start_job")
        use_process = config.jobs_mode == "process" or (config.jobs_mode == "auto" and not simulated_jobs)
        runner = ProcessJobRunner(config.policy, backend.gpu_count()) if use_process else None
        self.runner = runner
        self.commands = CommandHandler(backend, runner, config.policy, self.emit, self.info, time.time)

    # ------------------------------------------------------------------ public

    def stop(self) -> None:
        self._stop.set()

    def info(self) -> dict[str, Any]:
        return {
            "host": self.config.host,
            "boot": self.boot,
            "seq": self.seq,
            "gpus": self.backend.gpu_count(),
            "agent_version": AGENT_VERSION,
            "allow_jobs": self.config.policy.allow_jobs,
            "buffered": len(self.outbox),
            "simulated": hasattr(self.backend, "inject_fault"),
        }

    def emit(self, kind: str, **fields: Any) -> None:
        self._event_n += 1
        ev = Event(
            v=PROTOCOL_VERSION,
            host=self.config.host,
            ts=time.time(),
            id=f"e-{self.config.host}-{self.boot}-{self._event_n}",
            kind=kind,  # type: ignore[arg-type]
            **{k: v for k, v in fields.items() if v is not None},
        )
        self.outbox.put(Outgoing(subj.events(self.config.prefix, self.config.host), encode(ev), ev.id, True))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.emit("agent_started", detail=f"{self.backend.gpu_count()} GPU(s), boot {self.boot}")
        connector = asyncio.ensure_future(self._connect_forever())
        sender = asyncio.ensure_future(self._send_loop())
        try:
            await self._tick_loop()
        finally:
            await self._shutdown(connector, sender)

    # ------------------------------------------------------------------ ticks

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.interval_s
        next_t = time.monotonic()
        while not self._stop.is_set():
            now = time.time()
            try:
                samples = await loop.run_in_executor(None, self.backend.read, now)
            except Exception:  # a backend bug must not kill the host's reporting
                log.exception("reading the GPUs failed; retrying next tick")
                samples = []
            if samples:
                self._publish_telemetry(samples, now)
            self.commands.poll_jobs()
            next_t += interval
            delay = next_t - time.monotonic()
            if delay < -interval:  # fell far behind (suspend, slow NVML): don't burst to catch up
                next_t = time.monotonic()
                delay = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, delay)):
                    await self._stop.wait()

    def _publish_telemetry(self, samples: list[GpuSample], now: float) -> None:
        self._track_gpu_events(samples)
        state = "sleeping" if samples and all(s.state == "sleeping" for s in samples) else "active"
        msg = Telemetry(
            v=PROTOCOL_VERSION,
            host=self.config.host,
            boot=self.boot,
            seq=self.seq,
            ts=now,
            interval_s=self.config.interval_s,
            state=state,  # type: ignore[arg-type]
            gpus=samples,
        )
        self.outbox.put(Outgoing(
            subj.telemetry(self.config.prefix, self.config.host), encode(msg),
            f"{self.config.host}:{self.boot}:{self.seq}",
        ))
        self.seq += 1

    def _track_gpu_events(self, samples: list[GpuSample]) -> None:
        for s in samples:
            before = self._gpu_states.get(s.index)
            if s.state == "lost" and before not in (None, "lost"):
                self.emit("gpu_lost", gpus=[s.index], detail=f"{s.name} ({s.uuid}) stopped responding")
            elif s.state == "lost" and before is None:
                self.emit("gpu_lost", gpus=[s.index], detail=f"{s.name} ({s.uuid}) is lost at agent start")
            elif before == "lost" and s.state != "lost":
                self.emit("gpu_recovered", gpus=[s.index], detail=f"{s.name} ({s.uuid}) reports again")
            if s.xid is not None:
                self.emit("xid", gpus=[s.index], xid=s.xid, detail=f"XID {s.xid} on GPU {s.index}")
            self._gpu_states[s.index] = s.state

    # ------------------------------------------------------------------ NATS

    async def _connect_forever(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self.nc = await nats.connect(
                    **connect_kwargs(self.config.nats),  # type: ignore[arg-type]
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    error_cb=self._on_error,
                )
            except Exception as exc:  # nats-py raises several unrelated types on a failed first connect
                log.warning("cannot reach NATS at %s (%s); retrying in %.0f s",
                            self.config.nats.describe(), exc or type(exc).__name__, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                delay = min(delay * 2, 10.0)
                continue
            log.info("connected to NATS %s as host %r", self.config.nats.describe(), self.config.host)
            await self.nc.subscribe(subj.command(self.config.prefix, self.config.host), cb=self._on_command)
            self._connected.set()
            return

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        log.warning("NATS disconnected; buffering (%d waiting)", len(self.outbox))

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected; replaying %d buffered message(s)", len(self.outbox))
        self._stored_checked = 0.0
        self._connected.set()
        self.outbox._wake.set()

    async def _on_closed(self) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            # A closed connection never comes back by itself (e.g. permissions violation): start over.
            log.error("NATS connection closed; reconnecting from scratch")
            self.nc = None
            asyncio.ensure_future(self._connect_forever())

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error: %s", exc)

    async def _on_command(self, msg: Msg) -> None:
        answer = await self.commands.handle(msg.data)
        if msg.reply:
            try:
                await msg.respond(answer)
            except Exception as exc:  # the requester may be gone; nothing else to do
                log.warning("could not answer command: %s", exc)

    async def _refresh_stored(self) -> None:
        nc = self.nc
        if nc is None or time.monotonic() - self._stored_checked < 10.0:
            return
        self._stored_checked = time.monotonic()
        js = nc.jetstream()
        for subject in (subj.telemetry(self.config.prefix, self.config.host),
                        subj.events(self.config.prefix, self.config.host)):
            try:
                await js.find_stream_name_by_subject(subject)
                stored = True
            except Exception:  # NotFound, JetStream disabled, no permission: treat as "not stored"
                stored = False
            if stored != self._stored.get(subject):
                log.info("%s is %s", subject, "stored by a stream: publishing with acks" if stored
                         else "not stored by any stream: publishing live only")
            self._stored[subject] = stored

    async def _publish(self, item: Outgoing) -> None:
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise PublishFailed("not connected")
        if not self._stored.get(item.subject, False):
            try:
                await nc.publish(item.subject, item.payload, headers={"Nats-Msg-Id": item.msg_id})
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                    nats.errors.OutboundBufferLimitError) as exc:
                raise PublishFailed(str(exc)) from exc
            return
        try:
            resp = await nc.request(item.subject, item.payload, timeout=self.config.ack_timeout_s,
                                    headers={"Nats-Msg-Id": item.msg_id})
        except NoRespondersError:
            raise NotCaptured() from None
        except (NatsTimeout, TimeoutError, nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.OutboundBufferLimitError) as exc:
            raise PublishFailed(str(exc)) from exc
        if resp.data.startswith(b'{"error"'):
            raise PublishFailed(resp.data[:200].decode(errors="replace"))

    async def _send_loop(self) -> None:
        while True:
            if self._stop.is_set() and not len(self.outbox):
                return
            if not self._connected.is_set():
                await self.outbox.wait(0.5)
                continue
            await self._refresh_stored()
            ok = await self.outbox.drain(self._publish)
            if not ok:
                await asyncio.sleep(0.5)
            else:
                await self.outbox.wait(0.5)

    async def _shutdown(self, connector: asyncio.Future[None], sender: asyncio.Future[None]) -> None:
        log.info("stopping: cancelling jobs, publishing agent_stopping")
        if self.runner is not None:
            await self.runner.stop_all()
        self.commands.poll_jobs()
        self.emit("agent_stopping", detail=f"{len(self.outbox)} message(s) buffered at stop")
        if self._connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.outbox.drain(self._publish), 3.0)
        for task in (connector, sender):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        self.backend.close()
        if len(self.outbox):
            log.warning("%d message(s) not delivered at stop", len(self.outbox))


def default_host_id() -> str:
    return subj.sanitize_host_id(os.uname().nodename)


def default_log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("aether-agent")) / "jobs"
