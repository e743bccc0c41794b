"""The admin CLI end to end: keys, trust, bundle create/sign/verify, import, rollback."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sync.cli import main
from sync.state import read_current_release
from tests.sync.helpers import POLICY, write_gguf


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path | int) -> dict:
    """Run the CLI, require success, return its JSON output."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_admin_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, state = tmp_path / "keys", tmp_path / "state"
    ids = {n: run(capsys, "keys", "generate", n, "--out", keys)["keyid"] for n in ("r1", "r2", "b1", "b2")}
    priv = keys / "b1.key"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_text() not in json.dumps(ids)
    run(capsys, "trust", "init", "--root-key", keys / "r1.pub.json", "--root-key", keys / "r2.pub.json",
        "--root-threshold", "2", "--bundle-key", keys / "b1.pub.json", "--bundle-key", keys / "b2.pub.json",
        "--bundle-threshold", "2", "--expires", "365d", "--sign", keys / "r1.key", "--sign", keys / "r2.key",
        "--out", tmp_path / "1.root.json", "--install", "--state-dir", state)
    assert (state / "trust" / "root.json").is_file()
    pol = tmp_path / "policy.toml"
    pol.write_text(POLICY)
    for seq in (1, 2):
        g = write_gguf(tmp_path / f"m{seq}.gguf", salt=f"cli{seq}")
        out = tmp_path / f"bundle{seq}"
        run(capsys, "bundle", "create", "--model", f"tiny={g}", "--policy", pol, "--sequence", seq,
            "--expires", "30d", "--out", out, "--root", tmp_path / "1.root.json")
        run(capsys, "bundle", "sign", out, "--key", keys / "b1.key")
        assert main(["bundle", "verify", str(out), "--root", str(tmp_path / "1.root.json")]) == 1
        assert "threshold_not_met" in capsys.readouterr().err
        run(capsys, "bundle", "sign", out, "--key", keys / "b2.key")
        rep = run(capsys, "bundle", "verify", out, "--root", tmp_path / "1.root.json")
        assert rep["signers"] == sorted([ids["b1"], ids["b2"]])
        res = run(capsys, "import", out, "--state-dir", state, "--quiet")
        assert res["status"] == "installed" and res["sequence"] == seq
    assert run(capsys, "rollback", "--state-dir", state)["current"] == 1
    rel = read_current_release(state)
    assert rel is not None and rel.sequence == 1


def test_rotation_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    for n in ("old", "new", "b"):
        run(capsys, "keys", "generate", n, "--out", keys)
    run(capsys, "trust", "init", "--root-key", keys / "old.pub.json", "--bundle-key", keys / "b.pub.json",
        "--expires", "365d", "--sign", keys / "old.key", "--out", tmp_path / "1.root.json")
    rep = run(capsys, "trust", "rotate", "--from", tmp_path / "1.root.json",
              "--root-key", keys / "new.pub.json", "--bundle-key", keys / "b.pub.json",
              "--expires", "365d", "--sign", keys / "new.key",
              "--out", tmp_path / "2.root.json")
    assert rep["signatures"]["new"] == "threshold met" and rep["signatures"]["old"] != "threshold met"
    run(capsys, "trust", "sign", tmp_path / "2.root.json", "--key", keys / "old.key")
    from sync.roots import check_successor, parse_root

    check_successor(parse_root((tmp_path / "1.root.json").read_bytes()),
                    parse_root((tmp_path / "2.root.json").read_bytes()), what="2")


def test_private_key_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keys", "generate", "k", "--out", tmp_path)
    before = (tmp_path / "k.key").read_bytes()
    assert main(["keys", "generate", "k", "--out", str(tmp_path)]) == 1
    assert (tmp_path / "k.key").read_bytes() == before
    os.chmod(tmp_path / "k.key", 0o644)
    from sync.errors import TrustError
    from sync.keys import load_signing_key

    with pytest.raises(TrustError):
        load_signing_key(tmp_path / "k.key")


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["keys", "generate"], ["bundle", "create"], ["bundle", "sign"], ["bundle", "verify"],
                 ["trust", "init"], ["trust", "rotate"], ["trust", "sign"], ["import"], ["rollback"]):
        with pytest.raises(SystemExit) as ei:
            main([*argv, "--help"])
        assert ei.value.code == 0
        assert "usage:" in capsys.readouterr().out
