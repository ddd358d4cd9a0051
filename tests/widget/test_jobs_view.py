"""JobsView over a fake source; JobsBridge over fake async services."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from pytestqt.qtbot import QtBot

from aether_desktop.services.jobs import JobRecord
from aether_desktop.services.jobtypes import JobRequest
from aether_desktop.widgets import theme
from aether_desktop.widgets.jobs_bridge import JobsBridge
from aether_desktop.widgets.jobs_view import COLUMNS, JobsView, fmt_duration

NOW = 1_764_000_000.0
Done = Callable[[bool, str], None]


def rec(job_id: str, state: str, **kw: object) -> JobRecord:
    req = JobRequest(id=job_id, argv=("python", "train.py"), submitted_ts=NOW - 100)
    return JobRecord(request=req, state=state, **kw)  # type: ignore[arg-type]


DECISION = {
    "action": "place", "reason": "coolest GPU with room", "host": "node-1", "gpus": [0],
    "p_success": 0.97, "expected_slowdown": 1.05, "model_version": "m3", "candidates_total": 2,
    "candidates": [
        {"host": "node-1", "gpus": [0], "p_success": 0.97, "expected_slowdown": 1.05, "score": 0.91, "note": "cool"},
        {"host": "node-2", "gpus": [5], "p_success": 0.61, "expected_slowdown": 1.4, "score": 0.33, "note": "hot"},
    ],
}  # fmt: skip


class FakeSource:
    def __init__(self, jobs: list[JobRecord]) -> None:
        self.jobs = jobs
        self.listeners: list[Callable[[], None]] = []
        self.calls: list[tuple[str, str]] = []
        self.log_answer: tuple[bool, str] = (True, "epoch 1\nepoch 2\n")

    def list_jobs(self) -> Sequence[JobRecord]:
        return self.jobs

    def now(self) -> float:
        return NOW

    def add_listener(self, fn: Callable[[], None]) -> None:
        self.listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        self.listeners.remove(fn)

    def cancel(self, job_id: str, done: Done) -> None:
        self.calls.append(("cancel", job_id))
        done(False, "host node-1 is offline (no responders)")

    def resubmit(self, job_id: str, done: Done) -> None:
        self.calls.append(("resubmit", job_id))
        done(True, f"resubmitted {job_id} as job-new")

    def fetch_log(self, job_id: str, done: Done) -> None:
        self.calls.append(("log", job_id))
        done(*self.log_answer)

    def changed(self) -> None:
        for fn in self.listeners:
            fn()


def jobs() -> list[JobRecord]:
    return [
        rec("j-run", "running", host="node-1", gpus=(0,), started_ts=NOW - 65, dispatched_ts=NOW - 70,
            decision=DECISION, reason="coolest GPU with room"),
        rec("j-fail", "failed", host="node-2", gpus=(1, 2), started_ts=NOW - 90, ended_ts=NOW - 30,
            exit_code=137, reason="CUDA out of memory"),
        rec("j-wait", "pending", reason="no GPU has 8 GiB free"),
    ]  # fmt: skip


def make(qtbot: QtBot, source: FakeSource) -> JobsView:
    view = JobsView(source)
    qtbot.addWidget(view)
    return view


def cell(view: JobsView, row: int, col: str) -> str:
    item = view.table.item(row, COLUMNS.index(col))
    return item.text() if item is not None else ""


def test_table_shows_state_placement_times_and_reason(qtbot: QtBot) -> None:
    view = make(qtbot, FakeSource(jobs()))
    assert view.table.rowCount() == 3
    assert [cell(view, r, "State") for r in range(3)] == ["running", "failed", "pending"]
    assert cell(view, 0, "Host / GPUs") == "node-1:0" and cell(view, 1, "Host / GPUs") == "node-2:1,2"
    assert cell(view, 2, "Host / GPUs") == "(1 GPU)"
    assert cell(view, 0, "Duration") == "1m 05s" and cell(view, 1, "Duration") == "1m 00s"
    assert cell(view, 1, "Reason") == "exit 137 — CUDA out of memory"
    assert cell(view, 2, "Reason") == "no GPU has 8 GiB free"
    assert cell(view, 0, "Started") != "" and cell(view, 2, "Started") == ""
    state_item = view.table.item(1, COLUMNS.index("State"))
    assert state_item is not None and state_item.foreground().color() == QColor(theme.CRIT)


def test_details_pane_shows_the_decision_record(qtbot: QtBot) -> None:
    view = make(qtbot, FakeSource(jobs()))
    assert view.select_job("j-run")
    text = view.decision_summary.text()
    assert "coolest GPU with room" in text and "p(success) 0.97" in text and "model m3" in text
    assert view.candidates.rowCount() == 2
    row = [view.candidates.item(0, c).text() for c in range(view.candidates.columnCount())]  # type: ignore[union-attr]
    assert row == ["node-1", "0", "0.970", "1.05", "0.910", "cool"]
    view.select_job("j-wait")
    assert "No scheduling decision yet" in view.decision_summary.text()
    assert view.candidates.rowCount() == 0


def test_buttons_follow_the_selection(qtbot: QtBot) -> None:
    view = make(qtbot, FakeSource(jobs()))
    assert not view.cancel_button.isEnabled() and not view.resubmit_button.isEnabled()
    view.select_job("j-run")
    assert view.cancel_button.isEnabled() and view.log_button.isEnabled()
    view.select_job("j-fail")
    assert not view.cancel_button.isEnabled() and view.resubmit_button.isEnabled()
    view.select_job("j-wait")
    assert view.cancel_button.isEnabled() and not view.log_button.isEnabled()


def test_actions_go_to_the_source_and_report_back(qtbot: QtBot) -> None:
    source = FakeSource(jobs())
    view = make(qtbot, source)
    view.select_job("j-run")
    qtbot.mouseClick(view.cancel_button, Qt.MouseButton.LeftButton)
    assert source.calls[-1] == ("cancel", "j-run")
    assert view.message.text() == "host node-1 is offline (no responders)"
    qtbot.mouseClick(view.resubmit_button, Qt.MouseButton.LeftButton)
    assert source.calls[-1] == ("resubmit", "j-run") and "job-new" in view.message.text()
    qtbot.mouseClick(view.log_button, Qt.MouseButton.LeftButton)
    assert view.log_text.toPlainText() == "epoch 1\nepoch 2\n"
    assert view.details.currentWidget() is view.log_text
    source.log_answer = (False, "agent node-1 does not share the log")
    qtbot.mouseClick(view.log_button, Qt.MouseButton.LeftButton)
    assert "log unavailable: agent node-1 does not share the log" in view.log_text.toPlainText()


def test_refresh_keeps_the_selection_and_stops_listening_when_closed(qtbot: QtBot) -> None:
    source = FakeSource(jobs())
    view = make(qtbot, source)
    view.select_job("j-fail")
    source.jobs = [rec("j-new", "pending"), *source.jobs]
    source.changed()
    assert view.table.rowCount() == 4
    selected = view.selected_job()
    assert selected is not None and selected.id == "j-fail"
    assert len(source.listeners) == 1
    view.deleteLater()
    qtbot.waitUntil(lambda: not source.listeners, timeout=2000)


def test_fmt_duration() -> None:
    assert [fmt_duration(s) for s in (None, 5, 65, 3725)] == ["", "5s", "1m 05s", "1h 02m"]


# --------------------------------------------------------------------------- bridge


async def test_bridge_loads_acts_and_coalesces(qtbot: QtBot) -> None:
    store = {j.id: j for j in jobs()}
    loads = 0
    gate = asyncio.Event()

    async def list_jobs() -> list[JobRecord]:
        nonlocal loads
        loads += 1
        await gate.wait()
        return list(store.values())

    async def cancel(job_id: str) -> str:
        if job_id == "j-fail":
            raise RuntimeError("j-fail already ended (failed)")
        return f"cancel sent to node-1 for {job_id}"

    async def resubmit(job_id: str) -> JobRecord:
        return rec("job-copy", "pending")

    async def fetch_log(job_id: str) -> str:
        return ""

    async def submit(req: JobRequest) -> JobRecord:
        return rec(req.id, "pending")

    bridge = JobsBridge(
        list_jobs=list_jobs, submit=submit, cancel=cancel, resubmit=resubmit, fetch_log=fetch_log
    )
    view = JobsView(bridge)
    qtbot.addWidget(view)
    notices: list[tuple[str, str]] = []
    bridge.notice.connect(lambda level, text: notices.append((level, text)))

    bridge.notify_changed()
    while loads < 1:  # wait until the reload is in flight, blocked on the "database" (the gate)
        await asyncio.sleep(0)
    for _ in range(5):  # a burst of changes while it is in flight: one more reload, not five
        bridge.notify_changed(frozenset({"j-run"}))
    gate.set()
    for _ in range(100):
        if view.table.rowCount() == 3 and not bridge._tasks.pending:
            break
        await asyncio.sleep(0.01)
    assert view.table.rowCount() == 3 and loads == 2

    results: list[tuple[bool, str]] = []
    bridge.cancel("j-run", lambda ok, text: results.append((ok, text)))
    bridge.cancel("j-fail", lambda ok, text: results.append((ok, text)))
    bridge.resubmit("j-fail", lambda ok, text: results.append((ok, text)))
    bridge.fetch_log("j-run", lambda ok, text: results.append((ok, text)))
    for _ in range(100):
        if len(results) == 4:
            break
        await asyncio.sleep(0.01)
    assert sorted(results) == sorted([
        (True, "cancel sent to node-1 for j-run"),
        (False, "j-fail already ended (failed)"),
        (True, "resubmitted j-fail as job-copy"),
        (True, "(the log is empty)"),
    ])  # fmt: skip
    assert ("error", "j-fail already ended (failed)") in notices
    bridge.set_dispatcher_active(True)
    assert bridge.dispatching and notices[-1] == ("info", "this station dispatches jobs")
    bridge.close()


# --------------------------------------------------------------------------- placement model


META = {
    "version": 4, "created": "2026-11-27T10:00:00Z", "training_rows": 4000, "validation_rows": 1000,
    "fleet_rows": 120, "fleet_jobs": 80, "validation": {"auc": 0.9812, "accuracy": 0.954, "slowdown_mae": 0.031},
}  # fmt: skip


class FakeModel:
    def __init__(self) -> None:
        self.meta: dict[str, object] | None = None
        self.status = ""
        self.busy = False
        self.listeners: list[Callable[[], None]] = []
        self.pending: list[Done] = []

    def model_summary(self) -> str | None:
        from aether_desktop.services.scheduler_model import model_summary

        return None if self.meta is None else model_summary(self.meta)

    def model_status(self) -> str:
        return self.status

    def retraining(self) -> bool:
        return self.busy

    def can_retrain(self) -> bool:
        return True

    def add_model_listener(self, fn: Callable[[], None]) -> None:
        self.listeners.append(fn)

    def remove_model_listener(self, fn: Callable[[], None]) -> None:
        self.listeners.remove(fn)

    def retrain_model(self, done: Done) -> None:
        self.busy = True
        self.status = "retraining the placement model on 120 fleet rows…"
        self.pending.append(done)

    def changed(self) -> None:
        for fn in self.listeners:
            fn()


def test_model_line_shows_version_and_figures_and_the_button_retrains(qtbot: QtBot) -> None:
    model = FakeModel()
    view = JobsView(FakeSource(jobs()), model=model)
    qtbot.addWidget(view)
    assert "not loaded yet" in view.model_label.text() and not view.retrain_button.isEnabled()
    model.meta = META
    model.changed()
    text = view.model_label.text()
    for part in (
        "v4",
        "AUC 0.981",
        "accuracy 95.4 %",
        "slowdown MAE 0.031",
        "120 from 80 fleet jobs",
        "2026-11-27",
    ):
        assert part in text, part
    assert view.retrain_button.isEnabled()

    qtbot.mouseClick(view.retrain_button, Qt.MouseButton.LeftButton)
    assert len(model.pending) == 1 and not view.retrain_button.isEnabled()
    assert view.retrain_button.text() == "Retraining…" and "120 fleet rows" in view.model_label.text()
    model.busy, model.status, model.meta = False, "", {**META, "version": 5}
    model.pending[0](True, "Placement model v5 …")
    assert "v5" in view.model_label.text() and view.retrain_button.isEnabled()
    assert view.message.text() == "Placement model v5 …"


def test_without_a_model_source_the_model_line_is_hidden(qtbot: QtBot) -> None:
    view = make(qtbot, FakeSource(jobs()))
    assert view.model_label.isHidden() and view.retrain_button.isHidden()


async def test_bridge_retrain_reports_progress_and_the_new_model(qtbot: QtBot) -> None:
    gate = asyncio.Event()
    bridge: JobsBridge

    async def retrain() -> str:
        bridge.set_retrain_progress("info", "retraining the placement model on 3 fleet rows…")
        await gate.wait()
        bridge.set_model_info({**META, "version": 5})
        bridge.set_retrain_progress("ok", "Placement model v5 ready")
        return "Placement model v5 ready"

    async def nothing(*_: object) -> list[JobRecord]:
        return []

    bridge = JobsBridge(list_jobs=nothing, submit=nothing, cancel=nothing, resubmit=nothing,  # type: ignore[arg-type]
                        fetch_log=nothing, retrain_model=retrain)  # type: ignore[arg-type]  # fmt: skip
    view = JobsView(bridge, model=bridge)
    qtbot.addWidget(view)
    notices: list[tuple[str, str]] = []
    bridge.notice.connect(lambda level, text: notices.append((level, text)))
    bridge.set_model_info(META)
    assert "v4" in view.model_label.text()
    results: list[tuple[bool, str]] = []
    bridge.retrain_model(lambda ok, text: results.append((ok, text)))
    for _ in range(100):
        if bridge.model_status():
            break
        await asyncio.sleep(0.01)
    assert (
        bridge.retraining()
        and not view.retrain_button.isEnabled()
        and "3 fleet rows" in view.model_label.text()
    )
    bridge.retrain_model(lambda ok, text: results.append((ok, text)))  # a second click while busy
    assert results == [(False, "the placement model is already being retrained")]
    gate.set()
    for _ in range(100):
        if len(results) == 2:
            break
        await asyncio.sleep(0.01)
    assert results[1] == (True, "Placement model v5 ready")
    assert "v5" in view.model_label.text() and view.retrain_button.isEnabled()
    assert notices == [("ok", "Placement model v5 ready")]
    bridge.close()
