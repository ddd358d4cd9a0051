"""At-least-once publishing with a bounded local buffer.

Every telemetry message and event goes through the outbox. The sender
publishes with a JetStream-style request (the ``Nats-Msg-Id`` header makes a
re-send a duplicate the stream drops) and removes a message only once the
server acknowledged it. While NATS is unreachable messages wait here, in
order, with their original timestamps; when the buffer is full the oldest
telemetry is dropped first (events are kept longer: they carry job outcomes).

If no stream captures a subject ("no responders"), nobody stores it: the
core publish already reached the live subscribers, so the message is done.

When the server refuses (a full stream that discards new messages, a timeout)
the message stays at the head of its queue and the sender backs off; until
one message gets through again, retries go one at a time, so a rejecting
stream costs one request per back-off step instead of a window of them, and
the backlog is replayed in order once it accepts again. A message that can
never be sent (larger than the server's max payload) is dropped and counted:
retrying it forever would only hide it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("aether.agent.outbox")


@dataclass(frozen=True)
class Outgoing:
    subject: str
    payload: bytes
    msg_id: str
    is_event: bool = False


class PublishFailed(Exception):
    """The server did not acknowledge: keep the message and retry later."""


class Undeliverable(Exception):
    """The message can never be sent (e.g. over the server's max payload): drop it, loudly."""


class NotCaptured(Exception):
    """No stream captures this subject: the live publish was all there is to do."""


PublishFn = Callable[[Outgoing], Awaitable[None]]


class Outbox:
    def __init__(self, max_messages: int = 20_000, max_events: int = 5_000) -> None:
        self._telemetry: deque[Outgoing] = deque()
        self._events: deque[Outgoing] = deque()
        self.max_messages = max_messages
        self.max_events = max_events
        self.dropped = 0
        self.undeliverable = 0
        self.sent = 0
        # Consecutive drains that ended in a failure, and the server's last reason.
        self.failures = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._telemetry) + len(self._events)

    def put(self, item: Outgoing) -> None:
        q, cap = (self._events, self.max_events) if item.is_event else (self._telemetry, self.max_messages)
        if len(q) >= cap:
            q.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("outbox full: dropped %d oldest message(s) so far", self.dropped)
        q.append(item)
        self._wake.set()

    def wake(self) -> None:
        """Cut the sender's current wait short (a reconnect: replay now)."""
        self._wake.set()

    async def wait(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races the wake-up,
        # and then a sender being shut down would never stop.
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            return
        finally:
            self._wake.clear()

    async def drain(self, publish: PublishFn, window: int = 64) -> bool:
        """Send what is buffered, oldest first, ``window`` messages in flight at a time.

        Returns False when the server stopped acknowledging (caller backs off, see ``failures``).
        """
        while True:
            # After a failure, probe with one message: it is the head of its queue, so order holds.
            size = 1 if self.failures else window
            batch: list[tuple[deque[Outgoing], Outgoing]] = []
            # Events first: they are rare and carry state changes the station needs.
            for q in (self._events, self._telemetry):
                for item in itertools.islice(q, size - len(batch)):
                    batch.append((q, item))
                if len(batch) >= size:
                    break
            if not batch:
                return True
            results = await asyncio.gather(*(self._send_one(publish, it) for _, it in batch))
            failed_in: set[int] = set()
            for (q, item), ok in zip(batch, results, strict=True):
                if not ok:
                    failed_in.add(id(q))
                    continue
                if id(q) in failed_in:
                    # Stored, but after an earlier message of its queue that will be retried.
                    log.warning("message %s was accepted before an earlier one the server refused: "
                                "they are stored out of order", item.msg_id)
                try:
                    q.remove(item)
                except ValueError:
                    # Dropped by put() while in flight: already gone.
                    continue
                self.sent += 1
            if not all(results):
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("the server refuses messages (%s); %d waiting, retrying with back-off",
                                self.last_error, len(self))
                return False
            if self.failures:
                log.info("the server accepts messages again after %d failed attempt(s)", self.failures)
                self.failures = 0

    def backoff_s(self, base: float = 0.5, cap: float = 10.0) -> float:
        """How long the sender waits before the next attempt after ``failures`` failures."""
        if not self.failures:
            return 0.0
        return float(min(cap, base * 2 ** min(self.failures - 1, 16)))

    async def _send_one(self, publish: PublishFn, item: Outgoing) -> bool:
        try:
            await publish(item)
        except NotCaptured:
            return True
        except PublishFailed as exc:
            self.last_error = str(exc) or type(exc).__name__
            return False
        except Undeliverable as exc:
            self.undeliverable += 1
            log.error("dropping message %s on %s (%d bytes): %s", item.msg_id, item.subject, len(item.payload), exc)
            return True
        return True
