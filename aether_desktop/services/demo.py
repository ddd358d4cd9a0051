"""Demo fleet: simulated headless agents started as child processes.

They are the real agent (`python -m headless_agent --simulate G`), so demo
mode exercises the same wire, commands and jobs as a real fleet. Secrets go
through the environment, never the command line (other users can read argv).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("aether.demo")

# A mixed fleet looks and behaves like a real one: different power, memory and thermal envelopes.
DEMO_MODELS = ("H100", "A100-80GB", "H100", "L4", "A100-40GB", "RTX4090")
# Commands demo agents will "run" (simulated: nothing is executed).
DEMO_ALLOWED = ("python", "python3", "torchrun", "train.sh", "infer.sh", "sleep")


@dataclass(frozen=True)
class DemoHost:
    host: str
    model: str
    gpus: int
    seed: int


def plan(n_hosts: int, gpus: int, seed: int, models: Sequence[str] = DEMO_MODELS) -> list[DemoHost]:
    """Pure: which hosts a demo of n hosts starts."""
    return [DemoHost(f"demo-{i + 1:02d}", models[i % len(models)], gpus, seed * 1000 + i) for i in range(n_hosts)]


def agent_argv(h: DemoHost, servers: Sequence[str], prefix: str, log_dir: Path,
               faults: Sequence[str] = ()) -> list[str]:
    # A frozen (PyInstaller) app has no `python -m`: it runs its own `agent` subcommand instead.
    launcher = [sys.executable, "agent"] if getattr(sys, "frozen", False) else [sys.executable, "-m", "headless_agent"]
    argv = [*launcher, "--simulate", str(h.gpus), "--model", h.model,
            "--seed", str(h.seed), "--host-id", h.host, "--subject-prefix", prefix,
            "--allow-jobs", "--job-log-dir", str(log_dir), "--log-level", "WARNING"]
    for cmd in DEMO_ALLOWED:
        argv += ["--allow-cmd", cmd]
    for f in faults:
        argv += ["--fault", f]
    for s in servers:
        argv += ["--nats", s]
    return argv


class DemoFleet:
    def __init__(self, servers: Sequence[str], user: str | None, password: str | None, prefix: str,
                 data_dir: Path) -> None:
        self.servers = list(servers)
        self.user = user
        self.password = password
        self.prefix = prefix
        self.data_dir = data_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._plan: tuple[int, int, int] | None = None

    def start(self, n_hosts: int, gpus: int = 8, seed: int = 1) -> list[DemoHost]:
        hosts = plan(n_hosts, gpus, seed)
        if self._plan is None or n_hosts > self._plan[0]:
            self._plan = (n_hosts, gpus, seed)
        env = dict(os.environ)
        if self.user is not None:
            env["AETHER_NATS_USER"] = self.user
            env["AETHER_NATS_PASSWORD"] = self.password or ""
        log_dir = self.data_dir / "demo"
        log_dir.mkdir(parents=True, exist_ok=True)
        for h in hosts:
            if h.host in self.procs and self.procs[h.host].poll() is None:
                continue
            out = open(log_dir / f"{h.host}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
            self.procs[h.host] = subprocess.Popen(
                agent_argv(h, self.servers, self.prefix, log_dir / "jobs"),
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
            out.close()
        log.info("demo fleet: %d simulated host(s) x %d GPU(s)", len(hosts), gpus)
        return hosts

    def set_servers(self, servers: Sequence[str]) -> None:
        """Restart the agents against other servers (the embedded server came back on a new port).

        An agent only retries the URLs it was started with; blocking (up to the stop timeout).
        """
        self.servers = list(servers)
        if self._plan is None or not self.procs:
            return
        self.stop()
        self.start(*self._plan)

    def running(self) -> list[str]:
        return [h for h, p in self.procs.items() if p.poll() is None]

    def stop(self, timeout: float = 5.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for host, p in self.procs.items():
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("demo agent %s did not stop in %.0f s; killing it", host, timeout)
                p.kill()
                p.wait()
        self.procs.clear()
