"""JobDialog: inline validation, Submit disabled until valid, argv preview, submitted signal."""

from __future__ import annotations

from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from aether_desktop.services.jobtypes import JobRequest
from aether_desktop.widgets.job_dialog import JobDialog

NOW = 1_764_000_000.0


def make(qtbot: QtBot, **kw: object) -> JobDialog:
    dlg = JobDialog(clock=lambda: NOW, **kw)  # type: ignore[arg-type]
    qtbot.addWidget(dlg)
    dlg.show()
    return dlg


def test_submit_is_disabled_until_valid(qtbot: QtBot) -> None:
    dlg = make(qtbot)
    assert not dlg.submit_button.isEnabled()
    assert dlg.errors["command"].isHidden()  # an untouched empty form is not shown as wrong
    qtbot.keyClicks(dlg.command, "python train.py")
    assert dlg.submit_button.isEnabled()
    dlg.mem.clear()
    qtbot.keyClicks(dlg.mem, "lots")
    assert not dlg.submit_button.isEnabled()
    assert not dlg.errors["mem"].isHidden()
    assert "8G" in dlg.errors["mem"].text()
    dlg.mem.clear()
    qtbot.keyClicks(dlg.mem, "8G")
    assert dlg.errors["mem"].isHidden() and dlg.submit_button.isEnabled()


def test_messages_appear_next_to_each_bad_field(qtbot: QtBot) -> None:
    dlg = make(qtbot)
    qtbot.keyClicks(dlg.command, "python x.py")
    for line, text in ((dlg.gpus, "node 1:0"), (dlg.expected, "soon"), (dlg.cwd, "rel/dir")):
        line.selectAll()
        qtbot.keyClicks(line, text)
    dlg.env.setPlainText("1BAD=x")
    assert not dlg.submit_button.isEnabled()
    assert "host id" in dlg.errors["gpus"].text()
    assert "90m" in dlg.errors["expected"].text()
    assert "absolute path" in dlg.errors["cwd"].text()
    assert "valid variable name" in dlg.errors["env"].text()
    assert dlg.errors["command"].isHidden() and dlg.errors["mem"].isHidden()


def test_argv_preview_keeps_shell_operators_as_arguments(qtbot: QtBot) -> None:
    dlg = make(qtbot)
    qtbot.keyClicks(dlg.command, "python train.py; rm -rf /")
    assert dlg.argv() == ["python", "train.py;", "rm", "-rf", "/"]
    assert dlg.submit_button.isEnabled()  # valid: it is one harmless argv, not two commands
    dlg.command.selectAll()
    qtbot.keyClicks(dlg.command, "python 'unclosed")
    assert dlg.argv() == [] and "cannot split" in dlg.errors["command"].text()


def test_submit_emits_the_request_and_closes(qtbot: QtBot) -> None:
    dlg = make(qtbot)
    qtbot.keyClicks(dlg.command, "python train.py --epochs 3")
    dlg.gpus.selectAll()
    qtbot.keyClicks(dlg.gpus, "2")
    qtbot.keyClicks(dlg.mem, "8000M")
    dlg.kind.setCurrentText("inference")
    dlg.priority.setValue(3)
    qtbot.keyClicks(dlg.deadline, "+4h")
    dlg.env.setPlainText("EPOCHS=3\nSEED=1")
    qtbot.keyClicks(dlg.cwd, "/data")
    with qtbot.waitSignal(dlg.submitted, timeout=1000) as sig:
        qtbot.mouseClick(dlg.submit_button, Qt.MouseButton.LeftButton)
    req = sig.args[0]
    assert isinstance(req, JobRequest)
    assert req.argv == ("python", "train.py", "--epochs", "3")
    assert (req.num_gpus, req.mem_mib, req.kind, req.priority) == (2, 8000.0, "inference", 3)
    assert (req.deadline_ts, req.env, req.cwd, req.submitted_ts) == (NOW + 4 * 3600, {"EPOCHS": "3", "SEED": "1"},
                                                                     "/data", NOW)  # fmt: skip
    assert not dlg.isVisible()


def test_prefilled_from_an_earlier_job(qtbot: QtBot) -> None:
    old = JobRequest(id="job-1", argv=("python", "a b.py"), num_gpus=2, host="node-1", gpus=(0, 3),
                     mem_mib=4096.0, expected_s=5400.0, env={"A": "1"})  # fmt: skip
    dlg = make(qtbot, initial=old)
    assert dlg.command.text() == "python 'a b.py'"
    assert dlg.argv() == ["python", "a b.py"]
    assert dlg.gpus.text() == "node-1:0,3" and dlg.env.toPlainText() == "A=1"
    assert dlg.submit_button.isEnabled()
