"""Relational features on synthetic GPU sample sequences (no simulator needed, no Qt)."""

from __future__ import annotations

import math

import msgspec
import numpy as np

from aether_desktop.services.features import (
    FEATURE_NAMES,
    MIN_SEEN,
    PROCS_UNKNOWN,
    FeatureExtractor,
    FeatureParams,
    GpuModelParams,
    fit_power_curve,
    fit_thermal,
)
from aether_protocol import GpuSample, Process

NAME = "Test GPU"
F = {n: i for i, n in enumerate(FEATURE_NAMES)}
PARAMS = FeatureParams({NAME: GpuModelParams(tau_s=40.0, amb_c=30.0, r_k_per_w=0.06,
                                             power_curve_w=tuple(70.0 + 6.3 * 5 * i for i in range(21)),
                                             max_sm_mhz=1980.0, slowdown_c=87.0)})


class Board:
    """A first-order thermal board: dT/dt = (a + R*P + offset - T) / tau, readings rounded to 1 C."""

    def __init__(self, a: float = 30.0, r: float = 0.06, tau: float = 40.0, seed: int = 0) -> None:
        self.a, self.r, self.tau = a, r, tau
        self.temp = a + r * 70.0
        self.rng = np.random.default_rng(seed)
        self.offset = 0.0
        self.stuck: float | None = None
        self.mem = 10_000.0
        self.pids = [100]

    def sample(self, util: float, extra_w: float = 0.0, leak: float = 0.0) -> GpuSample:
        power = 70.0 + 6.3 * util + extra_w + self.rng.normal(0, 2.0)
        self.temp += (self.a + self.r * power + self.offset - self.temp) * (1 - math.exp(-1 / self.tau))
        self.mem += leak
        reading = self.stuck if self.stuck is not None else float(round(self.temp + self.rng.normal(0, 0.25)))
        return GpuSample(index=0, uuid="u", name=NAME, state="ok", temp_c=reading, power_w=power,
                         util_pct=util, mem_used_mib=self.mem + self.rng.uniform(-4, 4), sm_clock_mhz=1980.0,
                         processes=[Process(pid=p, mem_used_mib=self.mem - 500 if i == 0 and not leak else 9000.0)
                                    for i, p in enumerate(self.pids)])


def run(fx: FeatureExtractor, board: Board, seconds: int, t0: float, util: float | list[float], **kw: float
        ) -> list[np.ndarray]:
    out = []
    for i in range(seconds):
        u = util[i % len(util)] if isinstance(util, list) else util
        f, valid = fx.update(fx.columns([("h", t0 + i, board.sample(u, **kw))]))
        out.append(f[0] if valid[0] else None)
    return out


def load_pattern() -> list[float]:
    return [90.0] * 120 + [10.0] * 120


def test_features_wait_for_warm_up() -> None:
    fx = FeatureExtractor(PARAMS)
    feats = run(fx, Board(), MIN_SEEN + 2, 0.0, 50.0)
    assert all(f is None for f in feats[: MIN_SEEN - 1]) and feats[-1] is not None


def test_healthy_board_residual_stays_small_through_load_changes() -> None:
    fx = FeatureExtractor(PARAMS)
    feats = [f for f in run(fx, Board(a=33.0, r=0.066), 1800, 0.0, load_pattern()) if f is not None]
    resid = np.array([f[F["temp_resid"]] for f in feats[600:]])
    assert np.abs(resid).max() < 1.5  # the per-GPU fit absorbed a different inlet and resistance


def test_heat_at_constant_power_shows_as_residual_and_trend() -> None:
    fx = FeatureExtractor(PARAMS)
    board = Board()
    run(fx, board, 900, 0.0, load_pattern())
    board.offset = 8.0  # e.g. a failed fan: hotter than the power explains
    feats = run(fx, board, 90, 900.0, 90.0)
    last = feats[-1]
    assert last is not None and last[F["temp_resid"]] > 4.0
    assert max(f[F["temp_trend"]] for f in feats if f is not None) > 2.0


def test_stuck_sensor_shows_as_expected_movement_without_reading_change() -> None:
    fx = FeatureExtractor(PARAMS)
    board = Board()
    run(fx, board, 600, 0.0, 10.0)
    normal = run(fx, board, 120, 600.0, 90.0)
    assert max(f[F["flat_span"]] for f in normal if f is not None) < 2.0
    board.stuck = 40.0
    run(fx, board, 5, 720.0, 90.0)
    stuck = run(fx, board, 120, 725.0, 10.0)
    assert stuck[-1] is not None and stuck[-1][F["flat_span"]] > 5.0


def test_memory_growth_counts_only_without_process_change() -> None:
    fx = FeatureExtractor(PARAMS)
    board = Board()
    run(fx, board, 100, 0.0, 50.0)
    leak = run(fx, board, 40, 100.0, 50.0, leak=50.0)
    assert leak[-1] is not None and leak[-1][F["unattributed_growth"]] > 20.0
    assert leak[-1][F["mem_growth"]] > 20.0
    # A new process that brings its own memory is a job starting, not a leak.
    fx2, b2 = FeatureExtractor(PARAMS), Board()
    run(fx2, b2, 100, 0.0, 50.0)
    b2.pids = [100, 200]
    b2.mem += 9000.0
    f = run(fx2, b2, 3, 100.0, 50.0)[-1]
    assert f is not None and f[F["mem_growth"]] == 0.0


def test_power_spike_is_excess_over_what_utilisation_explains() -> None:
    fx = FeatureExtractor(PARAMS)
    board = Board()
    base = run(fx, board, 100, 0.0, 50.0)
    assert abs(base[-1][F["power_excess"]]) < 0.05  # type: ignore[index]
    spike = run(fx, board, 1, 100.0, 50.0, extra_w=400.0)[0]
    after = run(fx, board, 3, 101.0, 50.0)[-1]
    assert spike is not None and spike[F["power_excess"]] > 0.5
    assert after is not None and after[F["power_excess"]] > 0.5  # held a few seconds: k-of-n can see it


def test_fleet_batch_equals_one_gpu_at_a_time() -> None:
    boards = [Board(seed=s, a=28.0 + s) for s in range(4)]
    samples = [[b.sample(50.0 + 10 * (t % 7)) for b in boards] for t in range(80)]
    batch = FeatureExtractor(PARAMS)
    singles = [FeatureExtractor(PARAMS) for _ in boards]
    for t, row in enumerate(samples):
        fb, _ = batch.update(batch.columns([(f"h{i}", float(t), s) for i, s in enumerate(row)]))
        for i, s in enumerate(row):
            fs, _ = singles[i].update(singles[i].columns([(f"h{i}", float(t), s)]))
            np.testing.assert_allclose(fb[i], fs[0])


def test_gap_restarts_windows() -> None:
    fx = FeatureExtractor(PARAMS)
    board = Board()
    run(fx, board, 60, 0.0, 50.0)
    f, valid = fx.update(fx.columns([("h", 1000.0, board.sample(50.0))]))
    assert not valid[0]


def test_fit_thermal_and_power_curve_recover_the_physics() -> None:
    board = Board(a=31.0, r=0.07, tau=45.0)
    util = np.array(load_pattern() * 10)
    s = [board.sample(float(u)) for u in util]
    ts = np.arange(len(s), dtype=float)
    p = np.array([x.power_w for x in s])
    t = np.array([x.temp_c for x in s])
    tau, a, r = fit_thermal([(ts, p, t)])
    assert abs(tau - 45.0) <= 5.0 and abs(a - 31.0) < 1.0 and abs(r - 0.07) < 0.005
    curve = fit_power_curve(util, p)
    assert abs(curve[-3] - (70 + 6.3 * 90)) < 10


def test_a_failed_nvml_read_is_missing_not_zero() -> None:
    """One sample without memory, processes or utilisation must not look like a leak or a power spike."""
    for missing in ("mem_used_mib", "processes", "util_pct"):
        fx, board = FeatureExtractor(PARAMS), Board()
        run(fx, board, 100, 0.0, 50.0)
        rows = []
        for i in range(40):
            g = board.sample(50.0)
            if i == 5:
                g = msgspec.structs.replace(g, **{missing: None})
            f, valid = fx.update(fx.columns([("h", 100.0 + i, g)]))
            assert valid[0]
            rows.append(f[0])
        feats = np.array(rows)
        assert np.abs(feats[:, F["mem_growth"]]).max() < 2.0, missing
        assert np.abs(feats[:, F["unattributed_growth"]]).max() < 2.0, missing
        assert feats[:, F["power_excess"]].max() < 0.1, missing


def test_unknown_processes_differ_from_no_processes() -> None:
    fx = FeatureExtractor(PARAMS)
    s = Board().sample(50.0)
    c = fx.columns([("h", 0.0, msgspec.structs.replace(s, processes=None)),
                    ("h", 1.0, msgspec.structs.replace(s, processes=[]))])
    assert c.proc_sig[0] == PROCS_UNKNOWN and math.isnan(c.proc_mem[0])
    assert c.proc_sig[1] != PROCS_UNKNOWN and c.proc_mem[1] == 0.0
