"""Carbon series loading, forecast against persistence, and the deferral decision (pure, no Qt, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aether_desktop.services.carbon import (
    CarbonDataError,
    CarbonForecaster,
    CarbonSeries,
    forecast_mae,
    load_carbon_csv,
    plan_deferral,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "carbon"
T0 = 1_577_836_800.0  # 2020-01-01 00:00 UTC


def _daily_series(days: int = 10, step_s: float = 1800.0) -> CarbonSeries:
    """Low at night (02:00-05:00 UTC), high otherwise: an obvious greener window."""
    ts = T0 + np.arange(int(days * 86_400 / step_s)) * step_s
    hour = (ts % 86_400) / 3600
    ci = np.where((hour >= 2) & (hour < 5), 100.0, 300.0)
    return CarbonSeries(ts, ci, step_s, "synthetic")


def test_loads_real_gb_series_on_a_regular_grid() -> None:
    s = load_carbon_csv(DATA / "gb_2020_ci.csv")
    assert s.step_s == 1800.0
    assert np.all(np.diff(s.ts) == 1800.0)
    assert s.ci.min() > 60 and s.ci.max() < 400
    assert 200 < s.ci.mean() < 240  # data/README.md: mean 218


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("When,CI\n2020-01-01 00:00:00,1\n", "header"),
        ("Time,Carbon Intensity\n2020-01-01 00:00:00,abc\n2020-01-01 00:30:00,1\n", "line 2"),
        ("Time,Carbon Intensity\n2020-01-01,5\n", "line 2"),
        ("Time,Carbon Intensity\n2020-01-01 00:00:00,-5\n2020-01-01 00:30:00,1\n", "non-negative"),
        ("Time,Carbon Intensity\n2020-01-01 00:00:00,5\n", "two rows"),
    ],
)
def test_bad_carbon_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "ci.csv"
    p.write_text(text)
    with pytest.raises(CarbonDataError, match=message):
        load_carbon_csv(p)


def test_missing_file_is_a_carbon_error(tmp_path: Path) -> None:
    with pytest.raises(CarbonDataError, match="cannot read"):
        load_carbon_csv(tmp_path / "absent.csv")


def test_forecast_never_looks_at_the_future() -> None:
    s = _daily_series()
    now = T0 + 8 * 86_400 + 3600
    _, before = CarbonForecaster(s).forecast(now, 12 * 3600)
    future = s.ci.copy()
    future[s.index_at(now) + 1 :] = 999.0
    _, after = CarbonForecaster(CarbonSeries(s.ts, future, s.step_s)).forecast(now, 12 * 3600)
    np.testing.assert_array_equal(before, after)


def test_forecast_learns_a_daily_profile() -> None:
    s = _daily_series()
    now = T0 + 8 * 86_400  # midnight: the dip is 2-5 h ahead
    ts, fc = CarbonForecaster(s).forecast(now, 24 * 3600)
    hour = (ts % 86_400) / 3600
    assert fc[(hour >= 2.5) & (hour < 4.5)].max() < 150 < 250 < fc[(hour >= 6) & (hour < 23)].min()


def test_forecast_beats_persistence_on_real_gb_data() -> None:
    maes = forecast_mae(CarbonForecaster(load_carbon_csv(DATA / "gb_2020_ci.csv")), horizons_h=(3, 12))
    for h in ("3h", "12h"):
        assert maes[h]["forecast"] < maes[h]["persistence"]


def test_deferral_picks_the_green_window_that_still_meets_the_deadline() -> None:
    fc = CarbonForecaster(_daily_series())
    now = T0 + 8 * 86_400 + 20 * 3600  # 20:00; the dip is 02:00-05:00 tomorrow
    plan = plan_deferral(fc, now, 3600.0, now + 12 * 3600, energy_kwh=2.0)
    assert plan.deferred
    start_hour = (plan.not_before_ts % 86_400) / 3600
    assert 2.0 <= start_hour <= 4.0
    assert plan.not_before_ts + 3600 * 1.15 <= now + 12 * 3600
    assert plan.expected_saving_g == pytest.approx(2.0 * (plan.ci_now - plan.ci_planned))
    assert plan.expected_saving_frac > 0.5


def test_no_deferral_without_deadline_or_room() -> None:
    fc = CarbonForecaster(_daily_series())
    now = T0 + 8 * 86_400 + 20 * 3600
    assert plan_deferral(fc, now, 3600.0, None, 1.0).not_before_ts == now
    tight = plan_deferral(fc, now, 3600.0, now + 3 * 3600, 1.0)  # dip starts 6 h away
    assert not tight.deferred and tight.not_before_ts == now
