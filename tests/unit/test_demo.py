"""Demo fleet planning and agent command lines (pure)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from aether_desktop.services.demo import DEMO_ALLOWED, agent_argv, plan


def test_plan_mixes_models_and_seeds() -> None:
    hosts = plan(4, 8, seed=1)
    assert [h.host for h in hosts] == ["demo-01", "demo-02", "demo-03", "demo-04"]
    assert len({h.model for h in hosts}) >= 3 and len({h.seed for h in hosts}) == 4


def test_agent_argv_passes_no_secrets_and_allowlists_jobs(tmp_path: Path) -> None:
    argv = agent_argv(plan(1, 2, 1)[0], ["nats://127.0.0.1:4222"], "aether", tmp_path)
    assert argv[:3] == [sys.executable, "-m", "headless_agent"]
    assert "--allow-jobs" in argv and all(c in argv for c in DEMO_ALLOWED)
    assert not any("password" in a.lower() for a in argv)


def test_frozen_app_runs_its_own_agent_subcommand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    argv = agent_argv(plan(1, 2, 1)[0], ["nats://127.0.0.1:4222"], "aether", tmp_path)
    assert argv[:2] == [sys.executable, "agent"]
