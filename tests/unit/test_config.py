"""Station configuration: file < environment < flags, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from aether_desktop.app import build_parser
from aether_desktop.config import ConfigError, StationConfig, from_args


def load(argv: list[str], env: dict[str, str] | None = None) -> StationConfig:
    return from_args(build_parser().parse_args(argv), env or {})


def test_defaults_are_embedded_everything(tmp_path: Path) -> None:
    cfg = load(["--config", str(_write(tmp_path, ""))])
    assert cfg.embedded_nats and cfg.embedded_db and cfg.embedded_listen == "127.0.0.1"
    assert cfg.subject_prefix == "aether" and cfg.demo_hosts == 0


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, 'nats_servers = ["nats://file:4222"]\ndemo_hosts = 2\nsubject_prefix = "site"\n'
                            'db_dsn = "postgresql://file/db"\nretention_raw_days = 7\n')
    cfg = load(["--config", str(path)])
    assert cfg.nats_servers == ("nats://file:4222",) and cfg.demo_hosts == 2 and cfg.retention_raw_days == 7.0
    cfg = load(["--config", str(path)], {"AETHER_NATS": "env1:4222,env2:4222", "AETHER_DEMO": "3"})
    assert cfg.nats_servers == ("nats://env1:4222", "nats://env2:4222") and cfg.demo_hosts == 3
    cfg = load(["--config", str(path), "--nats", "nats://flag:4222", "--demo", "5", "--db", "postgresql://flag/db"],
               {"AETHER_NATS": "env1:4222", "AETHER_DB_DSN": "postgresql://env/db"})
    assert cfg.nats_servers == ("nats://flag:4222",) and cfg.demo_hosts == 5 and cfg.db_dsn == "postgresql://flag/db"
    assert cfg.subject_prefix == "site"


def test_aether_table_and_paths(tmp_path: Path) -> None:
    cfg = load(["--config", str(_write(tmp_path, '[aether]\ndata_dir = "~/x"\nno_db = true\n'))])
    assert cfg.data_dir == Path("~/x").expanduser() and cfg.no_db and not cfg.embedded_db


@pytest.mark.parametrize("text,needle", [
    ("nats_servers = [", "cannot read"),
    ("bogus_setting = 1", "unknown setting"),
    ("demo_hosts = 'many'", "demo_hosts"),
    ("subject_prefix = 'bad prefix'", "invalid subject prefix"),
    # Wrong types are errors, never silently something else.
    ("data_dir = 5", "data_dir.*path"),
    ("no_db = 'maybe'", "no_db.*true or false"),
    ("demo_hosts = 2.5", "demo_hosts.*whole number"),
    ("demo_hosts = true", "demo_hosts.*whole number"),
    ("subject_prefix = 7", "subject_prefix.*string"),
])
def test_bad_config_files_give_clear_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(["--config", str(_write(tmp_path, text))])


def test_well_typed_values_in_other_spellings_are_accepted(tmp_path: Path) -> None:
    cfg = load(["--config", str(_write(tmp_path, "no_db = 'yes'\ndemo_hosts = 2.0\nstream_max_age_h = 12\n"))])
    assert cfg.no_db and cfg.demo_hosts == 2 and cfg.stream_max_age_h == 12.0
    assert not load(["--config", str(_write(tmp_path, ""))], {"AETHER_DEMO": "0"}).demo_hosts


def test_bad_config_file_exits_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aether_desktop.app import main

    assert main(["--config", str(_write(tmp_path, "no_db = 'maybe'")), "--headless"]) == 2
    assert "no_db" in capsys.readouterr().err


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(["--config", str(tmp_path / "nope.toml")])


def test_listen_beyond_loopback_only_for_the_embedded_server(tmp_path: Path) -> None:
    cfg = load(["--config", str(_write(tmp_path, "")), "--listen", "0.0.0.0"])
    assert cfg.embedded_listen == "0.0.0.0"
    with pytest.raises(ConfigError, match="embedded"):
        load(["--config", str(_write(tmp_path, "")), "--listen", "0.0.0.0", "--nats", "nats://x:1"])
    with pytest.raises(ConfigError, match="--port"):
        load(["--config", str(_write(tmp_path, "")), "--port", "70000"])


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aether_desktop.app import main
    from headless_agent.cli import main as agent_main

    assert main(["--config", str(tmp_path / "missing.toml"), "--headless"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert agent_main(["--host-id", "bad host", "--simulate", "1"]) == 2
    assert agent_main(["--fault", "meteor:gpu=0", "--simulate", "1"]) == 2
    assert agent_main(["--fault", "fan_failure:gpu=0"]) == 2
    assert "needs --simulate" in capsys.readouterr().err


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p
