"""Batched pulls from a JetStream durable pull consumer, without nats-py's per-message fetch.

Used by :mod:`ingest`; kept apart because it is a small protocol client of its
own (the ``$JS.API.CONSUMER.MSG.NEXT`` request and the statuses that end it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

# Statuses that only say "nothing more for this request": 404 (no_wait, nothing
# there), 408 (request expired), 409 when every permitted message is in flight.
_QUIET_STATUSES = ("404", "408", "409 Exceeded MaxAckPending")


class PullConsumer:
    """Batched pulls from one durable consumer through this client's own inbox.

    nats-py's ``PullSubscription.fetch()`` awaits every message through
    ``Subscription.next_msg()``, which creates a task, a uuid and a timer per
    message: about 30 us of the station's one busy core per message, a third
    of the whole ingest. Here the subscription callback only appends to a
    list, and a fetch wakes up once per batch.

    As a batch is handed out, the next one is requested (``no_wait``), so the
    server reads and sends it while this one is decoded and written. Each
    request gets its own reply subject (``<inbox>.<n>``): a status ending an
    older, given-up request cannot cut the current one short, and messages
    arriving late for it just wait in the buffer for the next fetch (or are
    NAKed by :meth:`close`).
    """

    def __init__(self, nc: NatsClient, stream: str, durable: str) -> None:
        self._nc = nc
        self.stream = stream
        self.durable = durable
        self._next_subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = ""
        self._sub: Any = None
        self._buf: list[Msg] = []
        self._want = 0  # buffer size that completes the request in flight
        self._reply = ""  # reply subject of the latest request
        self._requests = 0
        self._open = False  # a request is in flight
        self._deadline = 0.0  # monotonic() after which it counts as lost
        self._ended: str | None = None  # status that ended the latest request
        self._wake = asyncio.Event()

    async def subscribe(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:  # a stream message (JetStream always gives it an ack subject)
            self._buf.append(msg)
            if len(self._buf) >= self._want:
                self._open = False
                self._wake.set()
            return
        # A status; 100 (heartbeats) only comes when asked for, and is not.
        headers = msg.headers or {}
        status = headers.get(api.Header.STATUS, "")
        if msg.subject == self._reply and status != "100":
            self._ended = f"{status} {headers.get(api.Header.DESCRIPTION, '')}".strip()
            self._open = False
            self._wake.set()

    async def _request(self, batch: int, timeout: float, *, no_wait: bool) -> None:
        self._requests += 1
        self._reply = f"{self._inbox}.{self._requests}"
        self._want = len(self._buf) + batch
        self._ended = None
        self._open = True
        self._wake.clear()
        # A request lost with a NATS restart gets no answer at all.
        self._deadline = time.monotonic() + timeout + 1.0
        # no_wait: deliver what is there now and end with a 404/408 at once;
        # otherwise the request lingers until the batch is full or it expires.
        req: dict[str, object] = (
            {"batch": batch, "no_wait": True} if no_wait else {"batch": batch, "expires": int(timeout * 1e9)}
        )
        await self._nc.publish(self._next_subject, json.dumps(req).encode(), reply=self._reply)

    async def _wait(self) -> None:
        if self._open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, self._deadline - time.monotonic()))
            self._open = False

    async def fetch(self, batch: int, timeout: float) -> tuple[list[Msg], str | None]:
        """Up to ``batch`` messages, at once if any are available, else within
        about ``timeout``; with the status that ended an empty pull (e.g.
        ``"409 Consumer Deleted"``), None when it was a quiet one (404, 408)."""
        if len(self._buf) < batch:
            if not self._open and not self._buf:
                await self._request(batch, timeout, no_wait=True)
            await self._wait()
            if not self._buf and (self._ended or "").startswith(_QUIET_STATUSES):
                await self._request(batch, timeout, no_wait=False)
                await self._wait()
        out = self._buf[:batch]
        del self._buf[:batch]
        if out and not self._open:
            await self._request(batch, timeout, no_wait=True)  # the prefetch
            return out, None
        ended = self._ended
        return out, None if out or ended is None or ended.startswith(_QUIET_STATUSES) else ended

    async def close(self, timeout: float = 1.0) -> None:
        """Unsubscribe; messages received but never handed out are NAKed, so the
        next run gets them at once instead of after ack_wait."""
        if self._sub is not None:
            if self._nc.is_connected:  # let the prefetch land in the buffer first
                self._deadline = min(self._deadline, time.monotonic() + timeout)
                await self._wait()
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
        left, self._buf = self._buf, []
        for m in left:
            with contextlib.suppress(nats.errors.Error):
                await m.nak()
