"""The anomaly model: IsolationForest over relational GPU features, hosted in the station.

* One forest per GPU model where there is enough data, plus a fallback forest
  for every other board. All forests are flattened into numpy arrays
  (``FlatForest``) so the whole fleet is scored in one vectorised call per
  tick (exactly sklearn's ``score_samples``, an order of magnitude faster on
  fleet-sized batches).
* The alarm threshold is chosen on held-out normal data for a target false
  alarm rate *after* the alert hysteresis, never from a contamination guess:
  contamination 5 % flags one sample in twenty by construction.
* Bootstrapped on first start from the simulated backend (a few seconds),
  retrained from the fleet's stored history in a worker thread, versioned,
  saved with skops (loaded with an explicit trusted-types list) plus a JSON
  sidecar carrying parameters, training window and validation figures
  (:mod:`aether_desktop.services.anomaly_store`, re-exported here).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from aether_desktop.services.anomaly_store import HISTORY_SQL as HISTORY_SQL
from aether_desktop.services.anomaly_store import TRUSTED_TYPES as TRUSTED_TYPES
from aether_desktop.services.anomaly_store import ModelStore as ModelStore
from aether_desktop.services.anomaly_store import default_model_dir as default_model_dir
from aether_desktop.services.anomaly_store import load_history_ticks as load_history_ticks
from aether_desktop.services.features import (
    FEATURE_GUARD,
    FEATURE_KIND,
    FEATURE_NAMES,
    N_FEATURES,
    FeatureExtractor,
    FeatureParams,
    GpuModelParams,
    fit_power_curve,
    fit_thermal,
)
from aether_protocol import Telemetry

log = logging.getLogger("aether.anomaly")
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Progress = Callable[[float, str], None]
DEFAULT_GROUP = "*"
HYST_K, HYST_N = 3, 5  # must match AlertPolicy's "model" detector (threshold is chosen for it)
MIN_ROWS_PER_GROUP = 20_000
RANGE_WEIGHT = 0.2  # score per e-fold of distance beyond the training range (in robust spreads)
SAMPLES_PER_WEEK = 7 * 24 * 3600
# Boards simulated for the first-start model (cycled over each host's GPUs), so
# every common model gets its own thermal and power parameters from day one.
BOOTSTRAP_MODELS = "H100,A100-80GB,L4,H200,A100-40GB,RTX4090,H100,A100-80GB"


def _noop(_f: float, _m: str) -> None:
    """Default progress sink."""


def _c(n: F64) -> F64:
    """Average path length of an unsuccessful BST search (sklearn's _average_path_length)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class FlatForest:
    """Several IsolationForests as padded node arrays, evaluated level by level for all rows at once."""

    def __init__(self, forests: Sequence[Any]) -> None:
        trees: list[tuple[I64, F64, I64, I64, F64]] = []
        self.group_slices: list[tuple[int, int]] = []
        self.norm: list[float] = []
        depth = 0
        for f in forests:
            start = len(trees)
            sub = f._max_features != f.n_features_in_  # noqa: SLF001 - mirrors sklearn's own check
            for est, feats in zip(f.estimators_, f.estimators_features_, strict=True):
                t = est.tree_
                feat = np.asarray(t.feature, dtype=np.int64)
                if sub:
                    feat = np.where(feat >= 0, np.asarray(feats)[np.maximum(feat, 0)], feat)
                leaf = t.children_left == -1
                ids = np.arange(t.node_count)
                left = np.where(leaf, ids, t.children_left).astype(np.int64)
                right = np.where(leaf, ids, t.children_right).astype(np.int64)
                node_depth = np.zeros(t.node_count)
                for i in range(t.node_count):  # parents come before children in sklearn trees
                    if not leaf[i]:
                        node_depth[left[i]] = node_depth[right[i]] = node_depth[i] + 1
                value = np.where(leaf, node_depth + _c(t.n_node_samples.astype(np.float64)), 0.0)
                trees.append((np.maximum(feat, 0), t.threshold.astype(np.float64), left, right, value))
                depth = max(depth, int(node_depth.max()))
            self.group_slices.append((start, len(trees)))
            self.norm.append(float(_c(np.array([float(f.max_samples_)]))[0]))
        # One global node numbering across all trees, so each level of the
        # descent is four flat ``take`` calls over (trees x rows) elements.
        offsets = np.cumsum([0] + [len(t[0]) for t in trees])
        self.feature = np.concatenate([t[0] for t in trees]).astype(np.intp)
        self.threshold = np.concatenate([t[1] for t in trees])
        # children[2*node] = left, children[2*node + 1] = right (leaves point at themselves)
        kids = np.stack([np.concatenate([t[2] + o for t, o in zip(trees, offsets, strict=False)]),
                         np.concatenate([t[3] + o for t, o in zip(trees, offsets, strict=False)])], axis=1)
        self.children = kids.ravel().astype(np.intp)
        self.value = np.concatenate([t[4] for t in trees])
        self.roots = offsets[:-1].astype(np.intp)
        self.depth = depth

    def score(self, x: F64, group: I64) -> F64:
        """Anomaly score in (0, 1) per row (= -sklearn score_samples); ``group`` picks the forest."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        n, nf = x.shape
        out = np.zeros(n)
        for g, (a, b) in enumerate(self.group_slices):
            rows = np.nonzero(group == g)[0]
            if len(rows) == 0:
                continue
            # Chunks keep the (trees x rows) working set in cache.
            for c0 in range(0, len(rows), 2048):
                r = rows[c0:c0 + 2048]
                flat_x = x[r].ravel()
                base = (np.arange(len(r), dtype=np.intp) * nf)[None, :]
                node = np.repeat(self.roots[a:b, None], len(r), axis=1)
                for _ in range(self.depth):
                    f = self.feature.take(node)
                    right = flat_x.take(base + f) > self.threshold.take(node)
                    node = self.children.take(2 * node + right)
                depth = self.value.take(node).mean(axis=0)
                out[r] = 2.0 ** (-depth / self.norm[g])
        return out


@dataclass
class AnomalyModel:
    """Forests per group (GPU model name or ``*``), their thresholds and the feature parameters."""

    forests: dict[str, Any]
    thresholds: dict[str, float]
    params: FeatureParams
    feature_median: F64
    feature_scale: F64
    feature_lo: F64
    feature_hi: F64
    side_scale: F64  # (2, F): spread below / above the median, for the range guard
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = list(self.forests)
        self._group_index = {g: i for i, g in enumerate(self.groups)}
        self._flat = FlatForest([self.forests[g] for g in self.groups])
        self._thr = np.array([self.thresholds[g] for g in self.groups])

    @property
    def version(self) -> str:
        return str(self.info.get("version", "unsaved"))

    def group_of(self, name: str) -> int:
        return self._group_index.get(name, self._group_index[DEFAULT_GROUP])

    def score(self, x: F64, group: I64) -> tuple[F64, F64]:
        """One batched call for the whole fleet: (scores, per-row thresholds)."""
        return self._flat.score(x, group) + self.range_excess(x), self._thr[group]

    def range_excess(self, x: F64) -> F64:
        return range_excess(x, self.side_scale, self.feature_lo, self.feature_hi)

    def explain(self, x: F64) -> I64:
        """Index of the feature that deviates most from normal, per row (what to tell the operator)."""
        # Only the suspicious side counts: a cool GPU is never "the thermal culprit".
        lo_side = np.array([g[0] for g in FEATURE_GUARD])
        hi_side = np.array([g[1] for g in FEATURE_GUARD])
        z_hi = np.where(hi_side, (x - self.feature_median) / self.side_scale[1], 0.0)
        z_lo = np.where(lo_side, (self.feature_median - x) / self.side_scale[0], 0.0)
        z = np.maximum(z_hi, z_lo)
        out: I64 = np.argmax(z, axis=1)
        return out


def range_excess(x: F64, scale: F64, lo: F64, hi: F64) -> F64:
    """Score added for values beyond the training range (on the suspicious side only).

    An isolation tree routes 50 MiB/s of memory growth exactly like the largest
    growth it saw in training (0.6 MiB/s): its score saturates at the edge of
    normal. This term keeps "far outside" above "at the edge". ``scale`` is
    (2, F): the robust spread below and above the median, in feature units.
    """
    lo_side = np.array([g[0] for g in FEATURE_GUARD])
    hi_side = np.array([g[1] for g in FEATURE_GUARD])
    over = np.where(hi_side, (x - hi) / scale[1], 0.0)
    under = np.where(lo_side, (lo - x) / scale[0], 0.0)
    worst = np.maximum(np.maximum(over, under).max(axis=1), 0.0)
    out: F64 = RANGE_WEIGHT * np.log1p(worst)
    return out


def feature_kind(index: int) -> str:
    return FEATURE_KIND[index]


# ---------------------------------------------------------------------- data: simulated and recorded


def simulated_messages(n_hosts: int, gpus_per_host: int, seconds: int, seed: int, model: str = "H100",
                       faults: Mapping[int, Sequence[str]] | None = None, start_ts: float = 1.7e9,
                       ) -> Iterable[list[Telemetry]]:
    """Telemetry from simulated hosts, one list of messages (one per host) per second."""
    from headless_agent.simulate import SimulatedBackend

    hosts = [SimulatedBackend(gpus_per_host, seed=seed, model=model, host=f"sim{seed}-{h}",
                              faults=(faults or {}).get(h, ()), start_ts=start_ts) for h in range(n_hosts)]
    for i in range(seconds):
        ts = start_ts + i
        yield [Telemetry(v=1, host=f"sim{seed}-{h}", boot="b", seq=i, ts=ts, state="active", gpus=b.read(ts))
               for h, b in enumerate(hosts)]


@dataclass
class _Collected:
    x: list[F64] = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)
    keys: list[list[tuple[str, int]]] = field(default_factory=list)


def extract(ticks: Iterable[Sequence[Telemetry]], params: FeatureParams,
            exclude: Callable[[str, int, float], bool] | None = None) -> tuple[F64, list[str], list[tuple[str, int]]]:
    """Run the station's feature extractor over recorded ticks; keep valid rows (in time order)."""
    fx = FeatureExtractor(params)
    col = _Collected()
    for msgs in ticks:
        rows = [(m.host, m.ts, g) for m in msgs for g in m.gpus if g.state == "ok"]
        if not rows:
            continue
        c = fx.columns(rows)
        f, valid = fx.update(c)
        if exclude is not None:
            valid &= np.array([not exclude(h, g.index, ts) for h, ts, g in rows])
        idx = np.nonzero(valid)[0]
        col.x.append(f[idx])
        col.names.append([rows[i][2].name for i in idx])
        col.keys.append([(rows[i][0], rows[i][2].index) for i in idx])
    if not col.x:
        return np.zeros((0, N_FEATURES)), [], []
    return (np.concatenate(col.x), [n for ns in col.names for n in ns], [k for ks in col.keys for k in ks])


def fit_params(ticks: Iterable[Sequence[Telemetry]], base: FeatureParams | None = None) -> FeatureParams:
    """Fit per-GPU-model thermal/power parameters from normal telemetry."""
    per_gpu: dict[tuple[str, int], list[tuple[float, float, float, float, float]]] = {}
    names: dict[tuple[str, int], str] = {}
    slowdown: dict[str, float] = {}
    for msgs in ticks:
        for m in msgs:
            for g in m.gpus:
                if g.state != "ok" or g.temp_c is None or g.power_w is None:
                    continue
                per_gpu.setdefault((m.host, g.index), []).append(
                    (m.ts, g.power_w, g.temp_c, g.util_pct or 0.0, g.sm_clock_mhz or 0.0))
                names[(m.host, g.index)] = g.name
                if g.slowdown_temp_c is not None:
                    slowdown[g.name] = g.slowdown_temp_c
    by_model = dict((base or FeatureParams()).by_model)
    for name in sorted(set(names.values())):
        arrs = [np.array(v) for k, v in per_gpu.items() if names[k] == name and len(v) >= 120]
        if not arrs:
            continue
        allv = np.concatenate(arrs)
        try:
            tau, amb, r = fit_thermal([(a[:, 0], a[:, 1], a[:, 2]) for a in arrs])
            curve = fit_power_curve(allv[:, 3], allv[:, 1])
        except ValueError as exc:
            # E.g. boards that idled the whole window: keep what we knew about them.
            log.info("keeping previous parameters for %s: %s", name, exc)
            continue
        slow = slowdown.get(name, by_model.get(name, GpuModelParams()).slowdown_c)
        by_model[name] = GpuModelParams(tau_s=tau, amb_c=amb, r_k_per_w=r, power_curve_w=curve,
                                        max_sm_mhz=float(allv[:, 4].max()), slowdown_c=slow)
    default = next(iter(by_model.values())) if by_model else GpuModelParams()
    return FeatureParams(by_model, default)


# ---------------------------------------------------------------------- training


def _kofn(scores: F64, keys: list[tuple[str, int]], k: int = HYST_K, n: int = HYST_N) -> F64:
    """Per row, the k-th largest score among that GPU's last n rows: an alarm fires iff it exceeds t."""
    out = np.empty(len(scores))
    karr = np.array([hash(kk) for kk in keys])
    for key in np.unique(karr):
        idx = np.nonzero(karr == key)[0]
        s = scores[idx]
        if len(s) < n:
            out[idx] = np.sort(s)[::-1][min(k, len(s)) - 1] if len(s) >= k else -np.inf
            continue
        win = np.lib.stride_tricks.sliding_window_view(np.concatenate([np.full(n - 1, -np.inf), s]), n)
        out[idx] = np.sort(win, axis=1)[:, n - k]
    return out


def choose_threshold(val_scores: F64, val_keys: list[tuple[str, int]], target_per_gpu_week: float,
                     margin: float) -> tuple[float, dict[str, float]]:
    """Lowest threshold whose alarm episodes on validation stay under the target, plus a safety margin.

    Validation is shorter than a week, so a rate near zero cannot be measured;
    the margin (in score units) covers the tail that validation did not see.
    """
    eff = _kofn(val_scores, val_keys)
    finite = eff[np.isfinite(eff)]
    gpu_weeks = max(len(val_scores) / SAMPLES_PER_WEEK, 1e-9)
    allowed = int(target_per_gpu_week * gpu_weeks)
    # Episodes are runs above t; the (allowed+1)-th largest run maximum sets t.
    top = float(np.sort(finite)[::-1][min(allowed, len(finite) - 1)]) if len(finite) else 0.5
    t = top + margin
    figures = {
        "val_gpu_hours": len(val_scores) / 3600.0,
        "val_max_effective_score": float(finite.max()) if len(finite) else 0.0,
        "val_sample_exceed_rate": float((val_scores > t).mean()) if len(val_scores) else 0.0,
        "threshold": t,
    }
    return t, figures


def train(train_ticks: Sequence[Sequence[Telemetry]], val_ticks: Sequence[Sequence[Telemetry]], *,
          params: FeatureParams | None = None, base: AnomalyModel | None = None, origin: str = "bootstrap",
          target_per_gpu_week: float = 0.5, margin: float = 0.04, n_estimators: int = 100, seed: int = 0,
          exclude: Callable[[str, int, float], bool] | None = None, progress: Progress = _noop) -> AnomalyModel:
    """Fit feature parameters and one forest per GPU model with enough data (else the fallback)."""
    from sklearn.ensemble import IsolationForest

    t0 = time.perf_counter()
    progress(0.05, "fitting thermal and power models")
    if params is None:
        params = fit_params(train_ticks, base.params if base else None)
    progress(0.25, "extracting training features")
    x, names, _ = extract(train_ticks, params, exclude)
    progress(0.5, "extracting validation features")
    xv, vnames, vkeys = extract(val_ticks, params, exclude)
    if len(x) < 1000:
        raise ValueError(f"only {len(x)} usable training samples; need at least 1000")
    name_arr, vname_arr = np.array(names), np.array(vnames)
    forests: dict[str, Any] = {}
    thresholds: dict[str, float] = {}
    groups_info: dict[str, Any] = {}
    med = np.median(x, axis=0)
    hi, lo = np.quantile(x, 0.999, axis=0), np.quantile(x, 0.001, axis=0)
    scale = np.maximum(np.maximum(hi - med, med - lo), 1e-3)
    # Range bounds at 1e-4 quantiles: one freak training row must not widen "normal".
    f_lo, f_hi = np.quantile(x, 1e-4, axis=0), np.quantile(x, 1 - 1e-4, axis=0)
    side = np.maximum(np.stack([med - lo, hi - med]), 1e-3)
    candidates = [n for n in sorted(set(names)) if (name_arr == n).sum() >= MIN_ROWS_PER_GROUP
                  and (vname_arr == n).sum() >= MIN_ROWS_PER_GROUP // 4]
    plan = [(DEFAULT_GROUP, np.ones(len(x), bool), np.ones(len(xv), bool))]
    plan += [(n, name_arr == n, vname_arr == n) for n in candidates if len(candidates) > 1]
    for i, (group, sel, vsel) in enumerate(plan):
        progress(0.55 + 0.4 * i / len(plan), f"training forest for {group}")
        forest = IsolationForest(n_estimators=n_estimators, max_samples=256, random_state=seed).fit(x[sel])
        forests[group] = forest
        vs = -forest.score_samples(xv[vsel]) + range_excess(xv[vsel], side, f_lo, f_hi) if vsel.any() else np.zeros(0)
        vk = [k for k, s in zip(vkeys, vsel, strict=True) if s]
        thresholds[group], fig = choose_threshold(vs, vk, target_per_gpu_week, margin)
        groups_info[group] = {"train_rows": int(sel.sum()), "val_rows": int(vsel.sum()), **fig}
    tr_ts = [m.ts for tick in train_ticks for m in tick]
    va_ts = [m.ts for tick in val_ticks for m in tick]
    info = {"origin": origin, "n_samples": int(len(x) + len(xv)),
            "train_from": min(tr_ts, default=None), "train_to": max(tr_ts, default=None),
            "val_from": min(va_ts, default=None), "val_to": max(va_ts, default=None),
            "features": list(FEATURE_NAMES), "groups": groups_info, "target_false_alerts_per_gpu_week":
            target_per_gpu_week, "hysteresis": [HYST_K, HYST_N], "train_seconds": time.perf_counter() - t0,
            "created": time.time()}
    progress(1.0, "done")
    return AnomalyModel(forests, thresholds, params, med, scale, f_lo, f_hi, side, info)


def bootstrap(seed: int = 0, progress: Progress = _noop, hosts: int = 4, gpus: int = 8,
              seconds: int = 2400, model: str = BOOTSTRAP_MODELS) -> AnomalyModel:
    """First start: train on simulated normal operation (a few seconds of CPU)."""
    progress(0.0, "simulating normal operation")
    tr = list(simulated_messages(hosts, gpus, seconds, seed=1000 + seed, model=model))
    va = list(simulated_messages(hosts, gpus, seconds, seed=2000 + seed, model=model, start_ts=1.71e9))
    return train(tr, va, origin="bootstrap", seed=seed, progress=progress)


def train_from_history(ticks: Sequence[Sequence[Telemetry]], base: AnomalyModel, *,
                       exclude: Callable[[str, int, float], bool] | None = None,
                       progress: Progress = _noop) -> AnomalyModel:
    """Retrain on stored history: the last quarter of the time window is held out for validation."""
    if len(ticks) < 3600:
        raise ValueError(f"history holds {len(ticks)} ticks; retraining needs at least an hour")
    cut = int(len(ticks) * 0.75)
    return train(ticks[:cut], ticks[cut:], base=base, origin="history", exclude=exclude, progress=progress)


# ---------------------------------------------------------------------- lifecycle (files and history: anomaly_store)


def ensure_model(store: ModelStore, progress: Progress = _noop) -> AnomalyModel:
    """The newest saved model, or (first start) a bootstrapped one, saved for next time."""
    model = store.load_latest()
    if model is not None:
        return model
    model = bootstrap(progress=progress)
    store.save(model)
    return model


async def retrain_async(ticks: Sequence[Sequence[Telemetry]], base: AnomalyModel, store: ModelStore,
                        progress: Progress = _noop,
                        exclude: Callable[[str, int, float], bool] | None = None) -> AnomalyModel:
    """Retrain in a worker thread (the event loop and the UI keep running); save and return the model.

    ``progress`` is called from the worker thread; a Qt receiver must queue it.
    """
    import asyncio

    def work() -> AnomalyModel:
        m = train_from_history(ticks, base, exclude=exclude, progress=progress)
        store.save(m)
        return m

    return await asyncio.get_running_loop().run_in_executor(None, work)


def describe(model: AnomalyModel) -> str:
    """One line for the UI: version, origin, window, validation figures."""
    info = model.info
    def day(ts: object) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(ts))) if isinstance(ts, int | float) else "?"
    g = info.get("groups", {}).get(DEFAULT_GROUP, {})
    return (f"anomaly model {model.version} ({info.get('origin', '?')}), trained on {day(info.get('train_from'))}"
            f" .. {day(info.get('train_to'))} UTC, {info.get('n_samples', 0):,} samples; validation: "
            f"{g.get('val_gpu_hours', 0):.0f} GPU-h, threshold {g.get('threshold', math.nan):.3f}, "
            f"sample exceedance {g.get('val_sample_exceed_rate', 0):.1e}")
