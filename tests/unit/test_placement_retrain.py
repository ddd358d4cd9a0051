"""Fleet outcomes as training data, the retrain trigger, and the retrainer switching models (no Qt, no network)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from aether_desktop.services.job_placements import (
    PlacementOutcome,
    failure_cause,
    fleet_examples,
    outcome_examples,
)
from aether_desktop.services.jobtypes import GpuCandidate, JobRequest
from aether_desktop.services.placement_retrain import (
    PlacementRetrainer,
    RetrainBusy,
    RetrainPolicy,
    placement_rows,
    should_retrain,
)
from aether_desktop.services.scheduler_model import (
    FEATURE_NAMES,
    ModelStore,
    SchedulerModel,
    generate_training_data,
    model_created_ts,
    model_summary,
    train,
)

NAMES = tuple(FEATURE_NAMES)
T0 = 1_764_000_000.0


def outcome(
    state: str, reason: str | None = None, gpus: tuple[int, ...] = (0,), **kw: object
) -> PlacementOutcome:
    feats = np.arange(len(gpus) * len(NAMES), dtype=np.float64).reshape(len(gpus), len(NAMES))
    base: dict[str, object] = {
        "job_id": "j", "state": state, "reason": reason, "gpus": gpus, "names": NAMES, "features": feats,
        "started_ts": T0, "ended_ts": T0 + 120.0, "expected_s": 100.0, "expected_slowdown": 1.1,
    }  # fmt: skip
    return PlacementOutcome(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("CUDA out of memory: tried to allocate 900 MiB on GPU 1 (81920 MiB total capacity)", "oom"),
        ("thermal: GPU 0 held at or above 87 C (slowdown) for 60 s", "thermal"),
        ("exit code 1", None),
        ("GPU 2 lost: Xid 79 (GPU has fallen off the bus)", None),
        (None, None),
    ],
)
def test_failure_cause(reason: str | None, cause: str | None) -> None:
    assert failure_cause(reason) == cause


def test_finished_job_is_success_with_its_slowdown() -> None:
    got = outcome_examples(outcome("finished", gpus=(2, 5)))
    assert got is not None
    x, ok, slow = got
    assert x.shape == (2, len(NAMES)) and x.dtype == np.float32
    assert ok.tolist() == [1.0, 1.0] and slow.tolist() == pytest.approx(
        [1.2, 1.2]
    )  # 120 s wall / 100 s expected


def test_slowdown_is_clipped_and_falls_back_to_the_estimate() -> None:
    fast = outcome_examples(outcome("finished", ended_ts=T0 + 10.0))
    guess = outcome_examples(outcome("finished", ended_ts=T0 + 10_000.0))
    unknown = outcome_examples(outcome("finished", started_ts=None))
    assert fast is not None and guess is not None and unknown is not None
    assert fast[2][0] == 1.0 and guess[2][0] == 10.0 and unknown[2][0] == pytest.approx(1.1)


def test_oom_on_a_named_gpu_labels_only_that_gpu() -> None:
    got = outcome_examples(
        outcome("failed", "CUDA out of memory: tried to allocate 1 MiB on GPU 5", gpus=(2, 5))
    )
    assert got is not None
    x, ok, _ = got
    assert ok.tolist() == [0.0] and x[0, 0] == len(NAMES)  # the second row: GPU 5's


def test_failures_that_say_nothing_about_placement_are_left_out() -> None:
    assert outcome_examples(outcome("failed", "exit code 2")) is None
    assert outcome_examples(outcome("lost", "host gone")) is None
    ex = fleet_examples(
        [outcome("finished"), outcome("failed", "thermal: GPU 0 too hot"), outcome("failed", "exit code 1"),
         outcome("finished", names=("other",) * len(NAMES))],
        NAMES,
    )  # fmt: skip
    assert (len(ex), ex.jobs, ex.skipped) == (2, 2, 2)
    assert ex.success.tolist() == [1.0, 0.0]
    empty = fleet_examples([], NAMES)
    assert len(empty) == 0 and empty.x.shape == (0, len(NAMES))


def test_should_retrain_needs_enough_jobs_and_an_hour() -> None:
    policy = RetrainPolicy(min_new_jobs=50, min_interval_s=3600)
    assert should_retrain(50, T0, T0 + 3600, policy)
    assert not should_retrain(49, T0, T0 + 9999, policy)
    assert not should_retrain(500, T0, T0 + 3599, policy)


def test_placement_rows_match_the_schedulers_features() -> None:
    cands = [GpuCandidate("h", i, "H100", "ok", 40.0 + i, 0.0, 81559.0, 0.0, 80.0, 700.0) for i in range(3)]
    rows = placement_rows(JobRequest(id="j", argv=("x",), mem_mib=1000.0), cands, "h", (2,))
    assert rows.names == NAMES and len(rows.rows) == 1 and rows.rows[0][0] == 42.0


def test_model_summary_shows_version_and_validation_figures() -> None:
    meta = {
        "version": 3, "created": "2026-11-27T10:00:00Z", "training_rows": 4000, "validation_rows": 1000,
        "fleet_rows": 120, "fleet_jobs": 80, "validation": {"auc": 0.9812, "accuracy": 0.954, "slowdown_mae": 0.031},
    }  # fmt: skip
    text = model_summary(meta)
    for part in ("v3", "2026-11-27 10:00:00Z", "AUC 0.981", "accuracy 95.4 %", "slowdown MAE 0.031",
                 "5,000 rows (120 from 80 fleet jobs)", "validated on 1,000"):  # fmt: skip
        assert part in text, part
    assert model_created_ts(meta) == pytest.approx(1_795_773_600.0)
    assert model_created_ts({"created_ts": 5.0}) == 5.0 and model_created_ts({}) is None
    assert "AUC n/a" in model_summary({"validation": {"auc": None}})


# --------------------------------------------------------------------------- the retrainer


class FakeOutcomes:
    def __init__(self, outcomes: list[PlacementOutcome]) -> None:
        self.items = outcomes
        self.counts: list[float] = []
        self.gate: asyncio.Event | None = None

    async def outcomes(self, limit: int = 20_000) -> list[PlacementOutcome]:
        if self.gate is not None:
            await self.gate.wait()
        return self.items[:limit]

    async def count_ended_since(self, since_ts: float) -> int:
        self.counts.append(since_ts)
        return len(self.items)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SchedulerModel]:
    d = tmp_path_factory.mktemp("base")
    model = ModelStore(d).save(train(generate_training_data(n_jobs=400, seed=0, fleets=1), rounds=10))
    return d, model


def fresh_store(tmp_path: Path, base: tuple[Path, SchedulerModel]) -> tuple[ModelStore, SchedulerModel]:
    for p in base[0].iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    store = ModelStore(tmp_path)
    model = store.load()
    assert model is not None
    return store, model


def fleet_outcomes(n: int) -> list[PlacementOutcome]:
    cands = [GpuCandidate("h", i, "H100", "ok", 40.0, 0.0, 81559.0, 0.0, 80.0, 700.0) for i in range(2)]
    out = []
    for i in range(n):
        rows = placement_rows(JobRequest(id=f"j{i}", argv=("x",), mem_mib=1000.0 * i), cands, "h", (i % 2,))
        out.append(outcome("finished" if i % 4 else "failed", None if i % 4 else "CUDA out of memory",
                           gpus=(i % 2,), features=np.array(rows.rows)))  # fmt: skip
    return out


async def test_retrain_saves_a_version_and_switches_the_live_model(
    tmp_path: Path, base_model: tuple[Path, SchedulerModel]
) -> None:
    store, model = fresh_store(tmp_path, base_model)
    live: list[SchedulerModel] = []
    progress: list[tuple[str, str]] = []
    r = PlacementRetrainer(
        FakeOutcomes(fleet_outcomes(40)), store, model, on_model=live.append,
        on_progress=lambda level, text: progress.append((level, text)), policy=RetrainPolicy(sim_jobs=400),
    )  # fmt: skip
    new = await r.retrain()
    assert new.version == "v2" and live == [new] and r.model is new and store.versions() == [1, 2]
    meta = json.loads((tmp_path / "scheduler-v2.json").read_text())
    assert meta["fleet_rows"] == 40 and meta["fleet_jobs"] == 40 and meta["validation"]["auc"] is not None
    assert [level for level, _ in progress] == ["info", "info", "ok"]
    assert "40 fleet rows from 40 jobs" in progress[1][1] and progress[2][1].startswith("Placement model v2")


async def test_a_second_retrain_while_one_runs_is_refused(
    tmp_path: Path, base_model: tuple[Path, SchedulerModel]
) -> None:
    store, model = fresh_store(tmp_path, base_model)
    source = FakeOutcomes(fleet_outcomes(10))
    source.gate = asyncio.Event()
    r = PlacementRetrainer(source, store, model, on_model=lambda m: None, policy=RetrainPolicy(sim_jobs=400))
    first = asyncio.create_task(r.retrain())
    await asyncio.sleep(0)
    assert r.busy
    with pytest.raises(RetrainBusy):
        await r.retrain()
    source.gate.set()
    assert (await first).version == "v2" and not r.busy


async def test_automatic_retrain_waits_for_enough_jobs_and_an_hour(
    tmp_path: Path, base_model: tuple[Path, SchedulerModel]
) -> None:
    store, model = fresh_store(tmp_path, base_model)
    created = model_created_ts(model.meta)
    assert created is not None
    now = [created + 60.0]
    enabled = [True]
    source = FakeOutcomes(fleet_outcomes(5))
    policy = RetrainPolicy(min_new_jobs=8, min_interval_s=3600, sim_jobs=400)
    r = PlacementRetrainer(source, store, model, on_model=lambda m: None, policy=policy,
                           enabled=lambda: enabled[0], clock=lambda: now[0])  # fmt: skip
    assert await r.maybe_retrain() is None and source.counts == []  # too soon: not even a query
    now[0] = created + 3601.0
    assert await r.maybe_retrain() is None and source.counts == [created]  # too few jobs
    source.items = fleet_outcomes(8)
    enabled[0] = False  # e.g. another station dispatches
    assert await r.maybe_retrain() is None
    enabled[0] = True
    new = await r.maybe_retrain()
    assert new is not None and new.version == "v2"
    # The new model is the reference now: nothing more until another hour has passed.
    assert await r.maybe_retrain() is None
