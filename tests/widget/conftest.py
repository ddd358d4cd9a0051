"""Widget-test fixtures: fail on leaked windows or running timers; a qasync loop for widget tasks.

pytest-qt closes and deleteLater()s the widgets given to ``qtbot.addWidget``
before fixtures are torn down; the leak check runs after that, once deferred
deletes are flushed, so anything still visible or still ticking was left
behind by the test (or by the code under test). Mark a test
``@pytest.mark.allow_leaks`` to opt out, with a reason in a comment.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
import shiboken6
from PySide6.QtCore import QCoreApplication, QEvent, QTimer
from PySide6.QtWidgets import QApplication


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_leaks: skip the leaked-widget/timer check for this test")


def _ptr(obj: object) -> int:
    return int(shiboken6.getCppPointer(obj)[0])


@pytest.fixture(autouse=True)
def no_leaked_widgets_or_timers(
    request: pytest.FixtureRequest, qapp: QApplication, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    before = {_ptr(w) for w in QApplication.topLevelWidgets()}
    started: list[QTimer] = []
    original_start = QTimer.start

    def tracking_start(self: QTimer, *args: object) -> None:
        started.append(self)
        original_start(self, *args)  # type: ignore[arg-type]

    # Only Python-side starts are seen (enough: that is where our timers start).
    monkeypatch.setattr(QTimer, "start", tracking_start)
    yield
    monkeypatch.undo()
    QApplication.processEvents()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    leaked = [
        f"{type(w).__name__} {w.windowTitle()!r}"
        for w in QApplication.topLevelWidgets()
        if shiboken6.isValid(w) and w.isVisible() and _ptr(w) not in before
    ]
    ticking = [
        f"QTimer interval={t.interval()} parent={type(t.parent()).__name__}"
        for t in started
        if shiboken6.isValid(t) and t.isActive()
    ]
    started.clear()
    if leaked or ticking:
        pytest.fail(f"test leaked top-level widgets {leaked} / running timers {ticking}", pytrace=False)


@pytest.fixture
def qloop(qapp: QApplication) -> Iterator[asyncio.AbstractEventLoop]:
    """The app's real loop arrangement (qasync): widgets call asyncio.ensure_future on it.

    Tests drive it with ``qloop.run_until_complete(...)``, which also runs Qt events.
    """
    import qasync

    loop = qasync.QEventLoop(qapp, already_running=False)
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        loop.close()
        asyncio.set_event_loop(None)
