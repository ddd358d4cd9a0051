"""Scheduler placement, reasons, rejection, deferral, and the model's training/storage (no Qt, no network)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aether_desktop.services.carbon import CarbonForecaster, CarbonSeries
from aether_desktop.services.jobtypes import GpuCandidate, JobRequest
from aether_desktop.services.scheduler import Scheduler, SchedulerConfig
from aether_desktop.services.scheduler_model import (
    FEATURE_NAMES,
    ModelStore,
    SchedulerModel,
    TrainingData,
    feature_matrix,
    load_or_bootstrap,
    placement_features,
    retrain,
)

GIB = 1024.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    load_or_bootstrap(d, seed=0, n_jobs=3000)
    return d


@pytest.fixture(scope="module")
def model(model_dir: Path) -> SchedulerModel:
    m = ModelStore(model_dir).load()
    assert m is not None
    return m


def gpu(host: str, index: int, **kw: Any) -> GpuCandidate:
    base = dict(
        host=host, index=index, model="A100-40GB", state="ok", temp_c=34.0, mem_used_mib=300.0,
        mem_total_mib=40536.0, util_pct=0.0, power_w=55.0, power_limit_w=400.0, running_jobs=0,
        slowdown_temp_c=88.0,
    )  # fmt: skip
    base.update(kw)
    return GpuCandidate(**base)  # type: ignore[arg-type]


def fleet(hosts: int = 2, per_host: int = 8) -> list[GpuCandidate]:
    return [gpu(f"gpu-node-{h + 1:02d}", i) for h in range(hosts) for i in range(per_host)]


def job(**kw: Any) -> JobRequest:
    return JobRequest(id=kw.pop("id", "j1"), argv=("python", "train.py"), **kw)


def test_places_one_gpu_job_with_a_reason(model: SchedulerModel) -> None:
    cands = fleet()
    cands[3] = replace(cands[3], temp_c=60.0)
    d = Scheduler(model).place(job(mem_mib=8000), cands, 0.0)
    assert d.action == "place" and d.host is not None and len(d.gpus) == 1
    assert d.reason.startswith(f"placed on {d.host} GPU {d.gpus[0]}: P(success)=")
    assert "16 candidates scored" in d.reason and "best alternative" in d.reason
    assert d.p_success is not None and d.p_success >= 0.9
    assert d.model_version == "v1" and d.candidates


def test_avoids_a_hot_gpu_and_a_crowded_one(model: SchedulerModel) -> None:
    cands = [
        gpu("a", 0, temp_c=93.0, util_pct=100.0, power_w=390.0, running_jobs=1, mem_used_mib=10_000.0),
        gpu("a", 1),
    ]
    d = Scheduler(model, SchedulerConfig(max_jobs_per_gpu=4)).place(job(mem_mib=20_000), cands, 0.0)
    assert d.action == "place" and d.gpus == (1,)


def test_scores_all_candidates_in_one_batched_call(model: SchedulerModel) -> None:
    calls: list[int] = []

    class Counting:
        def __init__(self, booster: Any) -> None:
            self.booster = booster

        def set_param(self, params: dict[str, Any]) -> None:
            self.booster.set_param(params)

        def inplace_predict(self, x: np.ndarray) -> np.ndarray:
            calls.append(len(x))
            return self.booster.inplace_predict(x)

    counted = SchedulerModel(Counting(model.clf), Counting(model.reg), model.meta)  # type: ignore[arg-type]
    d = Scheduler(counted).place(job(mem_mib=4000), fleet(hosts=4), 0.0)
    assert d.action == "place"
    assert calls == [32, 32]  # one call per booster, every GPU in it


def test_multi_gpu_job_stays_on_one_host(model: SchedulerModel) -> None:
    cands = fleet()
    for i in range(5):  # host 1 has only 3 free GPUs
        cands[i] = replace(cands[i], running_jobs=1, util_pct=95.0, mem_used_mib=30_000.0)
    d = Scheduler(model).place(job(num_gpus=4, mem_mib=16_000), cands, 0.0)
    assert d.action == "place" and d.host == "gpu-node-02" and len(set(d.gpus)) == 4
    assert "GPUs " in d.reason


def test_waits_when_nothing_fits_now(model: SchedulerModel) -> None:
    cands = [replace(c, running_jobs=1, util_pct=90.0, mem_used_mib=20_000.0) for c in fleet()]
    d = Scheduler(model).place(job(num_gpus=2, mem_mib=30_000), cands, 0.0)
    assert d.action == "wait"
    assert "no host has 2 GPUs free" in d.reason


@pytest.mark.parametrize(
    ("request_kw", "expected"),
    [
        ({"num_gpus": 16}, "needs 16 GPUs on one host; the largest host has 8"),
        ({"mem_mib": 90_000}, "largest GPU (A100-40GB) has 39.6 GiB"),
        ({"host": "nowhere"}, "pinned host nowhere is not in the fleet"),
        ({"host": "gpu-node-01", "gpus": (9,)}, "gpu-node-01 has no GPU 9"),
        ({"gpus": (1,)}, "without a host"),
        ({"host": "gpu-node-01", "gpus": (1, 2), "num_gpus": 4}, "asked for 4 GPUs but pinned 2"),
    ],
)
def test_rejects_what_can_never_fit(model: SchedulerModel, request_kw: dict[str, Any], expected: str) -> None:
    d = Scheduler(model).place(job(**request_kw), fleet(), 0.0)
    assert d.action == "reject"
    assert expected in d.reason


def test_rejects_pin_to_a_lost_gpu(model: SchedulerModel) -> None:
    cands = fleet()
    cands[2] = replace(cands[2], state="lost")
    d = Scheduler(model).place(job(host="gpu-node-01", gpus=(2,)), cands, 0.0)
    assert d.action == "reject" and "is lost" in d.reason


def test_honours_pinned_gpus(model: SchedulerModel) -> None:
    d = Scheduler(model).place(job(host="gpu-node-02", gpus=(6, 7), num_gpus=2, mem_mib=1000), fleet(), 0.0)
    assert d.action == "place" and d.host == "gpu-node-02" and d.gpus == (6, 7)


def test_pinned_but_busy_waits(model: SchedulerModel) -> None:
    cands = fleet()
    cands[1] = replace(cands[1], running_jobs=1)
    d = Scheduler(model).place(job(host="gpu-node-01", gpus=(1,)), cands, 0.0)
    assert d.action == "wait" and "pinned gpu-node-01 GPU 1" in d.reason


def test_rejects_a_job_that_would_fail_even_on_idle_gpus(model: SchedulerModel) -> None:
    d = Scheduler(model).place(job(mem_mib=40_400), fleet(), 0.0)  # 99.7 % of the GPU
    assert d.action == "reject" and "even on idle, cool GPUs" in d.reason and "pin the GPUs" in d.reason


def test_defers_a_deadline_job_to_a_greener_window(model: SchedulerModel) -> None:
    t0 = 1_577_836_800.0
    ts = t0 + np.arange(10 * 48) * 1800.0
    hour = (ts % 86_400) / 3600
    series = CarbonSeries(ts, np.where((hour >= 2) & (hour < 5), 100.0, 300.0), 1800.0)
    now = t0 + 8 * 86_400 + 20 * 3600
    sched = Scheduler(model, carbon=CarbonForecaster(series))
    d = sched.place(job(mem_mib=4000, expected_s=3600, deadline_ts=now + 12 * 3600), fleet(), now)
    assert d.action == "defer" and d.not_before_ts is not None and d.not_before_ts > now
    assert "gCO2" in d.reason and "deadline" in d.reason
    undeadlined = sched.place(job(mem_mib=4000, expected_s=3600), fleet(), now)
    assert undeadlined.action == "place"


def test_feature_matrix_has_the_declared_columns() -> None:
    x = feature_matrix(job(mem_mib=10_000), fleet(1, 4))
    assert x.shape == (4, len(FEATURE_NAMES)) and x.dtype == np.float32
    assert x[0, FEATURE_NAMES.index("free_mem_mib")] == pytest.approx(40_236.0)


def test_store_writes_versioned_ubj_with_a_sidecar(model_dir: Path, model: SchedulerModel) -> None:
    files = sorted(p.name for p in model_dir.iterdir())
    assert files == ["scheduler-v1.json", "scheduler-v1.slowdown.ubj", "scheduler-v1.ubj"]
    meta = json.loads((model_dir / "scheduler-v1.json").read_text())
    assert meta["version"] == 1 and meta["training_rows"] > 1000
    for key in ("auc", "accuracy", "slowdown_mae"):
        assert meta["validation"][key] is not None
    assert meta["validation"]["auc"] > 0.9
    x = feature_matrix(job(mem_mib=5000), fleet())
    again = ModelStore(model_dir).load(1)
    assert again is not None
    np.testing.assert_allclose(again.predict(x)[0], model.predict(x)[0])


def test_retrain_from_fleet_rows_saves_the_next_version(tmp_path: Path, model_dir: Path) -> None:
    store = ModelStore(tmp_path)
    for name in ("scheduler-v1.json", "scheduler-v1.ubj", "scheduler-v1.slowdown.ubj"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    cands = fleet()
    rows = np.vstack(
        [placement_features(job(mem_mib=m), cands, "gpu-node-01", [0]) for m in range(1000, 41000, 500)]
    )
    ok = (np.arange(len(rows)) % 5 != 0).astype(float)
    new = retrain(store, TrainingData(rows, ok, np.full(len(rows), 1.05)), seed=1, sim_jobs=1200)
    assert new.version == "v2" and new.meta["fleet_rows"] == len(rows)
    assert store.versions() == [1, 2]
    assert store.load() is not None and store.load().version == "v2"  # type: ignore[union-attr]


def test_damaged_model_is_skipped_for_an_older_one(tmp_path: Path, model_dir: Path) -> None:
    for name in ("scheduler-v1.json", "scheduler-v1.ubj", "scheduler-v1.slowdown.ubj"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "scheduler-v2.json").write_text(json.dumps({"feature_names": list(FEATURE_NAMES)}))
    (tmp_path / "scheduler-v2.ubj").write_bytes(b"not a model")
    loaded = ModelStore(tmp_path).load()
    assert loaded is not None and loaded.version == "v1"


def test_damaged_sidecar_that_is_not_an_object_is_skipped(tmp_path: Path, model_dir: Path) -> None:
    for name in ("scheduler-v1.json", "scheduler-v1.ubj", "scheduler-v1.slowdown.ubj"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "scheduler-v2.json").write_text("[]")
    (tmp_path / "scheduler-v2.ubj").write_bytes((model_dir / "scheduler-v1.ubj").read_bytes())
    loaded = ModelStore(tmp_path).load()
    assert loaded is not None and loaded.version == "v1"


def test_prefers_awake_gpus_to_sleeping_ones_of_equal_score(model: SchedulerModel) -> None:
    # Equal in every feature; only the state differs (a wake costs seconds and power).
    cands = [gpu("gpu-node-01", i, state="sleeping" if i % 2 == 0 else "ok") for i in range(4)]
    one = Scheduler(model).place(job(), cands, 0.0)
    assert (one.action, one.gpus) == ("place", (1,))
    two = Scheduler(model).place(job(num_gpus=2), cands, 0.0)
    assert (two.action, two.gpus) == ("place", (1, 3))
    # Between hosts too: a host that is awake before an equal one that sleeps.
    hosts = [gpu("gpu-node-01", i, state="sleeping") for i in range(2)] + [
        gpu("gpu-node-02", i) for i in range(2)
    ]
    assert Scheduler(model).place(job(num_gpus=2), hosts, 0.0).host == "gpu-node-02"
    # Still usable when nothing else is free: the dispatcher wakes them first.
    assert Scheduler(model).place(job(num_gpus=2), hosts[:2], 0.0).gpus == (0, 1)


def test_a_job_that_only_an_offline_host_can_take_waits(model: SchedulerModel) -> None:
    online = [gpu("gpu-node-01", i) for i in range(4)]
    offline = [gpu("gpu-node-02", i, state="offline") for i in range(8)]
    d = Scheduler(model).place(job(num_gpus=8), online + offline, 0.0)
    assert d.action == "wait"
    assert d.reason == "only gpu-node-02 could take this job and it is offline; waiting for it to come back"
    assert Scheduler(model).place(job(num_gpus=8), online, 0.0).action == "reject"
    # Offline GPUs are never placed on, however good they look.
    placed = Scheduler(model).place(job(), [replace(c, temp_c=70.0) for c in online] + offline, 0.0)
    assert placed.action == "place" and placed.host == "gpu-node-01"
    pinned = Scheduler(model).place(job(host="gpu-node-02", gpus=(3,)), online + offline, 0.0)
    assert pinned.reason == "pinned host gpu-node-02 is offline; waiting for it to come back"
