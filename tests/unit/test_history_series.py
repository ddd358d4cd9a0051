"""The shaping of history series for plots: bucket envelopes and outage gaps (pure numpy)."""

from __future__ import annotations

import numpy as np

from aether_desktop.services.history_sql import break_gaps, envelope

NAN = float("nan")


def test_envelope_min_then_max_per_bucket_one_point_where_they_agree() -> None:
    ts = np.array([10.0, 20.0, 30.0, 40.0])
    lo = np.array([1.0, 5.0, NAN, 7.0])
    hi = np.array([3.0, 5.0, NAN, 9.0])
    t, v = envelope(ts, lo, hi)
    assert t.tolist() == [10.0, 10.0, 20.0, 30.0, 40.0, 40.0]
    assert v[:3].tolist() == [1.0, 3.0, 5.0] and np.isnan(v[3]) and v[4:].tolist() == [7.0, 9.0]
    t, v = envelope(np.empty(0), np.empty(0), np.empty(0))
    assert len(t) == len(v) == 0


def test_gaps_break_outages_not_sparse_sampling() -> None:
    # Buckets of 1 s, an agent sampling every 5 s: sparse, not down.
    ts = np.arange(0.0, 100.0, 5.0)
    vals = np.ones((len(ts), 2))
    t, v = break_gaps(ts, vals, 1.0)
    assert len(t) == len(ts) and not np.isnan(v).any()
    # The same agent silent for a minute: one NaN row in the middle of the gap.
    ts2 = np.concatenate([ts, ts + 160.0])
    t, v = break_gaps(ts2, np.ones((len(ts2), 2)), 1.0)
    assert len(t) == len(ts2) + 1 and np.isnan(v[20]).all() and t[20] == (95.0 + 160.0) / 2
    assert np.all(np.diff(t) > 0)
    # One-minute buckets: a missing minute is drawn through, three are a gap.
    minutes = np.array([0.0, 60.0, 120.0, 240.0, 300.0, 360.0, 600.0, 660.0])
    t, v = break_gaps(minutes, np.ones(len(minutes)), 60.0)
    assert np.isnan(v).sum() == 1 and t[np.isnan(v)][0] == 480.0
    assert break_gaps(np.array([1.0]), np.ones(1), 1.0)[0].tolist() == [1.0]
