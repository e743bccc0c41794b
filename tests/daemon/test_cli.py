"""The `atoll` console script, run as a real subprocess against a real state directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import snapshot_tree

ATOLL = str(Path(sys.executable).with_name("atoll"))
TOKEN_RE = re.compile(r"^atoll_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")


def atoll(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `atoll ARGS` with no ATOLL_* variables inherited from the test's environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ATOLL_")}
    return subprocess.run([ATOLL, *map(str, args)], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})}, check=False)


def assert_clean_failure(r: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """Exit `code`, a readable message naming `fragments` on stderr, no traceback, nothing on stdout."""
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    for frag in fragments:
        assert frag in r.stderr, r.stderr


def rows(state: Path, sql: str) -> list[tuple[Any, ...]]:
    """Query the state DB the CLI wrote."""
    with sqlite3.connect(state / "atoll.db") as conn:
        return conn.execute(sql).fetchall()


def audit(state: Path) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(actor, action, outcome, detail) of every audit row, oldest first."""
    return [(a, b, c, json.loads(d)) for a, b, c, d in
            rows(state, "SELECT principal, action, outcome, detail FROM audit_chain ORDER BY seq")]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """An empty state directory."""
    d = tmp_path / "state"
    d.mkdir()
    return d


# -- tokens -----------------------------------------------------------------------------------


def test_token_create_prints_only_the_token(state: Path) -> None:
    r = atoll("token", "create", "--role", "user", "--name", "ci-bot", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    assert TOKEN_RE.fullmatch(r.stdout.rstrip("\n")), r.stdout
    assert r.stdout.count("\n") == 1
    assert rows(state, "SELECT name, role, revoked FROM tokens") == [("ci-bot", "user", None)]
    assert audit(state) == [("local-admin", "token.create", "ok", {"name": "ci-bot", "role": "user"})]


def test_token_list_shows_names_and_roles_never_secrets(state: Path) -> None:
    tokens = {}
    for name, role in [("alice", "user"), ("ops", "admin")]:
        r = atoll("token", "create", "--role", role, "--name", name, "--state-dir", state)
        assert r.returncode == 0, r.stderr
        tokens[name] = r.stdout.strip()
    r = atoll("token", "list", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "CREATED", "REVOKED"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["alice", "user"], ["ops", "admin"]]
    assert [ln.split()[3] for ln in lines[1:]] == ["-", "-"]
    for tok in tokens.values():
        m = TOKEN_RE.fullmatch(tok)
        assert m
        secret = m.group(2)
        assert secret not in r.stdout
        assert hashlib.sha256(secret.encode()).hexdigest() not in r.stdout
        # nor anywhere in the audit log
        assert all(secret not in json.dumps(row) for row in audit(state))


def test_token_revoke(state: Path) -> None:
    assert atoll("token", "create", "--role", "admin", "--name", "old", "--state-dir", state).returncode == 0
    r = atoll("token", "revoke", "old", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    assert "revoked old" in r.stdout
    [(revoked,)] = rows(state, "SELECT revoked FROM tokens WHERE name = 'old'")
    assert revoked
    listed = atoll("token", "list", "--state-dir", state).stdout.splitlines()[1].split()
    assert listed[0] == "old" and listed[3] != "-"
    assert [a[1] for a in audit(state)] == ["token.create", "token.revoke"]
    assert audit(state)[1][3] == {"name": "old"}


def test_duplicate_token_name_fails_and_changes_nothing(state: Path) -> None:
    first = atoll("token", "create", "--role", "user", "--name", "dup", "--state-dir", state)
    assert first.returncode == 0
    before = (rows(state, "SELECT * FROM tokens"), rows(state, "SELECT * FROM audit_chain"))
    r = atoll("token", "create", "--role", "admin", "--name", "dup", "--state-dir", state)
    assert_clean_failure(r, 1, "'dup'", "already exists")
    assert (rows(state, "SELECT * FROM tokens"), rows(state, "SELECT * FROM audit_chain")) == before


def test_bad_role_is_a_usage_error(state: Path) -> None:
    r = atoll("token", "create", "--role", "root", "--name", "x", "--state-dir", state)
    assert_clean_failure(r, 2, "--role", "invalid choice", "'root'")
    assert not (state / "atoll.db").exists()


def test_bad_token_name(state: Path) -> None:
    r = atoll("token", "create", "--role", "user", "--name", "has space", "--state-dir", state)
    assert_clean_failure(r, 1, "bad token name")
    assert rows(state, "SELECT * FROM tokens") == []


def test_revoke_unknown_name(state: Path) -> None:
    r = atoll("token", "revoke", "ghost", "--state-dir", state)
    assert_clean_failure(r, 1, "no token named 'ghost'")
    assert audit(state) == []


# -- models -----------------------------------------------------------------------------------


def test_models_add_then_list(state: Path, smollm2_path: Path) -> None:
    r = atoll("models", "add", smollm2_path, "--state-dir", state)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    assert f"sha256-{digest}" in r.stdout and "Q4_1" in r.stdout
    assert (state / "blobs" / f"sha256-{digest}").stat().st_size == smollm2_path.stat().st_size
    assert list((state / "staging").iterdir()) == []

    [(actor, action, outcome, detail)] = audit(state)
    assert (actor, action, outcome) == ("local-admin", "model.add", "ok")
    assert detail == {"family": "smollm2-135m", "digest": digest, "size": smollm2_path.stat().st_size,
                      "source": str(smollm2_path)}

    r = atoll("models", "list", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    header, *lines = r.stdout.splitlines()
    assert header.split()[:7] == ["MODEL", "QUANT", "ARCH", "PARAMS", "LAYERS", "CTX", "CHAT"]
    [line] = lines
    fam, quant, arch, params, layers, ctx, chat, _size, dig, status = line.split()
    assert (fam, quant, arch, params, layers, ctx, chat, status) == (
        "smollm2-135m", "Q4_1", "llama", "135M", "30", "8192", "yes", "ok")
    assert dig == f"sha256-{digest[:12]}"

    r = atoll("models", "list", "--json", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    [v] = data["smollm2-135m"]
    assert v["digest"] == digest and v["task"] == "generate" and v["broken"] is None
    g = v["gguf"]
    assert (g["architecture"], g["quantization"], g["layers"], g["context_length"], g["chat_template"]) == (
        "llama", "Q4_1", 30, 8192, True)


def test_models_list_empty(state: Path) -> None:
    r = atoll("models", "list", "--state-dir", state)
    assert r.returncode == 0 and "no models" in r.stdout
    assert json.loads(atoll("models", "list", "--json", "--state-dir", state).stdout) == {}


def _bad_inputs(tmp_path: Path, smollm2_path: Path) -> dict[str, tuple[list[str | Path], list[str]]]:
    text = tmp_path / "notes.gguf"
    text.write_text("these are not the weights you are looking for\n" * 10)
    truncated = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as f:
        truncated.write_bytes(f.read(4 << 20))  # the whole header, a little of the tensor data
    missing = tmp_path / "missing.gguf"
    return {
        "non-gguf": ([text], [str(text), "not a GGUF file"]),
        "truncated": ([truncated], [str(truncated), "truncated"]),
        "missing": ([missing], [str(missing), "No such file"]),
        "bad family": ([smollm2_path, "--family", "My Model"], ["bad family name 'My Model'"]),
    }


@pytest.mark.parametrize("case", ["non-gguf", "truncated", "missing", "bad family"])
def test_models_add_bad_input_leaves_store_unchanged(case: str, tmp_path: Path, state_dir: Path,
                                                     smollm2_path: Path) -> None:
    args, fragments = _bad_inputs(tmp_path, smollm2_path)[case]
    before = snapshot_tree(state_dir)
    catalog = (state_dir / "catalog.json").read_bytes()
    r = atoll("models", "add", *args, "--state-dir", state_dir)
    assert_clean_failure(r, 1, *fragments)
    assert snapshot_tree(state_dir) == before
    assert (state_dir / "catalog.json").read_bytes() == catalog
    assert not (state_dir / "atoll.db").exists() or [a for a in audit(state_dir) if a[1] == "model.add"] == []


def test_models_add_from_config_file_state_dir(tmp_path: Path, smollm2_path: Path) -> None:
    state = tmp_path / "from-config"
    cfg = tmp_path / "atoll.toml"
    cfg.write_text(f'state_dir = "{state}"\n')
    r = atoll("models", "add", smollm2_path, "--family", "smol", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert list(json.loads(atoll("models", "list", "--json", "--config", cfg).stdout)) == ["smol"]


# -- serve: bad settings fail before anything starts -----------------------------------------


def test_serve_bad_port(tmp_path: Path) -> None:
    r = atoll("serve", "--port", "abc", "--state-dir", tmp_path / "s")
    assert_clean_failure(r, 1, "'port'", "'abc'", "--port")
    assert not (tmp_path / "s").exists()


def test_serve_invalid_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [unclosed\n")
    r = atoll("serve", "--config", bad, "--state-dir", tmp_path / "s")
    assert_clean_failure(r, 1, str(bad), "not valid TOML")
    assert not (tmp_path / "s").exists()


def test_serve_bad_value_in_env(tmp_path: Path) -> None:
    r = atoll("serve", "--state-dir", tmp_path / "s", env={"ATOLL_QUEUE_SIZE": "-3"})
    assert_clean_failure(r, 1, "ATOLL_QUEUE_SIZE", "'queue_size'")


def test_serve_non_utf8_config(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'host = "caf\xe9"\n')
    r = atoll("serve", "--config", bad, "--state-dir", tmp_path / "s")
    assert_clean_failure(r, 1, str(bad))


# -- help -------------------------------------------------------------------------------------

HELP = [
    ([], ["serve", "models", "token", "status"]),
    (["serve"], ["--config", "--port", "--host", "--state-dir", "--queue-size", "--log-prompts", "ATOLL_PORT"]),
    (["models"], ["add", "list"]),
    (["models", "add"], ["FILE.gguf", "--family", "--task", "--state-dir", "--config"]),
    (["models", "list"], ["--json", "--state-dir", "--config"]),
    (["token"], ["create", "list", "revoke"]),
    (["token", "create"], ["--role", "--name", "user", "admin", "--state-dir"]),
    (["token", "list"], ["--state-dir", "--config"]),
    (["token", "revoke"], ["name", "--state-dir"]),
    (["status"], ["--url", "--token", "--json"]),
]


@pytest.mark.parametrize(("cmd", "mentions"), HELP, ids=[" ".join(c) or "atoll" for c, _ in HELP])
def test_help(cmd: list[str], mentions: list[str]) -> None:
    r = atoll(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: atoll")
    for m in mentions:
        assert m in r.stdout, m


def test_no_command_is_a_usage_error() -> None:
    r = atoll()
    assert r.returncode == 2
    assert "usage: atoll" in r.stderr and "Traceback" not in r.stderr
