"""daemon/config.py: defaults, TOML < environment < flags, and a ConfigError naming key and source."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from daemon import config
from daemon.config import ConfigError, Settings


def _args(*argv: str) -> argparse.Namespace:
    """Parse flags with the same parser `atoll serve` builds from the schema."""
    ap = argparse.ArgumentParser()
    config.add_arguments(ap)
    return ap.parse_args(list(argv))


def _toml(tmp_path: Path, text: str, name: str = "atoll.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_when_nothing_is_given() -> None:
    s = config.load(None, environ={})
    assert s == Settings()
    assert s.port == 8080
    assert s.host == "0.0.0.0"
    assert s.state_dir == Path("/var/lib/atoll")
    assert s.queue_size == 16
    assert s.log_prompts is False
    assert s.log_level == "info"
    assert s.db_path == Path("/var/lib/atoll/atoll.db")


def test_defaults_with_an_empty_command_line() -> None:
    assert config.load(_args(), environ={}) == Settings()


def test_every_setting_has_help_and_a_flag() -> None:
    ap = argparse.ArgumentParser()
    config.add_arguments(ap)
    text = ap.format_help()
    for f in Settings.fields():
        assert f.metadata["help"]
        assert "--" + f.name.replace("_", "-") in text
        assert f"ATOLL_{f.name.upper()}" in text


def test_toml_overrides_defaults(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'port = 9000\nqueue-size = 3\nlog_prompts = true\nstate_dir = "/srv/atoll"\n'
                          "request_timeout = 30\n")
    s = config.load(_args("--config", str(cfg)), environ={})
    assert s.port == 9000
    assert s.queue_size == 3  # dashes in TOML keys are accepted
    assert s.log_prompts is True
    assert s.state_dir == Path("/srv/atoll")
    assert s.request_timeout == 30.0 and isinstance(s.request_timeout, float)
    assert s.host == "0.0.0.0"  # untouched settings keep their defaults


def test_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'port = 9000\nqueue_size = 3\nhost = "10.0.0.1"\nlog_level = "debug"\n')
    env = {"ATOLL_PORT": "9001", "ATOLL_QUEUE_SIZE": "4"}
    s = config.load(_args("--config", str(cfg), "--port", "9002"), environ=env)
    assert s.port == 9002  # flag beats env and file
    assert s.queue_size == 4  # env beats file
    assert s.host == "10.0.0.1"  # file beats default
    assert s.log_level == "debug"
    assert s.threads == Settings().threads  # default


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "port = 9100\n")
    assert config.load(None, environ={"ATOLL_CONFIG": str(cfg)}).port == 9100
    assert config.load(_args(), environ={"ATOLL_CONFIG": str(cfg)}).port == 9100


def test_bool_flags_and_env() -> None:
    assert config.load(_args("--log-prompts"), environ={}).log_prompts is True
    assert config.load(_args("--no-log-prompts"), environ={"ATOLL_LOG_PROMPTS": "yes"}).log_prompts is False
    for raw, want in [("1", True), ("TRUE", True), ("on", True), ("0", False), ("no", False), ("Off", False)]:
        assert config.load(None, environ={"ATOLL_LOG_PROMPTS": raw}).log_prompts is want


# (what is given, expected text in the message: the key and its source)
BAD: list[tuple[str, dict[str, str], list[str], str, list[str]]] = [
    # id, env, flags, toml text, fragments the message must contain
    ("port not an integer (flag)", {}, ["--port", "abc"], "", ["'port'", "--port", "'abc'"]),
    ("port not an integer (env)", {"ATOLL_PORT": "80a"}, [], "", ["'port'", "ATOLL_PORT", "'80a'"]),
    ("port not an integer (toml)", {}, [], 'port = "eighty"\n', ["'port'", "atoll.toml", "eighty"]),
    ("port a fraction (toml)", {}, [], "port = 80.5\n", ["'port'", "atoll.toml", "integer"]),
    ("port a bool (toml)", {}, [], "port = true\n", ["'port'", "atoll.toml", "integer"]),
    ("port zero (flag)", {}, ["--port", "0"], "", ["'port'", "--port", "at least 1"]),
    ("port zero (toml)", {}, [], "port = 0\n", ["'port'", "atoll.toml", "at least 1"]),
    ("queue_size negative (env)", {"ATOLL_QUEUE_SIZE": "-1"}, [], "",
     ["'queue_size'", "ATOLL_QUEUE_SIZE", "at least 1"]),
    ("queue_size negative (flag)", {}, ["--queue-size", "-5"], "", ["'queue_size'", "--queue-size", "at least 1"]),
    ("bad bool (env)", {"ATOLL_LOG_PROMPTS": "maybe"}, [], "", ["'log_prompts'", "ATOLL_LOG_PROMPTS", "maybe"]),
    ("bool as a string (toml)", {}, [], 'log_prompts = "sure"\n', ["'log_prompts'", "atoll.toml"]),
    ("log_level not a choice (flag)", {}, ["--log-level", "verbose"], "",
     ["'log_level'", "--log-level", "verbose", "debug, info, warning, error"]),
    ("log_level not a choice (env)", {"ATOLL_LOG_LEVEL": "trace"}, [], "", ["'log_level'", "ATOLL_LOG_LEVEL"]),
    ("host not a string (toml)", {}, [], "host = 5\n", ["'host'", "atoll.toml", "string"]),
    ("state_dir not a path (toml)", {}, [], "state_dir = 5\n", ["'state_dir'", "atoll.toml", "path"]),
    ("timeout not a number (env)", {"ATOLL_REQUEST_TIMEOUT": "soon"}, [], "",
     ["'request_timeout'", "ATOLL_REQUEST_TIMEOUT"]),
    ("timeout too small (toml)", {}, [], "request_timeout = 0.5\n", ["'request_timeout'", "at least 1"]),
    ("body limit too small (flag)", {}, ["--max-body-bytes", "10"], "", ["'max_body_bytes'", "at least 1024"]),
]


@pytest.mark.parametrize(("env", "flags", "toml", "fragments"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_value_names_key_and_source(tmp_path: Path, env: dict[str, str], flags: list[str], toml: str,
                                        fragments: list[str]) -> None:
    argv = list(flags)
    if toml:
        argv += ["--config", str(_toml(tmp_path, toml))]
    with pytest.raises(ConfigError) as ei:
        config.load(_args(*argv), environ=env)
    for frag in fragments:
        assert frag in ei.value.message


def test_unknown_key_in_toml(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "port = 9000\nprot = 9001\n")
    with pytest.raises(ConfigError) as ei:
        config.load(_args("--config", str(cfg)), environ={})
    msg = ei.value.message
    assert "'prot'" in msg and str(cfg) in msg
    assert "port" in msg.split("known:")[1]  # lists what would have been valid


def test_table_in_toml_is_an_unknown_key(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "[server]\nport = 9000\n")
    with pytest.raises(ConfigError, match="unknown setting 'server'"):
        config.load(_args("--config", str(cfg)), environ={})


def test_invalid_toml(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "port = = 9000\n")
    with pytest.raises(ConfigError) as ei:
        config.load(_args("--config", str(cfg)), environ={})
    assert str(cfg) in ei.value.message and "not valid TOML" in ei.value.message
    assert "line 1" in ei.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        config.load(_args("--config", str(missing)), environ={})
    assert str(missing) in ei.value.message and "No such file" in ei.value.message


def test_unreadable_config_file(tmp_path: Path) -> None:
    # The tests may run as root, which reads a mode-000 file; a directory is unreadable for everyone.
    d = tmp_path / "conf.d"
    d.mkdir()
    with pytest.raises(ConfigError) as ei:
        config.load(_args("--config", str(d)), environ={})
    assert str(d) in ei.value.message and "cannot read config file" in ei.value.message


def test_non_utf8_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes(b'host = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=str(cfg)):
        config.load(_args("--config", str(cfg)), environ={})


def test_port_above_65535() -> None:
    with pytest.raises(ConfigError, match="'port'"):
        config.load(_args("--port", "65536"), environ={})


def test_nan_timeout() -> None:
    with pytest.raises(ConfigError, match="'request_timeout'"):
        config.load(None, environ={"ATOLL_REQUEST_TIMEOUT": "nan"})


def test_config_error_is_a_bad_request() -> None:
    # The CLI catches AtollError and prints its message; a ConfigError must be one.
    from runtime.errors import AtollError

    assert issubclass(ConfigError, AtollError)


@pytest.mark.parametrize(("settings", "url"), [
    (Settings(), "http://127.0.0.1:8080"),
    (Settings(host="::", port=9000), "http://127.0.0.1:9000"),
    (Settings(host="", port=9000), "http://127.0.0.1:9000"),
    (Settings(host="192.168.1.20", port=8081), "http://192.168.1.20:8081"),
    (Settings(host="atoll.local"), "http://atoll.local:8080"),
    (Settings(public_url="https://atoll.lan/"), "https://atoll.lan"),
    (Settings(public_url="https://atoll.lan/api//", host="10.0.0.1", port=1), "https://atoll.lan/api"),
])
def test_url(settings: Settings, url: str) -> None:
    assert settings.url() == url


def test_public_url_from_env() -> None:
    s = config.load(None, environ={"ATOLL_PUBLIC_URL": "http://box.lan:80/"})
    assert s.url() == "http://box.lan:80"
