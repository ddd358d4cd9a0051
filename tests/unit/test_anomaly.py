"""Anomaly model: flattened forest == sklearn, validation threshold, skops storage, detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.ensemble import IsolationForest

from aether_desktop.services.anomaly import (
    AnomalyModel,
    FlatForest,
    ModelStore,
    bootstrap,
    choose_threshold,
    describe,
    ensure_model,
    extract,
    simulated_messages,
)


@pytest.fixture(scope="module")
def small_model() -> AnomalyModel:
    return bootstrap(seed=3, hosts=1, gpus=4, seconds=900, model="H100")


def test_flat_forest_matches_sklearn_score_samples() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 5))
    forests = [IsolationForest(n_estimators=30, random_state=1).fit(x),
               IsolationForest(n_estimators=20, max_features=0.6, random_state=2).fit(x * 2)]
    flat = FlatForest(forests)
    q = rng.normal(size=(500, 5)) * 1.5
    group = np.arange(500) % 2
    got = flat.score(q, group)
    for g, f in enumerate(forests):
        np.testing.assert_allclose(got[group == g], -f.score_samples(q[group == g]), rtol=1e-12)


def test_threshold_is_set_by_hysteresis_episodes_not_contamination() -> None:
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.3, 0.5, size=10_000)
    scores[5000] = 0.9  # one isolated spike: k-of-n never fires on it
    keys = [("h", 0)] * 10_000
    t, fig = choose_threshold(scores, keys, target_per_gpu_week=0.5, margin=0.01)
    assert 0.5 < t < 0.52
    assert fig["val_sample_exceed_rate"] < 1e-3  # contamination 5 % would flag 500 of these


def test_bootstrap_model_is_quiet_on_normal_data_and_flags_a_leak(small_model: AnomalyModel) -> None:
    normal = list(simulated_messages(1, 4, 600, seed=11))
    x, names, _ = extract(normal, small_model.params)
    s, thr = small_model.score(x, np.array([small_model.group_of(n) for n in names]))
    assert (s > thr).mean() < 0.01
    leak = list(simulated_messages(1, 4, 400, seed=12, faults={0: ["memory_leak:gpu=1,at=200"]}))
    x, names, keys = extract(leak, small_model.params)
    s, thr = small_model.score(x, np.zeros(len(x), dtype=np.int64))
    late = np.array([k == ("sim12-0", 1) for k in keys]) & (np.arange(len(x)) > len(x) * 0.75)
    assert (s[late] > thr[late]).mean() > 0.9
    culprit = small_model.explain(x[late])
    assert {int(c) for c in culprit} <= {4, 5}  # mem_growth / unattributed_growth


def test_save_and_load_with_skops_and_sidecar(tmp_path: Path, small_model: AnomalyModel) -> None:
    store = ModelStore(tmp_path)
    v1 = store.save(small_model)
    v2 = store.save(small_model)
    assert (v1, v2) == ("v1", "v2") and store.versions() == [1, 2]
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == "v2"
    x = np.random.default_rng(0).normal(size=(100, len(small_model.feature_median)))
    g = np.zeros(100, dtype=np.int64)
    np.testing.assert_allclose(loaded.score(x, g)[0], small_model.score(x, g)[0])
    assert "validation" in describe(loaded)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pickle"))


def test_a_file_with_untrusted_types_is_refused(tmp_path: Path, small_model: AnomalyModel) -> None:
    store = ModelStore(tmp_path)
    store.save(small_model)
    # v2: a skops file carrying a type outside Aether's trusted list.
    store.save(small_model)
    sio.dump({"*": np.float64, "x": Path("/tmp")}, tmp_path / "anomaly-v2.skops")
    with pytest.raises(ValueError, match="does not trust"):
        store.load(2)
    assert store.load_latest().version == "v1"  # type: ignore[union-attr]


def test_corrupt_newest_falls_back_and_ensure_model_bootstraps_only_once(tmp_path: Path,
                                                                         small_model: AnomalyModel) -> None:
    store = ModelStore(tmp_path)
    store.save(small_model)
    store.save(small_model)
    (tmp_path / "anomaly-v2.skops").write_bytes(b"not a zip")
    assert store.load_latest().version == "v1"  # type: ignore[union-attr]
    assert ensure_model(store).version == "v1"
