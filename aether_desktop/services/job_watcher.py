"""JobWatcher: PostgreSQL LISTEN on the jobs channel, so every station sees job changes without polling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "aether_jobs"


class JobWatcher:
    """Calls ``on_change(job_ids)`` when jobs change on any station (PostgreSQL LISTEN).

    After (re)connecting it calls ``on_change(frozenset())``, meaning "reload everything":
    notifications sent while it was disconnected are gone.
    """

    def __init__(
        self, dsn: str, on_change: Callable[[frozenset[str]], None], *, retry_s: float = 2.0
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="job-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the cancellation we asked for
                await self._task
            self._task = None

    async def _run(self) -> None:
        failing = False  # log once per outage, not every retry
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                    if failing:
                        log.info("job watcher reconnected to the database")
                    failing = False
                    self._on_change(frozenset())
                    async for note in conn.notifies():
                        self._on_change(frozenset({note.payload}))
            except psycopg.OperationalError as exc:
                if not failing:
                    log.warning("job watcher lost its database connection (%s); retrying every %.0fs",
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__, self._retry_s)
                failing = True
            await asyncio.sleep(self._retry_s)
