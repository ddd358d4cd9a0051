"""The agent: read every GPU once per tick, publish, answer commands, run jobs.

One asyncio loop. The backend read runs in a worker thread (NVML calls can
block); publishing goes through the outbox so a NATS outage loses nothing
the buffer can hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from nats.js.errors import NotFoundError as StreamNotFound
from nats.js.errors import ServiceUnavailableError as JsUnavailable

from aether_protocol import PROTOCOL_VERSION, Event, GpuSample, Telemetry, command_id_and_op, encode, reply
from aether_protocol import subjects as subj
from aether_protocol.connection import NatsSettings, connect_kwargs
from headless_agent.backend import GpuBackend
from headless_agent.commands import QUERY_OPS, CommandHandler
from headless_agent.jobs import JobPolicy, ProcessJobRunner
from headless_agent.outbox import NotCaptured, Outbox, Outgoing, PublishFailed, Undeliverable

log = logging.getLogger("aether.agent")

AGENT_VERSION = "0.1.0"
STORED_RECHECK_S = 10.0  # how often the agent asks again whether a stream stores its subjects
STORED_RETRY_S = 1.0  # sooner when the last answer was not an answer (timeout, JetStream busy)
STOP_DRAIN_S = 3.0  # at stop, how long buffered messages may take to go out
NATS_CLOSE_S = 5.0
MAX_COMMANDS_IN_FLIGHT = 64  # more are refused with ok:false until some finish


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
        self._stored_next: float | None = None  # monotonic time of the next check; None: check now
        self._event_n = 0
        self._read_failures = 0
        self._auth_refusals = 0  # in a row: the server refusing our credentials is logged, not every second
        self._connector: asyncio.Future[None] | None = None
        # Set by stop and by a reconnect: cuts a back-off wait short.
        self._retry_now = asyncio.Event()
        self._command_tasks: set[asyncio.Future[None]] = set()
        self._control_tasks: set[asyncio.Future[None]] = set()
        simulated_jobs = hasattr(backend, "start_job")
        use_process = config.jobs_mode == "process" or (config.jobs_mode == "auto" and not simulated_jobs)
        runner = ProcessJobRunner(config.policy, backend.gpu_count()) if use_process else None
        self.runner = runner
        self.commands = CommandHandler(backend, runner, config.policy, self.emit, self.info, time.time)

    # ------------------------------------------------------------------ public

    def stop(self) -> None:
        self._stop.set()
        self._retry_now.set()

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
        # SIGHUP (the terminal or the ssh session went away) stops like SIGTERM: buffer drained, jobs ended.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.emit("agent_started", detail=f"{self.backend.gpu_count()} GPU(s), boot {self.boot}")
        self._connector = asyncio.ensure_future(self._connect_forever())
        sender = asyncio.ensure_future(self._send_loop())
        try:
            await self._tick_loop()
        finally:
            await self._shutdown(sender)

    # ------------------------------------------------------------------ ticks

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.interval_s
        next_t = time.monotonic()
        while not self._stop.is_set():
            now = time.time()
            samples = await self._read(loop, now)
            if samples is not None:  # also with no GPU at all: the message is the host's heartbeat
                self._publish_telemetry(samples, now)
            try:
                self.commands.poll_jobs()
            except Exception:  # a job runner or backend bug must not stop the ticks
                log.exception("collecting finished jobs failed; retrying next tick")
            next_t += interval
            delay = next_t - time.monotonic()
            if delay < -interval:  # fell far behind (suspend, slow NVML): don't burst to catch up
                next_t = time.monotonic()
                delay = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, delay)):
                    await self._stop.wait()

    async def _read(self, loop: asyncio.AbstractEventLoop, now: float) -> list[GpuSample] | None:
        """One backend read; None when it failed (logged in full once, then every 60th time)."""
        try:
            samples = await loop.run_in_executor(None, self.backend.read, now)
        except Exception:  # a backend bug must not kill the host's reporting
            self._read_failures += 1
            if self._read_failures == 1 or self._read_failures % 60 == 0:
                log.exception("reading the GPUs failed (%d time(s) in a row); retrying every tick",
                              self._read_failures)
            return None
        if self._read_failures:
            log.info("reading the GPUs works again after %d failure(s)", self._read_failures)
            self._read_failures = 0
        return samples

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
                nc = await nats.connect(
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
            try:
                await nc.subscribe(subj.command(self.config.prefix, self.config.host), cb=self._on_command)
            except nats.errors.Error as exc:  # closed again before we could listen: start over
                log.warning("could not subscribe to commands (%s); reconnecting", exc)
                with contextlib.suppress(nats.errors.Error):
                    await nc.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                delay = min(delay * 2, 10.0)
                continue
            log.info("connected to NATS %s as host %r", self.config.nats.describe(), self.config.host)
            self._auth_refusals = 0
            self.nc = nc
            self._stored_next = None
            self._connected.set()
            self.outbox.wake()
            return

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        log.warning("NATS disconnected; buffering (%d waiting)", len(self.outbox))

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected; replaying %d buffered message(s)", len(self.outbox))
        self._auth_refusals = 0
        self._stored_next = None
        self._connected.set()
        self._retry_now.set()
        self.outbox.wake()

    async def _on_closed(self) -> None:
        self._connected.clear()
        if self._stop.is_set():
            return
        # A closed connection never comes back by itself (e.g. permissions violation): start over,
        # with a task that shutdown knows about (an untracked one could connect after the stop).
        log.error("NATS connection closed; reconnecting from scratch")
        self.nc = None
        if self._connector is None or self._connector.done():
            self._connector = asyncio.ensure_future(self._connect_forever())

    async def _on_error(self, exc: Exception) -> None:
        if _is_auth_refusal(exc):
            # The server's answer to our credentials: it may be fixed on the server without restarting
            # us, so the client keeps trying (every second); the log says it clearly, not every time.
            self._auth_refusals += 1
            if self._auth_refusals == 1 or self._auth_refusals % 60 == 0:
                log.error("NATS at %s refused this agent's credentials (%s, %d time(s) in a row): check "
                          "--nats-user/--nats-password, --nats-token, --nats-nkey or --nats-creds and the "
                          "server's authorization; retrying", self.config.nats.describe(), exc,
                          self._auth_refusals)
            return
        log.warning("NATS error: %s", exc)

    async def _on_command(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one after another: answering in a
        # task keeps a ping from waiting behind a sleep that hangs on a sick GPU
        # (CommandHandler keeps control commands in order). Bounded: a flood of
        # requests is refused, not queued without end.
        # Queries (ping, job_log) are never refused: they do not wait on anything.
        cmd_id, op = command_id_and_op(msg.data)
        control = not (isinstance(op, str) and op in QUERY_OPS)
        if control and len(self._control_tasks) >= MAX_COMMANDS_IN_FLIGHT:
            log.warning("refusing a command: %d already in flight", len(self._control_tasks))
            await self._respond(msg, reply(cmd_id, False, f"agent busy: {len(self._control_tasks)} commands in flight"))
            return
        task = asyncio.ensure_future(self._answer(msg))
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)
        if control:
            self._control_tasks.add(task)
            task.add_done_callback(self._control_tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        # handle() answers every request itself, also when the backend fails in an unexpected way.
        await self._respond(msg, await self.commands.handle(msg.data))

    async def _respond(self, msg: Msg, answer: bytes) -> None:
        if msg.reply:
            try:
                await msg.respond(answer)
            except Exception as exc:  # the requester may be gone; nothing else to do
                log.warning("could not answer command: %s", exc)

    async def _refresh_stored(self) -> None:
        nc = self.nc
        if nc is None or (self._stored_next is not None and time.monotonic() < self._stored_next):
            return
        js = nc.jetstream()
        answered = True
        for subject in (subj.telemetry(self.config.prefix, self.config.host),
                        subj.events(self.config.prefix, self.config.host)):
            try:
                await js.find_stream_name_by_subject(subject)
                stored = True
            except StreamNotFound:
                stored = False  # JetStream is there and no stream has the subject
            except JsUnavailable as exc:
                if exc.code is not None:  # a 503 from JetStream (still recovering): not an answer
                    answered = False
                    stored = self._stored.get(subject, True)
                else:  # no responders on the JetStream API: JetStream is not enabled
                    stored = False
            except Exception as exc:  # timeout, JetStream still recovering, no permission, ...
                # Not an answer: right after a NATS restart the streams may not be loaded yet, and
                # deciding "not stored" then would publish the backlog without acks into nothing.
                # Keep what we knew (ack'd publishing if we knew nothing) and ask again soon.
                answered = False
                stored = self._stored.get(subject, True)
                log.debug("could not ask which stream stores %s (%s)", subject, exc or type(exc).__name__)
            if stored != self._stored.get(subject):
                log.info("%s is %s", subject, "stored by a stream: publishing with acks" if stored
                         else "not stored by any stream: publishing live only")
            self._stored[subject] = stored
        self._stored_next = time.monotonic() + (STORED_RECHECK_S if answered else STORED_RETRY_S)

    async def _publish(self, item: Outgoing) -> None:
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise PublishFailed("not connected")
        try:
            if not self._stored.get(item.subject, False):
                await nc.publish(item.subject, item.payload, headers={"Nats-Msg-Id": item.msg_id})
                return
            resp = await nc.request(item.subject, item.payload, timeout=self.config.ack_timeout_s,
                                    headers={"Nats-Msg-Id": item.msg_id})
        except NoRespondersError:
            raise NotCaptured() from None
        except nats.errors.MaxPayloadError as exc:
            raise Undeliverable(f"{len(item.payload)} bytes is over the server's max payload") from exc
        except (NatsTimeout, TimeoutError, nats.errors.Error, OSError) as exc:
            # Any other client error (closed, reconnecting, draining, buffer full) is a "not now":
            # the message stays buffered. Letting it escape would end the sender for good.
            raise PublishFailed(str(exc) or type(exc).__name__) from exc
        error = _ack_error(resp.data)
        if error is not None:
            raise PublishFailed(error)

    async def _send_loop(self) -> None:
        while True:
            if self._stop.is_set() and not len(self.outbox):
                return
            if not self._connected.is_set():
                await self.outbox.wait(0.5)
                continue
            try:
                await self._refresh_stored()
                ok = await self.outbox.drain(self._publish)
            except Exception:  # a bug here must not end publishing for the rest of the agent's life
                log.exception("sending buffered messages failed; retrying")
                ok = False
                self.outbox.failures += 1
            if ok:
                await self.outbox.wait(0.5)
                continue
            if self._stop.is_set():
                return  # stopping and the server refuses: what is left is reported at stop
            # Back off (0.5 s doubling to 10 s) so a rejecting stream or a sick server is not hammered.
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.5, self.outbox.backoff_s())):
                    await self._retry_now.wait()

    async def _shutdown(self, sender: asyncio.Future[None]) -> None:
        log.info("stopping: cancelling jobs, publishing agent_stopping")
        # No new job from here on: control commands (also queued ones) are refused. Those in
        # progress get a moment to answer; one still hanging on a sick GPU is abandoned.
        self.commands.stopping = True
        if self._command_tasks:
            _, hanging = await asyncio.wait(list(self._command_tasks), timeout=STOP_DRAIN_S)
            for hung in hanging:
                hung.cancel()
        if self.runner is not None:
            await self.runner.stop_all()
        with contextlib.suppress(Exception):
            self.commands.poll_jobs()
        self.emit("agent_stopping", detail=f"{len(self.outbox)} message(s) buffered at stop")
        if self._connected.is_set():
            # The sender itself sends what is left and returns once the buffer is empty: a second
            # drain here would send the same messages twice, concurrently and out of order.
            self.outbox.wake()
            await asyncio.wait([sender], timeout=STOP_DRAIN_S)
        for task in (self._connector, sender):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception:
                    log.exception("a background task of the agent had failed")
        await self._close_nats()
        self.backend.close()
        if len(self.outbox):
            log.warning("%d message(s) not delivered at stop", len(self.outbox))

    async def _close_nats(self) -> None:
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        if nc.is_connected:
            try:
                async with asyncio.timeout(NATS_CLOSE_S):
                    await nc.drain()
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("NATS drain at stop failed: %s", exc or type(exc).__name__)
        if not nc.is_closed:
            # Reconnecting (NATS is down) or a drain that timed out: close, which ends the reconnect loop.
            try:
                async with asyncio.timeout(NATS_CLOSE_S):
                    await nc.close()
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("NATS close at stop failed: %s", exc or type(exc).__name__)


def _is_auth_refusal(exc: Exception) -> bool:
    # Before CONNECT completes, nats-py reports the server's "-ERR 'Authorization Violation'" as a
    # plain nats.errors.Error; after, as AuthorizationError.
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


def _ack_error(data: bytes) -> str | None:
    """The error of a JetStream publish ack, or None when the stream stored the message."""
    try:
        ack = json.loads(data)
    except ValueError:
        return f"unreadable ack {data[:100]!r}"
    if not isinstance(ack, dict):
        return f"unexpected ack {data[:100]!r}"
    err = ack.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        return f"stream refused the message: {err.get('description')} (code {err.get('err_code')})"
    return f"stream refused the message: {err}"


def default_host_id() -> str:
    return subj.sanitize_host_id(os.uname().nodename)


def default_log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("aether-agent")) / "jobs"
