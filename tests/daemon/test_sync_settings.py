"""The daemon's import paths (USB stick, admin upload) take product and device class from the same
settings as `atoll import`, so the box answers a bundle the same way whichever path it comes by."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.daemon.test_updates import SEA_POLICY, audit_actions, post_path, wait_models
from tests.sync.helpers import Keyring, make_bundle, snapshot, write_json


def provision(state_dir: Path, tmp_path: Path) -> Keyring:
    kr = Keyring(tmp_path / "keys")
    kr.root_keys, kr.bundle_keys = kr.new_keys("root", 2), kr.new_keys("bundle", 2)
    write_json(state_dir / "trust" / "root.json", kr.root_doc(1, kr.root_keys, kr.bundle_keys))
    return kr


def bundle_for_edge_x(state_dir: Path, tmp_path: Path, smollm2_path: Path) -> Path:
    kr = provision(state_dir, tmp_path)
    return make_bundle(tmp_path / "b1", kr, 1, {"sea": [smollm2_path]}, policy=SEA_POLICY, compatible=("edge-x",))


async def test_upload_refused_on_another_device_class(make_app, state_dir, tmp_path, smollm2_path) -> None:
    b = bundle_for_edge_x(state_dir, tmp_path, smollm2_path)
    app = await make_app()  # device_class defaults to "generic"
    before = {k: v for k, v in snapshot(state_dir).items() if not k.startswith("atoll.db")}
    r = await post_path(app, b)
    assert r.status == 400 and (await r.json())["error"]["code"] == "incompatible_device"
    assert {k: v for k, v in snapshot(state_dir).items() if not k.startswith("atoll.db")} == before


async def test_usb_stick_installed_when_the_device_class_setting_matches(make_app, state_dir, tmp_path,
                                                                        smollm2_path) -> None:
    b = bundle_for_edge_x(state_dir, tmp_path, smollm2_path)
    media = tmp_path / "media"
    media.mkdir()
    app = await make_app(usb_watch=True, media_dirs=str(media), device_class="edge-x")
    shutil.copytree(b, media / "STICK")  # the stick is mounted
    await wait_models(app, {"sea": "ready", "smollm2": "ready"}, timeout=60)
    assert any(a == "sync.import.installed" for _, a, _ in audit_actions(state_dir))
