"""Retraining the placement model from the fleet's own finished jobs, on request and automatically.

The dispatcher stores every placement's feature rows (``job_placements``); once jobs
end, :class:`PlacementRetrainer` turns them into examples (``job_placements.fleet_examples``),
trains a new version next to fresh simulated anchor data in a worker thread, saves it
in the model directory and hands it to ``on_model`` -- the live scheduler switches to
it without a restart.

Automatic retraining runs only when enough new jobs have ended since the current model
(``min_new_jobs``) and not more often than ``min_interval_s``: training takes a few
seconds of CPU that a busy desktop should not spend every minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import psycopg
import xgboost as xgb

from aether_desktop.services.job_placements import PlacementOutcome, PlacementRows, fleet_examples
from aether_desktop.services.jobtypes import GpuCandidate, JobRequest
from aether_desktop.services.scheduler_model import (
    FEATURE_NAMES,
    ModelStore,
    SchedulerModel,
    TrainingData,
    model_created_ts,
    model_summary,
    placement_features,
    retrain,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, str], None]  # level ("info" | "ok" | "error"), text


class RetrainBusy(Exception):
    """A retrain is already running; the message is for the operator."""


@dataclass(frozen=True)
class RetrainPolicy:
    min_new_jobs: int = 50
    min_interval_s: float = 3600.0
    check_interval_s: float = 60.0
    sim_jobs: int = 3000  # simulated anchor jobs: keep the model sane where the fleet has no data
    max_jobs: int = 20_000  # newest ended jobs read from the database
    fleet_weight: float = 3.0


def should_retrain(new_jobs: int, last_ts: float, now: float, policy: RetrainPolicy) -> bool:
    """The automatic trigger: enough new outcomes, and the last model (or try) old enough."""
    return new_jobs >= policy.min_new_jobs and now - last_ts >= policy.min_interval_s


def placement_rows(
    job: JobRequest, candidates: Sequence[GpuCandidate], host: str, gpus: Sequence[int]
) -> PlacementRows:
    """What the dispatcher stores with a placement (its ``placement_features`` hook)."""
    return PlacementRows(FEATURE_NAMES, placement_features(job, candidates, host, gpus).tolist())


class OutcomeSource(Protocol):
    """``job_placements.PlacementStore`` (or a fake in unit tests)."""

    async def outcomes(self, limit: int = 20_000) -> list[PlacementOutcome]: ...

    async def count_ended_since(self, since_ts: float) -> int: ...


class PlacementRetrainer:
    def __init__(
        self,
        source: OutcomeSource,
        store: ModelStore,
        model: SchedulerModel,
        *,
        on_model: Callable[[SchedulerModel], None],
        on_progress: Progress | None = None,
        policy: RetrainPolicy | None = None,
        enabled: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
        executor: Executor | None = None,
    ) -> None:
        """``enabled()`` gates the automatic retrain only (e.g. "this station dispatches");
        the operator's button always works."""
        self._source = source
        self._store = store
        self._model = model
        self._on_model = on_model
        self._on_progress = on_progress
        self.policy = policy or RetrainPolicy()
        self._enabled = enabled
        self._clock = clock
        self._executor = executor
        self._busy = False
        self._last_attempt = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def model(self) -> SchedulerModel:
        return self._model

    @property
    def busy(self) -> bool:
        return self._busy

    async def retrain(self, why: str = "requested by the operator") -> SchedulerModel:
        """Train, save and switch to a new version now; raises RetrainBusy if one is running.

        Database and training errors propagate (the caller reports them); the current
        model stays in use.
        """
        if self._busy:
            raise RetrainBusy("the placement model is already being retrained")
        self._busy = True
        self._last_attempt = self._clock()
        try:
            self._say("info", f"retraining the placement model ({why}): reading finished jobs…")
            ex = fleet_examples(await self._source.outcomes(self.policy.max_jobs), FEATURE_NAMES)
            self._say(
                "info",
                f"retraining the placement model on {len(ex):,} fleet rows from {ex.jobs:,} jobs "
                f"plus simulated anchor data…",
            )
            data = TrainingData(ex.x, ex.success, ex.slowdown)
            seed = (self._store.versions() or [0])[-1] + 1  # fresh simulated anchors each version
            job = functools.partial(
                retrain, self._store, data, seed=seed, sim_jobs=self.policy.sim_jobs,
                fleet_weight=self.policy.fleet_weight, fleet_jobs=ex.jobs,
            )  # fmt: skip
            # Seconds of CPU: in a worker thread so the window and the dispatcher keep running.
            model = await asyncio.get_running_loop().run_in_executor(self._executor, job)
        finally:
            self._busy = False
        self._model = model
        self._on_model(model)
        self._say("ok", model_summary(model.meta))
        return model

    async def maybe_retrain(self) -> SchedulerModel | None:
        """Retrain if the automatic trigger says so; None when it does not."""
        if self._busy or not self._enabled():
            return None
        created = model_created_ts(self._model.meta) or 0.0
        now = self._clock()
        if now - max(created, self._last_attempt) < self.policy.min_interval_s:
            return None  # checked first: it costs no query
        new = await self._source.count_ended_since(created)
        if not should_retrain(new, max(created, self._last_attempt), now, self.policy):
            return None
        return await self.retrain(f"automatic: {new} jobs ended since {self._model.version}")

    # ----------------------------------------------------------------- the automatic loop

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="placement-retrain")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the cancellation we asked for
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.check_interval_s)
            try:
                await self.maybe_retrain()
            except (psycopg.Error, OSError, ValueError, xgb.core.XGBoostError) as exc:
                # The database is away, the disk full, or the data unusable: say so, keep the
                # current model and try again after min_interval_s (the attempt counts).
                log.warning("automatic placement model retrain failed: %s", exc)
                self._say("error", f"automatic placement model retrain failed: {exc}")

    def _say(self, level: str, text: str) -> None:
        log.info("%s", text)
        if self._on_progress is not None:
            self._on_progress(level, text)
