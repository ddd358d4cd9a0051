"""Counting and rate-limited logging of rejected messages."""

from __future__ import annotations

import logging
import time
from collections import Counter

from aether_protocol.messages import ProtocolError

log = logging.getLogger("aether.protocol")


class RejectCounter:
    """Counts rejections per reason and logs at most one line per reason per interval."""

    def __init__(self, what: str, log_interval_s: float = 10.0) -> None:
        self.what = what
        self.by_reason: Counter[str] = Counter()
        self._log_interval_s = log_interval_s
        self._last_log: dict[str, float] = {}

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def count(self, exc: ProtocolError, subject: str = "") -> None:
        self.by_reason[exc.reason] += 1
        now = time.monotonic()
        if now - self._last_log.get(exc.reason, -1e9) >= self._log_interval_s:
            self._last_log[exc.reason] = now
            log.warning(
                "rejected %s message on %r (%s; %d so far for this reason): %s",
                self.what,
                subject,
                exc.reason,
                self.by_reason[exc.reason],
                exc.detail[:200],
            )
