"""What a job request may not do, and agent settings that must fail at start (no network)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import nacl.signing
import nkeys
import pytest

from aether_protocol import JobSpec, decode_reply
from aether_protocol.connection import NatsSettings
from headless_agent import cli
from headless_agent.backend import BackendError
from headless_agent.commands import CommandHandler
from headless_agent.job_env import check_allowed_env, env_refusal
from headless_agent.jobs import JobPolicy, ProcessJobRunner, check_job, job_environment
from headless_agent.nats_config import NatsConfigError, check_nats_settings
from headless_agent.simulate import SimulatedBackend


def job(env: dict[str, str] | None = None, argv: list[str] | None = None) -> JobSpec:
    return JobSpec(id="j-env", argv=argv or ["/bin/true"], gpus=[0], env=env)


POLICY = JobPolicy(allow_jobs=True, allowed_commands=("/bin/true", "python"))

# Each of these makes an allowlisted program load or run code of the requester's choice
# (or changes which GPUs / which program the job gets).
REFUSED = [
    "LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "LD_BIND_NOW", "LD_DEBUG_OUTPUT", "DYLD_INSERT_LIBRARIES",
    "GCONV_PATH", "GLIBC_TUNABLES", "LOCPATH", "NLSPATH", "HOSTALIASES", "MALLOC_TRACE",
    "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONWARNINGS", "PYTHONBREAKPOINT",
    "PYTHONSOMETHINGNEW", "BASH_ENV", "ENV", "SHELLOPTS", "PS4", "HOME",
    "NODE_OPTIONS", "PERL5OPT", "PERL5LIB", "RUBYOPT", "RUBYLIB", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS", "LUA_INIT", "OPENSSL_CONF", "GIT_SSH_COMMAND", "CUDA_INJECTION64_PATH",
    "NCCL_NET_PLUGIN", "EDITOR",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "PATH",
    "AETHER_JOB_ID", "AETHER_NATS_PASSWORD",
]


@pytest.mark.parametrize("name", REFUSED)
def test_loader_and_interpreter_hooks_are_refused_by_name(name: str) -> None:
    with pytest.raises(BackendError, match=f"may not set {name}:"):
        check_job(job({name: "/tmp/evil.so"}), POLICY, 1)


@pytest.mark.parametrize("name", ["EPOCHS", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "HF_HOME", "NCCL_DEBUG",
                                  "OMP_NUM_THREADS", "TMPDIR", "WANDB_MODE", "CUDA_LAUNCH_BLOCKING"])
def test_ordinary_variables_pass_by_default(name: str) -> None:
    check_job(job({name: "1"}), POLICY, 1)


def test_an_operator_may_open_a_hook_on_top_of_the_defaults_but_never_the_agents_own() -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=("/bin/true",),
                       allowed_env=("PYTHONPATH", "LD_LIBRARY_PATH"))
    # The hooks allowed, and ordinary variables still pass without being listed.
    check_job(job({"PYTHONPATH": "/opt/src", "LD_LIBRARY_PATH": "/opt/cuda/lib64", "OMP_NUM_THREADS": "8"}),
              policy, 1)
    with pytest.raises(BackendError, match=r"may not set VK_ICD_FILENAMES: .*--allow-env"):
        check_job(job({"VK_ICD_FILENAMES": "/tmp/x.json"}), policy, 1)
    with pytest.raises(BackendError, match="may not set LD_AUDIT"):
        check_job(job({"LD_AUDIT": "x.so"}), policy, 1)
    assert env_refusal("CUDA_DEVICE_ORDER", ("CUDA_DEVICE_ORDER",)) is not None


def test_allow_env_flag_is_checked_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_allowed_env(["EPOCHS", "PYTHONPATH", "LD_LIBRARY_PATH"]) == ["PYTHONPATH", "LD_LIBRARY_PATH"]
    for bad in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PATH", "AETHER_NATS_TOKEN", "A-B"):
        with pytest.raises(ValueError, match="--allow-env"):
            check_allowed_env([bad])
    assert cli.main(["--simulate", "1", "--allow-env", "CUDA_VISIBLE_DEVICES"]) == 2
    assert "the agent sets it" in capsys.readouterr().err


async def test_run_job_with_ld_audit_is_refused_naming_the_variable(tmp_path: Path) -> None:
    """The reviewer's reproduction: LD_AUDIT made an allowlisted /bin/true load a library."""
    policy = JobPolicy(allow_jobs=True, allowed_commands=("/bin/true",), log_dir=tmp_path)
    runner = ProcessJobRunner(policy, 1)
    h = CommandHandler(SimulatedBackend(1, seed=1), runner, policy, lambda kind, **f: None, lambda: {},
                       lambda: 1000.0)
    cmd = {"v": 1, "id": "c-audit", "op": "run_job",
           "job": {"id": "j-audit", "argv": ["/bin/true"], "gpus": [0], "env": {"LD_AUDIT": str(tmp_path / "x.so")}}}
    rep = decode_reply(await h.handle(json.dumps(cmd).encode()))
    assert not rep.ok and "LD_AUDIT" in (rep.error or "")
    assert not runner.running and not (tmp_path / "j-audit.log").exists()


# ------------------------------------------------------------------ CUDA numbering


def test_cuda_numbers_gpus_in_the_pci_order_nvml_uses() -> None:
    env = job_environment(job(), base={"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "HOME": "/root"})
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "0"


async def test_a_real_job_sees_the_pci_bus_order(tmp_path: Path) -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path)
    runner = ProcessJobRunner(policy, 2)
    script = "import os; print(os.environ['CUDA_DEVICE_ORDER'], os.environ['CUDA_VISIBLE_DEVICES'])"
    await runner.start(JobSpec(id="j-order", argv=[sys.executable, "-c", script], gpus=[1]))
    for _ in range(200):
        if runner.poll():
            break
        await asyncio.sleep(0.05)
    assert (tmp_path / "j-order.log").read_text().strip() == "PCI_BUS_ID 1"


# ------------------------------------------------------------------ NATS settings that cannot work


def user_seed() -> bytes:
    return bytes(nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_USER))


def test_a_good_nkey_seed_and_creds_file_pass(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_bytes(user_seed() + b"\n")
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0eXAi.eyJqdGki.sig\n------END NATS USER JWT------\n\n"
                     f"-----BEGIN USER NKEY SEED-----\n{user_seed().decode()}\n------END USER NKEY SEED------\n")
    check_nats_settings(NatsSettings(nkey_seed_file=seed))
    check_nats_settings(NatsSettings(creds_file=creds))


def test_nkeys_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = tmp_path / "user.nk"
    seed.write_bytes(user_seed())
    monkeypatch.setitem(sys.modules, "nkeys", None)  # what a venv without the package sees
    with pytest.raises(NatsConfigError, match=r"needs the 'nkeys' package.*nats-py\[nkeys\]"):
        check_nats_settings(NatsSettings(nkey_seed_file=seed))


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read it"),
    (b"", "holds no nkey seed"),
    (b"not-a-seed", "not a valid nkey seed"),
    (b"account", "not a user seed"),
])
def test_a_bad_nkey_file_is_a_clear_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    seed = tmp_path / "user.nk"
    if content == b"account":
        content = bytes(nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_ACCOUNT))
    if content is not None:
        seed.write_bytes(content)
    with pytest.raises(NatsConfigError, match=f"--nats-nkey .*{message}"):
        check_nats_settings(NatsSettings(nkey_seed_file=seed))


def test_a_creds_file_without_jwt_is_a_clear_error(tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    # nats-py would loop for ever looking for the JWT in this file.
    creds.write_text(f"-----BEGIN USER NKEY SEED-----\n{user_seed().decode()}\n------END USER NKEY SEED------\n")
    with pytest.raises(NatsConfigError, match="has no user JWT"):
        check_nats_settings(NatsSettings(creds_file=creds))


@pytest.mark.parametrize("newline, indent", [("\r\n", ""), ("\n", "  ")])
def test_a_creds_file_nats_py_cannot_read_is_a_clear_error(tmp_path: Path, newline: str, indent: str) -> None:
    # nats-py reads the seed line byte for byte: a '\r' or blanks make every connect fail.
    creds = tmp_path / "user.creds"
    text = ("-----BEGIN NATS USER JWT-----\neyJ0eXAi.eyJqdGki.sig\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{indent}{user_seed().decode()}\n------END USER NKEY SEED------\n")
    creds.write_bytes(text.replace("\n", newline).encode())
    with pytest.raises(NatsConfigError, match="Windows line endings"):
        check_nats_settings(NatsSettings(creds_file=creds))


def test_unloadable_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(NatsConfigError, match="cannot load the TLS files"):
        check_nats_settings(NatsSettings(tls_ca=tmp_path / "ca.pem"))
    with pytest.raises(NatsConfigError, match="cannot load the TLS files"):
        check_nats_settings(NatsSettings(tls_cert=tmp_path / "missing.pem"))


def test_the_agent_exits_at_start_on_a_bad_nkey_instead_of_retrying(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--simulate", "1", "--nats-nkey", str(tmp_path / "missing.nk")]) == 2
    err = capsys.readouterr().err
    assert "aether-agent: --nats-nkey" in err and "missing.nk" in err


def test_the_agents_own_install_brings_nkeys() -> None:
    """--nats-nkey and --nats-creds need nkeys, which nats-py imports only when they are used."""
    import tomllib

    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("nats-py[nkeys]") for d in deps), deps
