"""Crash guard: 64 curves × 3,600 points drawn and grabbed repeatedly.

PySide6-Essentials 6.12.0 with pyqtgraph 0.14.0 aborts the interpreter on
exactly this ("Fatal Python error: bool_dealloc"/"none_dealloc"), which is
why pyproject pins PySide6 < 6.12. If this test process dies instead of
failing, check the installed PySide6 version first (named in the assertion messages).
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
import PySide6

N_CURVES = 64

N_POINTS = 3600
FRAMES = 4


def test_64_curves_of_3600_points_render(qtbot) -> None:  # type: ignore[no-untyped-def]
    pw = pg.PlotWidget(axisItems={"bottom": pg.DateAxisItem()})
    qtbot.addWidget(pw)
    pw.resize(900, 500)
    pw.show()
    rng = np.random.default_rng(0)
    t = 1_764_262_800.0 + np.arange(N_POINTS, dtype=np.float64)
    curves = []
    for i in range(N_CURVES):
        c = pw.plot(pen=pg.mkPen(pg.intColor(i, N_CURVES), width=1))
        c.setDownsampling(auto=True, method="peak")
        c.setClipToView(True)
        curves.append(c)
    for frame in range(FRAMES):
        for i, c in enumerate(curves):
            y = 40 + 10 * np.sin(t / 300 + i + frame) + rng.normal(0, 1, N_POINTS)
            y[rng.integers(0, N_POINTS, 20)] = np.nan  # gaps, like missing samples
            c.setData(t, y, connect="finite")
        img = pw.grab()
        assert not img.isNull() and img.width() == 900, (PySide6.__version__, pg.__version__)
    assert len(pw.getPlotItem().listDataItems()) == N_CURVES
