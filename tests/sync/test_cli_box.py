"""The `atoll` console script as a subprocess: recovery from a signer's mistake, the newest root by
default after a rotation, and the sync commands following the one settings schema.

Real keys, the real SmolLM2 model (each import loads it in a fresh worker for the smoke prompt).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.daemon.test_cli import assert_clean_failure, atoll
from tests.sync.helpers import POLICY, snapshot

SEA_POLICY = POLICY.replace('allowed_families = ["tiny", "tiny2"]', 'allowed_families = ["sea"]')


def ok(*args: str | Path, env: dict[str, str] | None = None) -> dict:
    """Run `atoll ARGS`, require exit 0, return its JSON output."""
    r = atoll(*args, env=env)
    assert r.returncode == 0, f"atoll {' '.join(map(str, args))}: {r.stderr}"
    return json.loads(r.stdout)


def box_files(state: Path) -> dict[str, tuple[str, str]]:
    """Everything an import may change (the audit database is expected to grow)."""
    return {k: v for k, v in snapshot(state).items() if not k.startswith("atoll.db")}


def refused(r: subprocess.CompletedProcess[str], code: str) -> None:
    """Exit 1 with the refusal code on stderr, no traceback."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"[{code}]" in r.stderr and "Traceback" not in r.stderr, r.stderr


class Site:
    """An admin workstation: keys, root documents in roots/, a policy, a model."""

    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp, self.model = tmp, model
        self.keys, self.roots = tmp / "keys", tmp / "roots"
        for name in ("root1", "release1"):
            ok("keys", "generate", name, "--out", self.keys)
        self.policy = tmp / "policy.toml"
        self.policy.write_text(SEA_POLICY)

    def root_args(self) -> list[str | Path]:
        return ["--root-key", self.keys / "root1.pub.json", "--bundle-key", self.keys / "release1.pub.json",
                "--expires", "365d", "--sign", self.keys / "root1.key"]

    def bundle(self, name: str, seq: int, *extra: str | Path, env: dict[str, str] | None = None) -> Path:
        """`bundle create --root roots/` (the newest root there) + `bundle sign`."""
        out = self.tmp / name
        made = ok("bundle", "create", "--model", f"sea={self.model}", "--policy", self.policy, "--sequence", str(seq),
                  "--expires", "30d", "--out", out, "--root", self.roots, *extra, env=env)
        assert made["root_version"] == max(int(p.name.split(".")[0]) for p in self.roots.glob("*.root.json"))
        ok("bundle", "sign", out, "--key", self.keys / "release1.key")
        return out


@pytest.mark.slow
def test_huge_sequence_recovered_with_a_reset_root_and_the_newest_root_by_default(
        tmp_path: Path, smollm2_path: Path) -> None:
    site = Site(tmp_path, smollm2_path)
    state = tmp_path / "state"
    env = {"ATOLL_STATE_DIR": str(state)}  # no --state-dir anywhere: the setting decides
    ok("trust", "init", *site.root_args(), "--out", site.roots / "1.root.json", "--install", env=env)
    assert (state / "trust" / "root.json").is_file()

    huge = site.bundle("huge", 2**53)
    assert ok("import", huge, "--quiet", env=env)["sequence"] == 2**53
    b2 = site.bundle("b2", 2)
    before = box_files(state)
    refused(atoll("import", b2, "--quiet", env=env), "sequence_replay")
    refused(atoll("bundle", "verify", b2, env=env), "sequence_replay")  # verify says what the box says
    assert box_files(state) == before

    # the root keys sign root v2 with reset_floors; no file on the box is touched by hand
    rot = ok("trust", "rotate", "--from", site.roots / "1.root.json", *site.root_args(), "--reset-floors",
             "--out", site.roots / "2.root.json")
    assert rot["reset_floors"] is True and rot["signatures"] == {"old": "threshold met", "new": "threshold met"}
    r1 = site.bundle("r1", 1, "--root-chain", site.roots / "2.root.json")  # --root roots/ -> v2
    assert ok("bundle", "verify", r1, env=env)["root_version"] == 2
    assert ok("import", r1, "--quiet", env=env)["sequence"] == 1
    assert json.loads((state / "sync-state.json").read_text())["highest_sequence"] == 1

    # bundles signed before the reset name root v1: no replay
    before = box_files(state)
    for old in (huge, b2):
        refused(atoll("import", old, "--quiet", env=env), "root_version_mismatch")
    assert box_files(state) == before
    # after the rotation `bundle create --root roots/` names v2 with no chain needed
    assert ok("import", site.bundle("b3", 3), "--quiet", env=env)["sequence"] == 3


def test_bundle_create_requires_the_root(tmp_path: Path, smollm2_path: Path) -> None:
    site = Site(tmp_path, smollm2_path)
    r = atoll("bundle", "create", "--model", f"sea={smollm2_path}", "--policy", site.policy, "--sequence", "1",
              "--expires", "30d", "--out", tmp_path / "b")
    assert_clean_failure(r, 1, "--root", "--root-version")
    assert not (tmp_path / "b").exists()


def test_future_dated_bundle_is_refused_by_sign_and_verify(tmp_path: Path, smollm2_path: Path) -> None:
    site = Site(tmp_path, smollm2_path)
    ok("trust", "init", *site.root_args(), "--out", site.roots / "1.root.json")
    b = site.bundle("b", 1)
    manifest = b / "ATOLL" / "bundle.json"
    doc = json.loads(manifest.read_text())
    doc["created"] = "2100-01-01T00:00:00Z"  # as a laptop with a wrong clock would have written it
    manifest.write_text(json.dumps(doc))
    sigs = (b / "ATOLL" / "bundle.json.sigs").read_bytes()
    r = atoll("bundle", "sign", b, "--key", site.keys / "release1.key")
    assert_clean_failure(r, 1, "created_in_future", "2100-01-01T00:00:00Z")
    assert (b / "ATOLL" / "bundle.json.sigs").read_bytes() == sigs


@pytest.fixture
def provisioned(tmp_path: Path, smollm2_path: Path) -> tuple[Site, Path, Path]:
    """A site, a box state dir and a settings file naming it with device class edge-x."""
    site = Site(tmp_path, smollm2_path)
    state = tmp_path / "box"
    cfg = tmp_path / "atoll.toml"
    cfg.write_text(f'state_dir = "{state}"\ndevice_class = "edge-x"\n')
    ok("trust", "init", *site.root_args(), "--out", site.roots / "1.root.json", "--install", "--config", cfg)
    return site, state, cfg


@pytest.mark.slow
def test_import_rollback_verify_follow_the_settings_file(provisioned: tuple[Site, Path, Path]) -> None:
    site, state, cfg = provisioned
    b1 = site.bundle("b1", 1, "--compatible", "edge-x")
    assert ok("bundle", "verify", b1, "--config", cfg)["sequence"] == 1
    assert ok("import", b1, "--quiet", "--config", cfg)["status"] == "installed"
    b2 = site.bundle("b2", 2, "--compatible", "edge-x")
    before = box_files(state)
    # the environment overrides the file, for import and verify alike
    for args in (("import", b2, "--quiet"), ("bundle", "verify", b2)):
        refused(atoll(*args, "--config", cfg, env={"ATOLL_DEVICE_CLASS": "edge-y"}), "incompatible_device")
        refused(atoll(*args, "--config", cfg, env={"ATOLL_PRODUCT": "toaster"}), "wrong_product")
    # the health-check timeout is a setting: far too short for a model to load -> undone
    refused(atoll("import", b2, "--quiet", "--config", cfg, env={"ATOLL_HEALTH_TIMEOUT": "0.1"}),
            "health_check_timeout")
    r = atoll("import", b2, "--quiet", "--config", cfg, env={"ATOLL_HEALTH_TIMEOUT": "soon"})
    assert_clean_failure(r, 1, "health_timeout", "soon")
    assert box_files(state) == before
    assert ok("import", b2, "--quiet", "--config", cfg)["sequence"] == 2
    assert ok("rollback", "--config", cfg)["current"] == 1
    assert json.loads((state / "sync-state.json").read_text())["current"] == 1
