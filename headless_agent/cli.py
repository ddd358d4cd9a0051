"""`aether-agent`: the headless agent's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from aether_protocol import subjects as subj
from aether_protocol.connection import NatsSettings, add_nats_arguments, split_servers
from headless_agent.agent import Agent, AgentConfig, default_host_id, default_log_dir
from headless_agent.backend import BackendError, GpuBackend
from headless_agent.job_env import check_allowed_env
from headless_agent.jobs import JobPolicy
from headless_agent.nats_config import NatsConfigError, check_nats_settings

ENV_PREFIX = "AETHER_"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aether-agent",
        description="Aether headless agent: publishes GPU telemetry over NATS and runs commands.",
        epilog="Environment: AETHER_NATS (URLs), AETHER_NATS_USER, AETHER_NATS_PASSWORD, AETHER_NATS_TOKEN, "
        "AETHER_NATS_CREDS. Flags win over the environment.",
    )
    add_nats_arguments(p)
    p.add_argument("--host-id", help="host id (1-64 of [A-Za-z0-9_-]); default: derived from the hostname")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="sampling interval (default 1)")
    p.add_argument("--simulate", type=int, metavar="N", help="simulate N GPUs instead of reading NVML")
    p.add_argument("--model", default="H100", help="GPU model to simulate (with --simulate)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a simulated fault, e.g. fan_failure:gpu=2,at=60 (repeatable)")
    p.add_argument("--no-background-load", action="store_true",
                   help="simulated GPUs stay idle unless jobs run on them")
    p.add_argument("--subject-prefix", default=subj.DEFAULT_PREFIX, help="NATS subject prefix (default aether)")
    p.add_argument("--allow-jobs", action="store_true", help="allow this host to run jobs")
    p.add_argument("--allow-cmd", action="append", default=[], metavar="CMD",
                   help="a command (argv[0] name or exact path) jobs may run; repeatable; empty = none")
    p.add_argument("--allow-env", action="append", default=[], metavar="NAME",
                   help="a loader/interpreter hook jobs may set after all (e.g. PYTHONPATH); repeatable "
                   "(by default jobs may set any variable but such hooks: LD_*, PYTHONPATH, BASH_ENV, ...)")
    p.add_argument("--jobs-mode", choices=("auto", "process", "simulate"), default="auto",
                   help="auto: simulated jobs on a simulated backend, real processes on NVML")
    p.add_argument("--job-log-dir", type=Path, help="where job logs go (default: the user data folder)")
    p.add_argument("--job-log-max-mib", type=float, default=64.0, metavar="MIB",
                   help="rotate a running job's log beyond this size, keeping its last MiB (0: no limit)")
    p.add_argument("--buffer", type=int, default=20_000, metavar="N",
                   help="messages kept while NATS is unreachable (default 20000)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p


def settings_from_args(args: argparse.Namespace, env: dict[str, str], name: str) -> NatsSettings:
    servers = split_servers(args.nats) or split_servers(env.get(ENV_PREFIX + "NATS")) or ("nats://127.0.0.1:4222",)

    def pick(flag: object, key: str) -> str | None:
        return str(flag) if flag is not None else env.get(ENV_PREFIX + key)

    creds = pick(args.nats_creds, "NATS_CREDS")
    return NatsSettings(
        servers=servers,
        user=pick(args.nats_user, "NATS_USER"),
        password=pick(args.nats_password, "NATS_PASSWORD"),
        token=pick(args.nats_token, "NATS_TOKEN"),
        creds_file=Path(creds) if creds else None,
        nkey_seed_file=args.nats_nkey,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        name=name,
    )


def make_backend(args: argparse.Namespace, host: str) -> GpuBackend:
    if args.simulate is not None:
        from headless_agent.simulate import SimulatedBackend

        if args.simulate < 1:
            raise BackendError("--simulate needs at least 1 GPU")
        return SimulatedBackend(args.simulate, seed=args.seed, model=args.model, host=host, faults=args.fault,
                                background_load=not args.no_background_load)
    if args.fault:
        raise BackendError("--fault needs --simulate (faults are injected into simulated GPUs)")
    from headless_agent.nvml import NvmlBackend

    return NvmlBackend()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("aether.agent")
    host = args.host_id or default_host_id()
    if not subj.valid_host_id(host):
        print(f"aether-agent: invalid --host-id {host!r}: use 1-64 characters of [A-Za-z0-9_-]", file=sys.stderr)
        return 2
    try:
        prefix = subj.check_prefix(args.subject_prefix)
    except ValueError as exc:
        print(f"aether-agent: {exc}", file=sys.stderr)
        return 2
    if args.interval <= 0:
        print("aether-agent: --interval must be positive", file=sys.stderr)
        return 2
    try:
        opened_hooks = check_allowed_env(args.allow_env)
    except ValueError as exc:
        print(f"aether-agent: {exc}", file=sys.stderr)
        return 2
    if opened_hooks:
        log.warning("--allow-env lets jobs set %s, which make programs load code or start-up files of the "
                    "requester's choice", ", ".join(opened_hooks))
    nats_settings = settings_from_args(args, dict(os.environ), name=f"aether-agent {host}")
    try:
        check_nats_settings(nats_settings)
    except NatsConfigError as exc:  # would fail every connect attempt: say so now, once
        print(f"aether-agent: {exc}", file=sys.stderr)
        return 2
    try:
        backend = make_backend(args, host)
    except (BackendError, ValueError) as exc:
        print(f"aether-agent: {exc}", file=sys.stderr)
        return 2
    policy = JobPolicy(
        allow_jobs=args.allow_jobs,
        allowed_commands=tuple(args.allow_cmd),
        allowed_env=tuple(dict.fromkeys(args.allow_env)),
        log_dir=args.job_log_dir or default_log_dir(),
        max_log_bytes=max(0, int(args.job_log_max_mib * 1024 * 1024)),
    )
    if args.allow_jobs and not args.allow_cmd:
        log.warning("--allow-jobs without --allow-cmd: the allowlist is empty, every job will be refused")
    config = AgentConfig(
        host=host,
        nats=nats_settings,
        interval_s=args.interval,
        prefix=prefix,
        policy=policy,
        jobs_mode=args.jobs_mode,
        buffer_messages=max(10, args.buffer),
    )
    log.info("agent %s: %d GPU(s), every %.2f s, NATS %s", host, backend.gpu_count(), args.interval,
             config.nats.describe())
    agent = Agent(config, backend)
    asyncio.run(agent.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
