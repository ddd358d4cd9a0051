"""The scheduler's XGBoost models: features, training on simulated outcomes, retraining, storage.

Two boosters share one feature row per (job, candidate GPU):

* a classifier for P(the job completes on this GPU without OOM or thermal failure);
* a regressor for the slowdown the job would see there (wall time / work time).

Training data come from jobs that really run on the fleet simulator
(``fleetsim``) under a deliberately careless placement policy, so the data
contain memory overflows, hot boards and crowded GPUs. Retraining adds the
fleet's own finished jobs (feature rows recorded at placement plus outcomes).

Files are versioned in one directory: ``scheduler-vN.ubj`` (classifier),
``scheduler-vN.slowdown.ubj`` (regressor) and ``scheduler-vN.json`` (sidecar
with validation figures). Only XGBoost's own UBJSON format is read; nothing is
ever unpickled.
"""

from __future__ import annotations

import calendar
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from aether_desktop.services.fleetsim import GPU_MODELS, FleetSim, HostSpec, SimJob, SimOutcome
from aether_desktop.services.jobtypes import GpuCandidate, JobKind, JobRequest

log = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = (
    "temp_c",
    "thermal_headroom_c",
    "temp_vs_host_c",
    "host_mean_temp_c",
    "free_mem_mib",
    "mem_need_ratio",
    "mem_need_frac",
    "mem_total_mib",
    "util_pct",
    "power_headroom_w",
    "power_headroom_frac",
    "power_limit_w",
    "running_jobs",
    "gpu_model",
    "job_kind",
    "log_expected_s",
    "num_gpus",
)
# Physics the model must respect even where data are thin: hotter, fuller and
# more crowded never makes success likelier or the job faster.
_MONO_P = {"temp_c": -1, "thermal_headroom_c": 1, "mem_need_ratio": -1, "running_jobs": -1}
_MONO_SLOW = {"temp_c": 1, "thermal_headroom_c": -1, "running_jobs": 1, "util_pct": 1}
_FAMILIES = ("t4", "v100", "a10", "l4", "a100", "l40", "h100", "h200", "b200")
DEFAULT_SLOWDOWN_C = 87.0  # when the hardware does not report its slowdown temperature
FILE_RE = re.compile(r"^scheduler-v(\d+)\.json$")


def model_ordinal(name: str) -> float:
    """GPU family as an ordinal (roughly by generation); unknown models become NaN, which XGBoost handles."""
    low = name.lower()
    best = -1
    for i, fam in enumerate(_FAMILIES):
        if fam in low:
            best = i  # later families win: "a100" also contains "a10"
    return float("nan") if best < 0 else float(best)


def feature_matrix(job: JobRequest, candidates: Sequence[GpuCandidate]) -> np.ndarray:
    """One float32 row per candidate, columns as FEATURE_NAMES. Vectorised over the candidates."""
    return features_and_hosts(job, candidates)[0]


def features_and_hosts(
    job: JobRequest, candidates: Sequence[GpuCandidate]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Feature rows, each candidate's host number, and the host names in first-seen order."""
    n = len(candidates)
    if n == 0:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32), np.zeros(0, dtype=np.int64), []
    raw = np.array(
        [
            (
                c.temp_c,
                c.slowdown_temp_c if c.slowdown_temp_c is not None else DEFAULT_SLOWDOWN_C,
                c.mem_used_mib,
                c.mem_total_mib,
                c.util_pct,
                c.power_w,
                c.power_limit_w,
                c.running_jobs,
            )
            for c in candidates
        ],
        dtype=np.float64,
    )
    temp, slow_c, used, total, util, power, limit, jobs = raw.T
    hosts: dict[str, int] = {}
    host_id = np.array([hosts.setdefault(c.host, len(hosts)) for c in candidates], dtype=np.int64)
    host_mean = (np.bincount(host_id, weights=temp) / np.bincount(host_id))[host_id]
    ords = {m: model_ordinal(m) for m in {c.model for c in candidates}}
    ordinal = np.array([ords[c.model] for c in candidates])
    free = np.maximum(total - used, 0.0)
    need = float(job.mem_mib)
    x = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
    x[:, 0] = temp
    x[:, 1] = slow_c - temp
    x[:, 2] = temp - host_mean
    x[:, 3] = host_mean
    x[:, 4] = free
    x[:, 5] = need / np.maximum(free, 1.0)
    x[:, 6] = need / np.maximum(total, 1.0)
    x[:, 7] = total
    x[:, 8] = util
    x[:, 9] = limit - power
    x[:, 10] = (limit - power) / np.maximum(limit, 1.0)
    x[:, 11] = limit
    x[:, 12] = jobs
    x[:, 13] = ordinal
    x[:, 14] = 0.0 if job.kind == "training" else 1.0
    x[:, 15] = np.log(max(job.expected_s, 1.0))
    x[:, 16] = job.num_gpus
    return x, host_id, list(hosts)


@dataclass
class TrainingData:
    x: np.ndarray  # (n, len(FEATURE_NAMES)) float32
    success: np.ndarray  # (n,) 0/1
    slowdown: np.ndarray  # (n,) wall/work; meaningful where success == 1
    weight: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.success)

    @staticmethod
    def concat(parts: Sequence[TrainingData]) -> TrainingData:
        return TrainingData(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.success for p in parts]),
            np.concatenate([p.slowdown for p in parts]),
            np.concatenate([p.weight if p.weight is not None else np.ones(len(p)) for p in parts]),
        )


# --------------------------------------------------------------- simulation data
def _random_fleet(rng: np.random.Generator) -> list[HostSpec]:
    names = list(GPU_MODELS)
    hosts = []
    for i in range(int(rng.integers(4, 9))):
        hosts.append(HostSpec(f"sim-{i:02d}", names[int(rng.integers(len(names)))], int(rng.choice([4, 8]))))
    return hosts


def generate_training_data(n_jobs: int = 5000, seed: int = 0, fleets: int = 4) -> TrainingData:
    """Run ``n_jobs`` jobs on simulated fleets under a careless placement policy; one row per job GPU.

    Jobs arrive faster than the fleet drains them and are placed at random on
    GPUs with a free share -- half of them ignoring memory -- so OOMs, hot
    boards and crowding all occur. A multi-GPU job that fails labels only the
    GPU that caused it; its other GPUs' rows are dropped (their outcome is unknown).
    """
    rng = np.random.default_rng(seed)
    out = _Rows()
    per_fleet = max(1, n_jobs // fleets)
    for f in range(fleets):
        _simulate_fleet(rng, f"f{f}", per_fleet, out)
    return TrainingData(np.array(out.rows, dtype=np.float32), np.array(out.ok), np.array(out.slow))


@dataclass
class _Rows:
    rows: list[np.ndarray] = field(default_factory=list)
    ok: list[float] = field(default_factory=list)
    slow: list[float] = field(default_factory=list)
    pending: dict[str, np.ndarray] = field(default_factory=dict)

    def collect(self, outs: Sequence[SimOutcome]) -> None:
        for o in outs:
            feats = self.pending.pop(o.job_id)
            for i, gpu in enumerate(o.gpus):
                if o.outcome == "ok" or gpu == o.cause_gpu:
                    self.rows.append(feats[i])
                    self.ok.append(1.0 if o.outcome == "ok" else 0.0)
                    self.slow.append(o.gpu_slowdown[i])


def _simulate_fleet(rng: np.random.Generator, tag: str, n_jobs: int, out: _Rows) -> None:
    hosts = _random_fleet(rng)
    sim = FleetSim(hosts, seed=int(rng.integers(1 << 31)), bad_gpu_fraction=0.12)
    n_gpus = sum(h.n_gpus for h in hosts)
    mean_gpus, mean_dur = 1.9, 1100.0
    gap = mean_dur * mean_gpus / (n_gpus * 1.4)  # offered load 1.4: the fleet is always crowded
    t = 0.0
    for j in range(n_jobs):
        t += float(rng.exponential(gap))
        out.collect(sim.advance(t))
        req, job = _random_job(rng, f"{tag}-j{j}")
        placed = _careless_place(rng, sim, req, job)
        if placed is None:
            continue
        host, gpus = placed
        x = feature_matrix(req, sim.candidates())
        out.pending[job.job_id] = x[[sim.gpu_index(host, g) for g in gpus]]
        immediate = sim.start(job, host, gpus)
        if immediate is not None:
            out.collect([immediate])
    out.collect(sim.advance(t + 50_000.0))


def _random_job(rng: np.random.Generator, job_id: str) -> tuple[JobRequest, SimJob]:
    kind: JobKind = "training" if rng.random() < 0.7 else "inference"
    num = int(rng.choice([1, 2, 4, 8], p=[0.6, 0.15, 0.15, 0.1]))
    work = float(np.clip(rng.lognormal(np.log(700.0), 0.9), 60.0, 7200.0))
    declared = float(rng.uniform(0.03, 1.0) * 81920.0)
    true_mem = declared * float(rng.uniform(0.9, 1.08))
    share = 1.0 if rng.random() < 0.75 else float(rng.choice([0.25, 0.5]))
    intensity = float(rng.uniform(0.8, 1.0) if kind == "training" else rng.uniform(0.35, 0.7))
    req = JobRequest(id=job_id, argv=("sim",), num_gpus=num, mem_mib=declared, kind=kind, expected_s=work)
    return req, SimJob(job_id, true_mem, work, share, intensity, kind)


def _careless_place(
    rng: np.random.Generator, sim: FleetSim, req: JobRequest, job: SimJob
) -> tuple[int, list[int]] | None:
    room = sim.free_share() >= job.share - 1e-9
    if rng.random() < 0.5:  # half the time mind the memory the operator declared
        room &= sim.mem_cap - sim.mem_used() >= req.mem_mib
    for h in rng.permutation(len(sim.hosts)):
        first = int(sim.first_gpu[h])
        ok = np.nonzero(room[first : first + sim.hosts[h].n_gpus])[0]
        if len(ok) >= req.num_gpus:
            return int(h), sorted(rng.choice(ok, size=req.num_gpus, replace=False).tolist())
    return None


# -------------------------------------------------------------------- the model
class SchedulerModel:
    """The two boosters plus their provenance; ``predict`` is two batched ``inplace_predict`` calls."""

    def __init__(self, clf: xgb.Booster, reg: xgb.Booster, meta: dict[str, Any]) -> None:
        self.clf = clf
        self.reg = reg
        self.meta = meta
        # One thread: for a batch of a few thousand rows, starting and joining
        # threads costs more than it saves and adds tail latency on a busy desktop.
        for booster in (clf, reg):
            booster.set_param({"nthread": 1})

    @property
    def version(self) -> str:
        return f"v{self.meta['version']}" if self.meta.get("version") else "unsaved"

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(success) and expected slowdown for every row, one call per booster."""
        if len(x) == 0:
            return np.zeros(0), np.zeros(0)
        p = np.asarray(self.clf.inplace_predict(x), dtype=np.float64)
        s = np.asarray(self.reg.inplace_predict(x), dtype=np.float64)
        return p, np.maximum(s, 1.0)


def _params(objective: str, mono: dict[str, int], seed: int) -> dict[str, Any]:
    return {
        "objective": objective,
        "tree_method": "hist",
        # Small trees: placement must score 1,000 GPUs in well under 5 ms; deeper
        # or more trees bought no validation AUC on simulated data.
        "max_depth": 5,
        "eta": 0.15,
        "subsample": 0.9,
        "min_child_weight": 2.0,
        "monotone_constraints": "(" + ",".join(str(mono.get(n, 0)) for n in FEATURE_NAMES) + ")",
        "seed": seed,
        "nthread": 2,
    }


def train(data: TrainingData, seed: int = 0, rounds: int = 80, note: str = "simulation") -> SchedulerModel:
    """Fit both boosters on 80 % of ``data`` and record validation figures on the other 20 %."""
    from sklearn.metrics import roc_auc_score  # station-only dependency, needed only while training

    if len(data) < 50 or data.success.min() == data.success.max():
        raise ValueError(f"need at least 50 rows with both outcomes to train (got {len(data)})")
    rng = np.random.default_rng(seed)
    weight = data.weight if data.weight is not None else np.ones(len(data))
    val = rng.random(len(data)) < 0.2
    tr = ~val
    t0 = time.perf_counter()
    dtr = xgb.DMatrix(
        data.x[tr], label=data.success[tr], weight=weight[tr], feature_names=list(FEATURE_NAMES)
    )
    clf = xgb.train(_params("binary:logistic", _MONO_P, seed), dtr, num_boost_round=rounds)
    good = tr & (data.success == 1)
    dreg = xgb.DMatrix(
        data.x[good], label=data.slowdown[good], weight=weight[good], feature_names=list(FEATURE_NAMES)
    )
    reg = xgb.train(_params("reg:squarederror", _MONO_SLOW, seed), dreg, num_boost_round=rounds // 2)
    model = SchedulerModel(clf, reg, {})
    p, s = model.predict(data.x[val])
    y = data.success[val]
    good_val = y == 1
    model.meta = {
        "version": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_ts": time.time(),
        "source": note,
        "training_rows": int(tr.sum()),
        "validation_rows": int(val.sum()),
        "train_seconds": round(time.perf_counter() - t0, 3),
        "feature_names": list(FEATURE_NAMES),
        "xgboost": xgb.__version__,
        "validation": {
            "auc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None,
            "accuracy": float(((p >= 0.5) == (y == 1)).mean()),
            "failure_rate": float(1.0 - y.mean()),
            "slowdown_mae": float(np.abs(s[good_val] - data.slowdown[val][good_val]).mean())
            if good_val.any()
            else None,
        },
    }
    return model


# ------------------------------------------------------------------- storage
class ModelStore:
    """Versioned model files in one directory (normally the user data dir)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def versions(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (FILE_RE.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, model: SchedulerModel) -> SchedulerModel:
        """Write the next version; returns the model with its version set."""
        self.directory.mkdir(parents=True, exist_ok=True)
        version = (self.versions() or [0])[-1] + 1
        base = self.directory / f"scheduler-v{version}"
        model.clf.save_model(f"{base}.ubj")
        model.reg.save_model(f"{base}.slowdown.ubj")
        model.meta = {
            **model.meta,
            "version": version,
            "files": [f"{base.name}.ubj", f"{base.name}.slowdown.ubj"],
        }
        # The sidecar is written last: a version exists only once it is complete.
        tmp = base.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(model.meta, indent=2))
        tmp.replace(f"{base}.json")
        return model

    def load(self, version: int | None = None) -> SchedulerModel | None:
        """The given (or newest usable) version; a damaged or incompatible version is skipped with a log line."""
        for v in [version] if version is not None else reversed(self.versions()):
            base = self.directory / f"scheduler-v{v}"
            try:
                meta = json.loads(Path(f"{base}.json").read_text())
                if not isinstance(meta, dict):
                    raise ValueError(f"the sidecar holds a JSON {type(meta).__name__}, not an object")
                if tuple(meta.get("feature_names", ())) != FEATURE_NAMES:
                    log.warning("scheduler model v%s has other features; skipped", v)
                    continue
                clf, reg = xgb.Booster(), xgb.Booster()
                clf.load_model(f"{base}.ubj")
                reg.load_model(f"{base}.slowdown.ubj")
            except (OSError, ValueError, xgb.core.XGBoostError) as exc:
                log.warning("scheduler model v%s unusable: %s", v, exc)
                continue
            return SchedulerModel(clf, reg, meta)
        return None


def default_model_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("aether", appauthor=False)) / "models"


def load_or_bootstrap(directory: Path | None = None, seed: int = 0, n_jobs: int = 5000) -> SchedulerModel:
    """Newest saved model, or (first start) train one on simulated outcomes in a few seconds and save it."""
    store = ModelStore(directory or default_model_dir())
    model = store.load()
    if model is not None:
        return model
    log.info("no scheduler model in %s; training one on simulated jobs", store.directory)
    return store.save(train(generate_training_data(n_jobs=n_jobs, seed=seed), seed=seed))


def retrain(
    store: ModelStore,
    fleet: TrainingData,
    *,
    seed: int = 0,
    sim_jobs: int = 3000,
    fleet_weight: float = 3.0,
    fleet_jobs: int | None = None,
) -> SchedulerModel:
    """Retrain from the fleet's own finished jobs, anchored by fresh simulated data, and save a new version.

    The simulated rows keep the model sane in states the fleet has not visited
    yet; the fleet's rows count ``fleet_weight`` times as much because they are real.
    """
    if len(fleet) and fleet.x.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"fleet rows have {fleet.x.shape[1]} columns, expected {len(FEATURE_NAMES)}")
    sim = generate_training_data(n_jobs=sim_jobs, seed=seed)
    own = TrainingData(fleet.x, fleet.success, fleet.slowdown, np.full(len(fleet), fleet_weight))
    model = train(TrainingData.concat([sim, own]), seed=seed, note=f"simulation + {len(fleet)} fleet rows")
    model.meta["fleet_rows"] = len(fleet)
    if fleet_jobs is not None:
        model.meta["fleet_jobs"] = fleet_jobs
    if len(fleet):
        # In-sample, so only a sanity check: how well the new model explains the fleet's own outcomes.
        p, _ = model.predict(fleet.x)
        model.meta["fleet_fit"] = {
            "accuracy": float(((p >= 0.5) == (fleet.success == 1)).mean()),
            "failure_rate": float(1.0 - fleet.success.mean()),
        }
    return store.save(model)


def placement_features(
    job: JobRequest, candidates: Sequence[GpuCandidate], host: str, gpus: Sequence[int]
) -> np.ndarray:
    """The feature rows of a placement, to store with the job and feed ``retrain`` once it ends."""
    x = feature_matrix(job, candidates)
    pick = {(host, g) for g in gpus}
    rows = [i for i, c in enumerate(candidates) if (c.host, c.index) in pick]
    return x[rows]


def model_created_ts(meta: dict[str, Any]) -> float | None:
    """When a model was trained (epoch seconds); older sidecars only have the ISO date."""
    ts = meta.get("created_ts")
    if isinstance(ts, int | float):
        return float(ts)
    created = meta.get("created")
    if isinstance(created, str):
        try:
            return float(calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")))
        except ValueError:
            return None
    return None


def model_summary(meta: dict[str, Any]) -> str:
    """The model's version and validation figures in one line, for the Jobs tab and the log."""
    val = meta.get("validation") or {}
    version = f"v{meta['version']}" if meta.get("version") else "unsaved"

    def fig(key: str, fmt: str, scale: float = 1.0) -> str:
        v = val.get(key)
        return format(v * scale, fmt) if isinstance(v, int | float) else "n/a"

    fleet = int(meta.get("fleet_rows") or 0)
    jobs = meta.get("fleet_jobs")
    from_fleet = (
        f"{fleet:,} from {jobs:,} fleet jobs" if isinstance(jobs, int) else f"{fleet:,} from the fleet"
    )
    rows = int(meta.get("training_rows") or 0) + int(meta.get("validation_rows") or 0)
    return (
        f"Placement model {version}, trained {str(meta.get('created', '?')).replace('T', ' ')}: "
        f"AUC {fig('auc', '.3f')}, accuracy {fig('accuracy', '.1f', 100.0)} %, "
        f"slowdown MAE {fig('slowdown_mae', '.3f')}; {rows:,} rows ({from_fleet}), "
        f"validated on {int(meta.get('validation_rows') or 0):,}"
    )
