"""Grid carbon intensity: load a series, forecast it, and decide whether a job should wait.

Forecast: the mean daily profile of the last ``history_days`` days (seasonal
naive over several days, which averages out one odd day), shifted by the
current deviation from that profile. Half of the deviation decays with the
horizon (passing weather), half persists (a windy spell lasts for days); the
profile supplies the daily rhythm that persistence misses. The two constants
(half, 12 h) were picked as round values on the 2020 GB/DE backtest, so the
figures ``forecast_mae`` reports on these files are in-sample for them.

Deferral: a job with a deadline may start in the forecast's greenest window
that still ends before the deadline (with a safety margin on its duration).
No interruption: a job runs in one piece, as in Wiesner et al. (Middleware 2021).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

DAY_S = 86_400.0


class CarbonDataError(ValueError):
    """A carbon-intensity file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class CarbonSeries:
    """Intensity in gCO2/kWh on a regular grid (``step_s``), times in UTC epoch seconds."""

    ts: np.ndarray
    ci: np.ndarray
    step_s: float
    name: str = ""

    def index_at(self, ts: float) -> int:
        """The last grid point at or before ``ts`` (clamped to the series)."""
        return int(np.clip(np.floor((ts - self.ts[0]) / self.step_s), 0, len(self.ts) - 1))

    def mean_between(self, t0: float, t1: float) -> float:
        """Time-weighted mean intensity over [t0, t1] (linear interpolation)."""
        if t1 <= t0:
            return float(np.interp(t0, self.ts, self.ci))
        grid = np.linspace(t0, t1, max(2, int((t1 - t0) / (self.step_s / 4)) + 2))
        return float(np.interp(grid, self.ts, self.ci).mean())


def load_carbon_csv(path: str | Path, name: str | None = None) -> CarbonSeries:
    """Read ``Time,Carbon Intensity`` (UTC) and resample it to its median step.

    The GB file mixes 30- and 15-minute rows; a regular grid keeps the
    forecast a matter of array shifts.
    """
    p = Path(path)
    try:
        with p.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise CarbonDataError(f"cannot read carbon file {p}: {exc.strerror or exc}") from exc
    if not rows or [c.strip() for c in rows[0][:2]] != ["Time", "Carbon Intensity"]:
        raise CarbonDataError(f"{p}: header must be 'Time,Carbon Intensity'")
    ts: list[float] = []
    ci: list[float] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            t = datetime.strptime(row[0].strip(), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
            v = float(row[1])
        except (ValueError, IndexError) as exc:
            raise CarbonDataError(
                f"{p} line {line}: expected 'YYYY-MM-DD HH:MM:SS,<number>' ({exc})"
            ) from exc
        if not math.isfinite(v) or v < 0:
            raise CarbonDataError(f"{p} line {line}: intensity {row[1]!r} is not a non-negative number")
        ts.append(t)
        ci.append(v)
    if len(ts) < 2:
        raise CarbonDataError(f"{p}: needs at least two rows")
    t_arr, c_arr = np.array(ts), np.array(ci)
    order = np.argsort(t_arr, kind="stable")
    t_arr, c_arr = t_arr[order], c_arr[order]
    step = float(np.median(np.diff(t_arr)))
    if step <= 0:
        raise CarbonDataError(f"{p}: timestamps do not advance")
    grid = np.arange(t_arr[0], t_arr[-1] + step / 2, step)
    return CarbonSeries(grid, np.interp(grid, t_arr, c_arr), step, name or p.stem)


class CarbonForecaster:
    """Forecast from the data known at ``now`` only (the series may extend beyond it, as in backtests)."""

    def __init__(
        self,
        series: CarbonSeries,
        history_days: int = 7,
        level_tau_s: float = 12 * 3600.0,
        persistent_share: float = 0.5,
    ) -> None:
        self.series = series
        self.history_days = history_days
        self.level_tau_s = level_tau_s
        self.persistent_share = persistent_share
        self.day_steps = int(round(DAY_S / series.step_s))

    def forecast(self, now_ts: float, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Grid times from the last point at or before now up to now + horizon, and forecast intensity."""
        s = self.series
        i = s.index_at(now_ts)
        h = np.arange(0, int(math.ceil(horizon_s / s.step_s)) + 1)
        days = [k for k in range(1, self.history_days + 1) if i - k * self.day_steps >= 0]
        if not days:  # under a day of history: persistence is all we can do
            return s.ts[i] + h * s.step_s, np.full(len(h), s.ci[i])
        # Profile at (now + h) uses the same time of day on past days; for
        # h beyond one day the index wraps onto the profile of the days before.
        hh = h % self.day_steps
        profile = np.mean([s.ci[np.clip(i + hh - k * self.day_steps, 0, i)] for k in days], axis=0)
        base_now = np.mean([s.ci[i - k * self.day_steps] for k in days])
        offset = s.ci[i] - base_now
        w = self.persistent_share
        decay = w + (1.0 - w) * np.exp(-h * s.step_s / self.level_tau_s)
        return s.ts[i] + h * s.step_s, profile + offset * decay

    def persistence(self, now_ts: float, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
        s = self.series
        i = s.index_at(now_ts)
        h = np.arange(0, int(math.ceil(horizon_s / s.step_s)) + 1)
        return s.ts[i] + h * s.step_s, np.full(len(h), s.ci[i])


@dataclass(frozen=True)
class DeferralPlan:
    not_before_ts: float  # equal to now when the job should just run
    expected_saving_g: float  # forecast gCO2 saved versus starting now
    expected_saving_frac: float
    ci_now: float  # forecast mean intensity over the job if started now
    ci_planned: float  # ... if started at not_before_ts

    @property
    def deferred(self) -> bool:
        return self.expected_saving_g > 0


def plan_deferral(
    forecaster: CarbonForecaster,
    now_ts: float,
    duration_s: float,
    deadline_ts: float | None,
    energy_kwh: float,
    *,
    duration_margin: float = 1.15,
    min_saving_frac: float = 0.02,
) -> DeferralPlan:
    """Greenest start in [now, deadline - margin x duration] by forecast mean intensity over the job.

    Waits only for a saving of at least ``min_saving_frac``: a marginal gain
    is within forecast error and costs the operator time.
    """
    _ts, now_fc = forecaster.forecast(now_ts, duration_s)
    run_now = _window_mean(now_fc, duration_s, forecaster.series.step_s, 0)
    none = DeferralPlan(now_ts, 0.0, 0.0, run_now, run_now)
    if deadline_ts is None:
        return none
    latest = deadline_ts - duration_s * duration_margin
    if latest <= now_ts:
        return none
    ts, fc = forecaster.forecast(now_ts, latest - now_ts + duration_s)
    step = forecaster.series.step_s
    n_win = max(1, int(round(duration_s / step)))
    csum = np.concatenate([[0.0], np.cumsum(fc)])
    starts = np.arange(0, len(fc) - n_win + 1)
    starts = starts[ts[starts] <= latest]
    if len(starts) == 0:
        return none
    means = (csum[starts + n_win] - csum[starts]) / n_win
    means[0] = run_now  # start "now" means now, not the grid point before it
    best = int(np.argmin(means))
    saving_frac = (run_now - means[best]) / run_now if run_now > 0 else 0.0
    if best == 0 or saving_frac < min_saving_frac:
        return none
    return DeferralPlan(
        not_before_ts=max(now_ts, float(ts[starts[best]])),
        expected_saving_g=energy_kwh * (run_now - float(means[best])),
        expected_saving_frac=float(saving_frac),
        ci_now=run_now,
        ci_planned=float(means[best]),
    )


def _window_mean(fc: np.ndarray, duration_s: float, step_s: float, start: int) -> float:
    n = max(1, int(round(duration_s / step_s)))
    return float(fc[start : start + n].mean())


def forecast_mae(
    forecaster: CarbonForecaster, horizons_h: tuple[float, ...] = (1, 3, 6, 12, 24), warmup_days: int = 8
) -> dict[str, dict[str, float]]:
    """Backtest over the whole series: MAE of the forecast and of persistence at each horizon (gCO2/kWh)."""
    s = forecaster.series
    first = s.ts[0] + warmup_days * DAY_S
    max_h = max(horizons_h) * 3600.0
    origins = np.arange(first, s.ts[-1] - max_h, 3 * 3600.0)  # every 3 h: plenty, and fast
    steps = [int(round(h * 3600.0 / s.step_s)) for h in horizons_h]
    err_f = np.zeros((len(origins), len(steps)))
    err_p = np.zeros_like(err_f)
    for r, t in enumerate(origins):
        i = s.index_at(t)
        _ts, fc = forecaster.forecast(t, max_h)
        for c, k in enumerate(steps):
            actual = s.ci[i + k]
            err_f[r, c] = abs(fc[k] - actual)
            err_p[r, c] = abs(s.ci[i] - actual)
    return {
        f"{h:g}h": {"forecast": float(err_f[:, c].mean()), "persistence": float(err_p[:, c].mean())}
        for c, h in enumerate(horizons_h)
    }
