"""Real nats-server requiring an nkey user, real agent processes: --nats-nkey works, a wrong key is refused."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import nats
import nkeys
import pytest

from aether_protocol import decode_telemetry
from tests.integration.agent_proc import start_agent, stop_agent
from tests.servers import NatsProc, free_port, nats_server_binary

pytestmark = pytest.mark.integration


def user_keypair() -> tuple[bytes, str]:
    seed = bytes(nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_USER))
    return seed, nkeys.from_seed(bytearray(seed)).public_key.decode()


@dataclass
class NkeyServer:
    url: str
    seed_file: Path  # the one user the server knows


@pytest.fixture
def nkey_server(tmp_path: Path) -> Iterator[NkeyServer]:
    seed, public = user_keypair()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
                    f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    srv = NatsProc(port=port, store=tmp_path / "js")
    # NatsProc starts the server with flags only; an nkey user needs a configuration file.
    srv.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield NkeyServer(url=f"nats://127.0.0.1:{port}", seed_file=seed_file)
    finally:
        srv.stop()


def _wait_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nats-server did not start")


async def wait_for(pred, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.1)
    return bool(pred())


async def test_agent_connects_with_an_nkey_and_publishes(nkey_server: NkeyServer, tmp_path: Path) -> None:
    nc = await nats.connect(nkey_server.url, nkeys_seed=str(nkey_server.seed_file))
    got: list[bytes] = []

    async def cb(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.data)

    await nc.subscribe("aether.telemetry.it-nkey", cb=cb)
    agent = start_agent(nkey_server.url, "it-nkey", "--simulate", "1", "--interval", "0.2",
                        "--nats-nkey", str(nkey_server.seed_file), log=tmp_path / "agent.log")
    try:
        assert await wait_for(lambda: len(got) >= 2), (tmp_path / "agent.log").read_text()
        assert decode_telemetry(got[0]).host == "it-nkey"
        rep = await nc.request("aether.cmd.it-nkey", b'{"v":1,"id":"c-ping","op":"ping"}', timeout=5)
        assert b'"ok":true' in rep.data
    finally:
        assert stop_agent(agent) == 0
        await nc.close()


async def test_a_wrong_nkey_is_refused_clearly_and_the_agent_still_stops(
        nkey_server: NkeyServer, tmp_path: Path) -> None:
    wrong, _ = user_keypair()
    wrong_file = tmp_path / "wrong.nk"
    wrong_file.write_bytes(wrong)
    nc = await nats.connect(nkey_server.url, nkeys_seed=str(nkey_server.seed_file))
    got: list[bytes] = []

    async def cb(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.data)

    await nc.subscribe("aether.telemetry.it-wrong", cb=cb)
    log = tmp_path / "agent.log"
    agent = start_agent(nkey_server.url, "it-wrong", "--simulate", "1", "--interval", "0.2",
                        "--nats-nkey", str(wrong_file), log=log)
    try:
        assert await wait_for(lambda: log.exists() and "refused this agent's credentials" in log.read_text()), \
            log.read_text() if log.exists() else "no log"
        assert "Authorization Violation" in log.read_text()
        await asyncio.sleep(1.0)
        assert not got and agent.poll() is None  # still there, still asking, nothing published
        # Said once (then every 60th refusal), not once a second.
        assert log.read_text().count("refused this agent's credentials") == 1
        t0 = time.monotonic()
        assert stop_agent(agent) == 0
        assert time.monotonic() - t0 < 8
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        await nc.close()


def test_a_missing_nkey_file_stops_the_agent_at_start(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    agent = start_agent(f"nats://127.0.0.1:{free_port()}", "it-nofile", "--simulate", "1",
                        "--nats-nkey", str(tmp_path / "missing.nk"), log=log)
    assert agent.wait(20) == 2
    text = log.read_text()
    assert "--nats-nkey" in text and "missing.nk" in text and "retrying" not in text
