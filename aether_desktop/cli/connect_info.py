"""`aether connect-info`: how to point an agent at this machine's embedded NATS server."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from aether_desktop.config import default_data_dir


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="aether connect-info",
                                description="Print the command that connects an agent to the embedded NATS server.")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--host", help="address agents use to reach this machine (default: the server's URL)")
    args = p.parse_args(argv)
    nats_dir = args.data_dir / "nats"
    try:
        creds = json.loads((nats_dir / "credentials.json").read_text())
        server = json.loads((nats_dir / "server.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"aether connect-info: no embedded NATS server found in {nats_dir} ({exc}); start 'aether' first",
              file=sys.stderr)
        return 2
    url = str(server.get("url", ""))
    if args.host:
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://{args.host}:{rest.rsplit(':', 1)[-1]}"
    print("# The embedded server listens on loopback unless 'aether --listen 0.0.0.0' was used.")
    print(f"export AETHER_NATS_USER={shlex.quote(creds['user'])}")
    print(f"export AETHER_NATS_PASSWORD={shlex.quote(creds['password'])}")
    print(f"aether-agent --nats {shlex.quote(url)}   # add --simulate 4 to try it without GPUs")
    return 0
