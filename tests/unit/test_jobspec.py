"""Job request parsing and validation (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aether_desktop.services.jobspec import (
    FieldError,
    JobFields,
    deadline_example,
    errors_by_field,
    fields_from_request,
    parse_deadline,
    parse_duration,
    parse_env,
    parse_gpus,
    parse_job,
    parse_memory,
    split_command,
)
from aether_desktop.services.jobtypes import JobRequest

NOW = 1_764_000_000.0


def test_command_is_split_like_a_shell_but_never_run_by_one() -> None:
    assert split_command("python train.py; rm -rf /") == ("python", "train.py;", "rm", "-rf", "/")
    assert split_command("python -c 'print(1) && x' \"a b\"") == ("python", "-c", "print(1) && x", "a b")
    assert split_command("echo $HOME `id` | cat") == ("echo", "$HOME", "`id`", "|", "cat")
    with pytest.raises(ValueError, match="enter the command"):
        split_command("   ")
    with pytest.raises(ValueError, match="cannot split"):
        split_command("python 'unclosed")


@pytest.mark.parametrize(
    ("text", "mib"),
    [("8G", 8192.0), ("8000M", 8000.0), ("8000", 8000.0), ("8 GiB", 8192.0), ("1.5g", 1536.0),
     ("8GB", 8192.0), ("", 0.0), ("1T", 1048576.0)],
)  # fmt: skip
def test_memory(text: str, mib: float) -> None:
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["lots", "8X", "-8G", "8 G B", "G"])
def test_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="8G"):
        parse_memory(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90m", 5400.0), ("2h", 7200.0), ("3600", 3600.0), ("1h30m", 5400.0), ("45s", 45.0), ("1d", 86400.0),
     ("1H 30M", 5400.0), ("0.5h", 1800.0)],
)  # fmt: skip
def test_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "2x", "h", "1h30", "0", "-5m", "400d"])
def test_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_deadline() -> None:
    assert parse_deadline("", NOW) is None
    assert parse_deadline("+4h", NOW) == NOW + 4 * 3600
    iso = datetime.fromtimestamp(NOW + 86400, UTC).isoformat()
    assert parse_deadline(iso, NOW) == NOW + 86400
    naive = datetime.fromtimestamp(NOW + 7200).strftime("%Y-%m-%dT%H:%M:%S")  # local time, as typed
    assert parse_deadline(naive, NOW) == NOW + 7200
    with pytest.raises(ValueError, match="past"):
        parse_deadline(datetime.fromtimestamp(NOW - 60, UTC).isoformat(), NOW)
    with pytest.raises(ValueError, match="ISO") as bad:
        parse_deadline("tomorrow", NOW)
    # The example it gives is tomorrow at 18:00 and parses (not a date long past).
    example = str(bad.value).split("such as ")[1].split(" ")[0]
    assert example == deadline_example(NOW) and example.endswith("T18:00")
    assert NOW < parse_deadline(example, NOW) <= NOW + 2 * 86400  # type: ignore[operator]


def test_gpus() -> None:
    assert parse_gpus("2") == (2, None, None)
    assert parse_gpus("node-1:1,0") == (2, "node-1", (0, 1))
    for bad, msg in [("0", "1 to 64"), ("two", "number"), ("bad host:0", "host id"), ("n:0,0", "twice"),
                     ("n:", "list the GPU"), ("n:a", "whole numbers"), ("n:-1", "negative")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_gpus(bad)


def test_env() -> None:
    assert parse_env("A=1\n\n# note\nB_2 = x=y \n") == {"A": "1", "B_2": " x=y"}
    for bad, msg in [("1A=x", "valid variable name"), ("A", "KEY=VALUE"), ("A=1\nA=2", "twice"),
                     ("CUDA_VISIBLE_DEVICES=0", "set by the agent"), ("MY-VAR=1", "valid variable name"),
                     ("CUDA_DEVICE_ORDER=FASTEST_FIRST", "set by the agent"), ("PATH=/tmp", "set by the agent"),
                     ("AETHER_JOB_ID=x", "set by the agent")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_env(bad)


def test_parse_job_builds_a_request() -> None:
    fields = JobFields(
        command="python train.py --epochs 3", gpus="node-1:0,1", mem="8G", kind="inference", expected="1h",
        priority="5", deadline="+4h", env="EPOCHS=3", cwd="/data/run",
    )  # fmt: skip
    req = parse_job(fields, now=NOW, job_id="job-x")
    assert req == JobRequest(
        id="job-x", argv=("python", "train.py", "--epochs", "3"), num_gpus=2, host="node-1", gpus=(0, 1),
        mem_mib=8192.0, kind="inference", expected_s=3600.0, priority=5, deadline_ts=NOW + 4 * 3600,
        env={"EPOCHS": "3"}, cwd="/data/run", submitted_ts=NOW,
    )  # fmt: skip
    # And the fields rebuilt from it parse back to the same request (except the deadline).
    again = parse_job(fields_from_request(req), now=NOW, job_id="job-x")
    assert isinstance(again, JobRequest)
    assert again == JobRequest(**{**req.__dict__, "deadline_ts": None})


def test_parse_job_reports_every_field_error() -> None:
    fields = JobFields(command="", gpus="x", mem="lots", kind="batch", expected="soon", priority="high",
                       deadline="whenever", env="1=2", cwd="relative/dir")  # fmt: skip
    errors = parse_job(fields, now=NOW)
    assert isinstance(errors, list)
    assert {e.field for e in errors} == {"command", "gpus", "mem", "kind", "expected", "priority", "deadline",
                                         "env", "cwd"}  # fmt: skip
    assert all(isinstance(e, FieldError) and e.message for e in errors)


def test_deadline_shorter_than_the_job_is_an_error() -> None:
    errors = parse_job(JobFields(command="python x.py", expected="2h", deadline="+1h"), now=NOW)
    assert isinstance(errors, list)
    assert errors_by_field(errors) == {
        "deadline": "the deadline is sooner than the expected duration: it could never be met"
    }


def test_new_ids_are_unique() -> None:
    a = parse_job(JobFields(command="x"), now=NOW)
    b = parse_job(JobFields(command="x"), now=NOW)
    assert isinstance(a, JobRequest) and isinstance(b, JobRequest)
    assert a.id != b.id and a.id.startswith("job-")
