"""Job placement: score every candidate GPU with the XGBoost model and explain the choice.

``Scheduler.place`` is pure given its inputs (job, the fleet's GPUs as the
station sees them, the time); it never talks to agents. Candidates are the
*whole* fleet, busy GPUs and offline hosts' GPUs (state ``offline``, as last
reported) included, so the scheduler can tell "wait" (fits, but not now) from
"reject" (fits nowhere, ever).

Order of decisions:
1. reject what can never fit (too many GPUs for any host, more memory than any
   GPU has, a pinned host/GPU that does not exist or is lost); wait when only
   hosts that are offline now could take it;
2. defer a job with a deadline when the carbon forecast has a greener window;
3. hard feasibility now (state, free memory, free slot, pinned GPUs);
4. the model scores every candidate in one batched call per booster; a
   k-GPU job takes the best k GPUs of one host (its P(success) is the product,
   its slowdown the slowest GPU's, as synchronous training waits for it);
   among equal scores awake GPUs go before sleeping ones (a wake costs time and
   power), then the best fit;
5. place the best option if its P(success) reaches the target, otherwise
   wait while waiting can help (something is busy or hot), else place it anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from aether_desktop.services.carbon import CarbonForecaster, plan_deferral
from aether_desktop.services.jobtypes import Decision, GpuCandidate, JobRequest, ScoredCandidate
from aether_desktop.services.scheduler_model import SchedulerModel, features_and_hosts

GIB = 1024.0
DRIVER_MIB = 300.0  # memory the CUDA context takes on an otherwise idle GPU
_USABLE = ("ok", "sleeping")  # the dispatcher wakes a sleeping GPU before run_job
OFFLINE = "offline"  # the host stopped reporting; the GPU is shown as last reported


@dataclass(frozen=True)
class SchedulerConfig:
    min_p_success: float = 0.9  # below this a job waits if waiting can help
    max_jobs_per_gpu: int = 1  # 1 = exclusive GPUs; replay of shared traces passes its own mask
    keep_candidates: int = 8  # options kept in the decision record
    min_defer_s: float = 900.0  # a deferral shorter than this is not worth the operator's wait
    defer_min_saving_frac: float = 0.02
    gpu_power_frac: float = 0.7  # expected draw as a share of the power limit, for the carbon estimate


@dataclass(frozen=True)
class _Option:
    host: str
    gpus: tuple[int, ...]
    p: float
    slow: float
    left: int  # feasible GPUs the host would have left after this placement

    @property
    def score(self) -> float:
        # Expected useful throughput: success probability per unit of wall time.
        return self.p / self.slow


class Scheduler:
    def __init__(
        self,
        model: SchedulerModel,
        config: SchedulerConfig | None = None,
        carbon: CarbonForecaster | None = None,
    ) -> None:
        self.model = model
        self.config = config or SchedulerConfig()
        self.carbon = carbon

    def place(
        self,
        job: JobRequest,
        candidates: Sequence[GpuCandidate],
        now: float,
        *,
        available: Sequence[bool] | np.ndarray | None = None,
    ) -> Decision:
        """Decide for one job. ``available`` optionally masks GPUs the caller cannot use now (e.g. no share left)."""
        cfg = self.config
        version = self.model.version
        pinned = tuple(job.gpus) if job.gpus else None
        k = len(pinned) if pinned else job.num_gpus
        if pinned and job.num_gpus not in (1, len(pinned)):
            return self._reject(
                f"asked for {job.num_gpus} GPUs but pinned {len(pinned)} ({_gpus(pinned)})", version
            )
        if k < 1:
            return self._reject("a job needs at least one GPU", version)
        if not candidates:
            return Decision("wait", "no GPUs reported by any host yet", model_version=version)

        x, host_id, host_names = features_and_hosts(job, candidates)
        n = len(candidates)
        states = [c.state for c in candidates]
        index = np.array([c.index for c in candidates], dtype=np.int64)
        total, free, running = x[:, 7], x[:, 4], x[:, 12]
        per_host = np.bincount(host_id, minlength=len(host_names))
        need = float(job.mem_mib)

        # -- 1. never fits
        if not pinned and k > per_host.max():
            return self._reject(f"needs {k} GPUs on one host; the largest host has {per_host.max()}", version)
        if need > float(total.max()):
            big = int(np.argmax(total))
            return self._reject(
                f"needs {need / GIB:.1f} GiB per GPU; the largest GPU ({candidates[big].model}) "
                f"has {total[big] / GIB:.1f} GiB",
                version,
            )
        mask = np.ones(n, dtype=bool)
        if job.host is not None or pinned:
            why = self._pin_mask(job, pinned, candidates, host_names, host_id, index, total, mask)
            if why:
                return self._reject(why, version)
        offline = np.array([s == OFFLINE for s in states])
        lost = np.array([s == "lost" for s in states])
        big_enough = mask & (total >= need)
        if not _hosts_with(k, big_enough & ~offline & ~lost, host_id, host_names):
            away = _hosts_with(k, big_enough & offline, host_id, host_names)
            if away:
                # Not "never": a host that is down for a reboot comes back with its GPUs.
                return Decision("wait", _offline_reason(job, away), model_version=version)

        # -- 2. greener later?
        if job.deadline_ts is not None and self.carbon is not None:
            deferred = self._maybe_defer(job, k, candidates, now, version)
            if deferred is not None:
                return deferred

        # -- 3. feasible now
        usable = np.array([s in _USABLE for s in states])
        fits = free >= need
        slot = running < cfg.max_jobs_per_gpu
        feasible = mask & usable & fits & slot
        if available is not None:
            feasible &= np.asarray(available, dtype=bool)

        # -- 4. score everything in one batched call per booster
        p, slow = self.model.predict(x)
        asleep = np.array([s == "sleeping" for s in states])
        options = self._options(k, p, slow, feasible, host_id, host_names, index, asleep)
        if options and (pinned or options[0].p >= cfg.min_p_success):
            note = "; pinned by the operator despite the risk" if options[0].p < cfg.min_p_success else ""
            return self._place(options, n, note, version)
        if pinned:
            return Decision(
                "wait",
                self._why_none(job, k, pinned, feasible, mask & usable, fits, slot, host_id, host_names, n),
                model_version=version,
            )

        # -- 5. nothing good now. Would the same GPUs idle and cool do? If not, waiting cannot help.
        could = big_enough & ~lost & ~offline
        x_idle, cooling = _idealize(x, host_id, len(host_names))
        pi, si = self.model.predict(x_idle)
        ideal = self._options(k, pi, si, could, host_id, host_names, index, asleep)
        if not ideal:
            return Decision(
                "wait", "every GPU that could take this job is lost; waiting", model_version=version
            )
        best_idle = ideal[0]
        changing = bool((running[could] > 0).any() or (cooling[could] > 2.0).any())
        if best_idle.p < cfg.min_p_success or (options and not changing):
            p_best = max(best_idle.p, options[0].p if options else 0.0)
            return self._reject(
                f"likely to fail even on idle, cool GPUs: best {best_idle.host} {_gpus(best_idle.gpus)} "
                f"P(success)={p_best:.2f} < {cfg.min_p_success:.2f}{_risk(job, total)}; "
                f"pin the GPUs to run it anyway",
                version,
            )
        kept = tuple(
            ScoredCandidate(o.host, o.gpus, o.p, o.slow, o.score) for o in options[: cfg.keep_candidates]
        )
        if options:
            now_part = f"best option now {options[0].host} {_gpus(options[0].gpus)} has P(success)={options[0].p:.2f}"
        else:
            now_part = self._why_none(
                job, k, pinned, feasible, mask & usable, fits, slot, host_id, host_names, n
            )
        return Decision(
            "wait",
            f"{now_part}; once GPUs free up or cool down {best_idle.host} {_gpus(best_idle.gpus)} "
            f"would give {best_idle.p:.2f} (target {cfg.min_p_success:.2f}); waiting",
            p_success=options[0].p if options else None,
            expected_slowdown=options[0].slow if options else None,
            candidates=kept,
            model_version=version,
        )

    def _place(self, options: list[_Option], n: int, note: str, version: str) -> Decision:
        best = options[0]
        kept = tuple(
            ScoredCandidate(o.host, o.gpus, o.p, o.slow, o.score)
            for o in options[: self.config.keep_candidates]
        )
        alt = ""
        if len(options) > 1:
            alt = f"; best alternative {options[1].host} {_gpus(options[1].gpus)} ({options[1].p:.2f})"
        return Decision(
            "place",
            f"placed on {best.host} {_gpus(best.gpus)}: P(success)={best.p:.2f}, "
            f"expected slowdown {best.slow:.2f}×; {n} candidates scored{alt}{note}",
            host=best.host,
            gpus=best.gpus,
            p_success=best.p,
            expected_slowdown=best.slow,
            candidates=kept,
            model_version=version,
        )

    # ----------------------------------------------------------------- helpers
    def _options(
        self,
        k: int,
        p: np.ndarray,
        slow: np.ndarray,
        feasible: np.ndarray,
        host_id: np.ndarray,
        host_names: list[str],
        index: np.ndarray,
        asleep: np.ndarray,
    ) -> list[_Option]:
        """Ranked placements: single GPUs for k == 1, else the best k GPUs of each host that has k feasible.

        Scores within 0.02 count as equal; among equals, fewer sleeping GPUs
        first (waking one costs seconds and power), then best fit (fewest GPUs
        left on the host) keeps whole hosts free for the next multi-GPU job --
        without it, near-identical scores scatter small jobs over every host.
        """
        score = np.where(feasible, p / slow, -np.inf)
        n_ok = np.bincount(host_id, weights=feasible, minlength=len(host_names)).astype(np.int64)
        bucket_all = -np.round(score / 0.02)
        if k == 1:
            rows = np.nonzero(feasible)[0]
            top = rows[np.lexsort((n_ok[host_id[rows]], asleep[rows], bucket_all[rows]))]
            return [
                _Option(
                    host_names[host_id[r]],
                    (int(index[r]),),
                    float(p[r]),
                    float(slow[r]),
                    int(n_ok[host_id[r]]) - 1,
                )
                for r in top[: max(self.config.keep_candidates, 2)]
            ]
        # By host; within a host best first, an awake GPU before a sleeping one of equal score.
        order = np.lexsort((-score, asleep, bucket_all, host_id))
        hs = host_id[order]
        first = np.searchsorted(hs, hs, side="left")
        rank = np.arange(len(order)) - first
        take = order[(rank < k) & (n_ok[hs] >= k)]  # contiguous per host, k rows each
        if len(take) == 0:
            return []
        hosts = host_id[take[::k]]
        p_host = np.exp(np.log(np.maximum(p[take], 1e-12)).reshape(-1, k).sum(axis=1))
        slow_host = slow[take].reshape(-1, k).max(axis=1)
        left = n_ok[hosts] - k
        n_asleep = asleep[take].reshape(-1, k).sum(axis=1)
        bucket = -np.round(p_host / slow_host / 0.02)
        best = np.lexsort((left, n_asleep, bucket))[: max(self.config.keep_candidates, 2)]
        gpus = np.sort(index[take].reshape(-1, k), axis=1)
        return [
            _Option(
                host_names[hosts[i]],
                tuple(int(g) for g in gpus[i]),
                float(p_host[i]),
                float(slow_host[i]),
                int(left[i]),
            )
            for i in best
        ]

    def _pin_mask(
        self,
        job: JobRequest,
        pinned: tuple[int, ...] | None,
        candidates: Sequence[GpuCandidate],
        host_names: list[str],
        host_id: np.ndarray,
        index: np.ndarray,
        total: np.ndarray,
        mask: np.ndarray,
    ) -> str | None:
        """Restrict ``mask`` to the operator's pins; return a reason when the pin can never be honoured."""
        if pinned and job.host is None:
            return f"pinned {_gpus(pinned)} without a host; pick the host too"
        if job.host not in host_names:
            return f"pinned host {job.host} is not in the fleet"
        on_host = host_id == host_names.index(str(job.host))
        host_count = int(on_host.sum())
        if not pinned:
            if job.num_gpus > host_count:
                return f"pinned host {job.host} has {host_count} GPUs; the job needs {job.num_gpus}"
            mask &= on_host
            return None
        if len(set(pinned)) != len(pinned):
            return f"pinned GPU list {_gpus(pinned)} repeats a GPU"
        chosen = on_host & np.isin(index, pinned)
        missing = sorted(set(pinned) - set(index[chosen].tolist()))
        if missing:
            return f"{job.host} has no GPU {missing[0]} (it has {host_count})"
        for r in np.nonzero(chosen)[0].tolist():
            if candidates[r].state == "lost":
                return f"pinned {job.host} GPU {index[r]} is lost"
            if job.mem_mib > total[r]:
                return (
                    f"pinned {job.host} GPU {index[r]} has {total[r] / GIB:.1f} GiB; "
                    f"the job needs {job.mem_mib / GIB:.1f} GiB"
                )
        mask &= chosen
        return None

    def _maybe_defer(
        self, job: JobRequest, k: int, candidates: Sequence[GpuCandidate], now: float, version: str
    ) -> Decision | None:
        assert self.carbon is not None and job.deadline_ts is not None
        watts = self.config.gpu_power_frac * float(np.mean([c.power_limit_w for c in candidates])) * k
        energy_kwh = watts * job.expected_s / 3.6e6
        plan = plan_deferral(
            self.carbon,
            now,
            job.expected_s,
            job.deadline_ts,
            energy_kwh,
            min_saving_frac=self.config.defer_min_saving_frac,
        )
        if plan.not_before_ts - now < self.config.min_defer_s:
            return None
        when = datetime.fromtimestamp(plan.not_before_ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
        return Decision(
            "defer",
            f"deferred to {when}: forecast {plan.ci_planned:.0f} vs {plan.ci_now:.0f} gCO2/kWh now, "
            f"saving about {plan.expected_saving_g:.0f} gCO2 ({100 * plan.expected_saving_frac:.1f} %) "
            f"and still finishing before the deadline",
            not_before_ts=plan.not_before_ts,
            model_version=version,
        )

    def _why_none(
        self,
        job: JobRequest,
        k: int,
        pinned: tuple[int, ...] | None,
        feasible: np.ndarray,
        usable: np.ndarray,
        fits: np.ndarray,
        slot: np.ndarray,
        host_id: np.ndarray,
        host_names: list[str],
        n: int,
    ) -> str:
        """Say what is missing right now, in the operator's terms."""
        counts = np.bincount(host_id, weights=feasible, minlength=len(host_names))
        h = int(np.argmax(counts))
        mem = f" with {job.mem_mib / GIB:.1f} GiB free" if job.mem_mib > 0 else ""
        if pinned:
            return f"pinned {job.host} {_gpus(pinned)} not free{mem} yet"
        if not usable.any():
            return "every GPU is lost or unavailable; waiting for one to come back"
        lacking = []
        if not (usable & slot).all():
            lacking.append(f"{int((usable & ~slot).sum())} busy")
        if job.mem_mib > 0 and not (usable & fits).all():
            lacking.append(f"{int((usable & ~fits).sum())} short of memory")
        detail = f" ({', '.join(lacking)})" if lacking else ""
        return (
            f"no host has {k} GPU{'s' if k > 1 else ''} free{mem} right now; "
            f"best is {host_names[h]} with {int(counts[h])}; {n} GPUs checked{detail}"
        )

    @staticmethod
    def _reject(reason: str, version: str) -> Decision:
        return Decision("reject", f"rejected: {reason}", model_version=version)


def _idealize(x: np.ndarray, host_id: np.ndarray, n_hosts: int) -> tuple[np.ndarray, np.ndarray]:
    """The same feature rows as if every GPU were idle and cooled to its host's coolest; also how much each cools.

    Columns follow FEATURE_NAMES; this edits the matrix instead of rebuilding
    candidates so the check stays one vectorised pass.
    """
    xi = x.copy()
    temp = x[:, 0].astype(np.float64)
    host_min = np.full(n_hosts, np.inf)
    np.minimum.at(host_min, host_id, temp)
    t_idle = np.minimum(temp, host_min[host_id] + 3.0)
    slow_c = x[:, 1] + temp
    mean_idle = (
        np.bincount(host_id, weights=t_idle, minlength=n_hosts) / np.bincount(host_id, minlength=n_hosts)
    )[host_id]
    total, limit = x[:, 7].astype(np.float64), x[:, 11].astype(np.float64)
    power = limit - x[:, 9]
    headroom = limit - np.minimum(power, 0.2 * limit)
    free = total - DRIVER_MIB
    need = x[:, 5] * np.maximum(x[:, 4], 1.0)  # need / free was stored; recover the need
    xi[:, 0] = t_idle
    xi[:, 1] = slow_c - t_idle
    xi[:, 2] = t_idle - mean_idle
    xi[:, 3] = mean_idle
    xi[:, 4] = free
    xi[:, 5] = need / np.maximum(free, 1.0)
    xi[:, 8] = 0.0
    xi[:, 9] = headroom
    xi[:, 10] = headroom / np.maximum(limit, 1.0)
    xi[:, 12] = 0.0
    return xi, temp - t_idle


def _hosts_with(k: int, ok: np.ndarray, host_id: np.ndarray, host_names: list[str]) -> list[str]:
    """The hosts with at least ``k`` GPUs where ``ok`` holds."""
    counts = np.bincount(host_id, weights=ok, minlength=len(host_names))
    return [host_names[h] for h in np.nonzero(counts >= k)[0].tolist()]


def _offline_reason(job: JobRequest, away: list[str]) -> str:
    if job.host is not None:
        return f"pinned host {job.host} is offline; waiting for it to come back"
    names = ", ".join(away[:3]) + (f" and {len(away) - 3} more" if len(away) > 3 else "")
    if len(away) == 1:
        return f"only {names} could take this job and it is offline; waiting for it to come back"
    return f"only {names} could take this job and they are offline; waiting for one to come back"


def _risk(job: JobRequest, total: np.ndarray) -> str:
    if job.mem_mib <= 0:
        return ""
    frac = job.mem_mib / float(total.max())
    return (
        f" (needs {job.mem_mib / GIB:.1f} GiB, {100 * frac:.0f} % of the largest GPU)" if frac > 0.85 else ""
    )


def _gpus(gpus: Sequence[int]) -> str:
    return f"GPU {gpus[0]}" if len(gpus) == 1 else "GPUs " + ",".join(str(g) for g in gpus)
