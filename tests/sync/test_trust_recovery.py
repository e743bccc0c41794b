"""No single signed mistake bricks updates: far-future dates, huge sequences, loose field types.

A bundle dated in the future raises the time floor only to the box's clock plus the
tolerance; the signer-side tools refuse it; a root with `reset_floors` recovers a box whose
floors a signer's mistake (or an older atoll) pushed out of reach. Manifest, root and
policy fields are checked exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sync.builder import check_bundle, create_bundle, sign_bundle
from sync.errors import BundleRejected
from sync.state import SyncState
from sync.verify import DEFAULT_CLOCK_TOLERANCE
from tests.sync.conftest import Box
from tests.sync.helpers import DAY, POLICY, snapshot, write_json
from tests.sync.test_refusals import refused, rewrite_manifest

YEAR_2100 = 4102444800.0  # 2100-01-01T00:00:00Z


def future_bundle(box: Box, name: str, seq: int) -> Path:
    """A validly signed bundle whose `created` is in 2100 (an admin laptop with a wrong clock)."""
    stick = box.bundle(name, seq)
    rewrite_manifest(stick, box.kr.bundle_keys[:2], created="2100-01-01T00:00:00Z", expires="2100-06-01T00:00:00Z")
    return stick


async def test_future_dated_bundle_does_not_block_later_updates(installed: Box) -> None:
    box = installed
    assert (await box.manager().import_bundle(future_bundle(box, "b2", 2))).status == "installed"
    floor = SyncState.load(box.state_dir).newest_created
    assert floor <= box.now + DEFAULT_CLOCK_TOLERANCE, "the time floor moved past the clock + tolerance"
    # the next ordinary bundle, dated now and expiring in 30 days, still installs (was root_expired)
    assert (await box.manager().import_bundle(box.bundle("b3", 3))).status == "installed"
    # and the floor still protects against the clock being set back
    stick = box.bundle("b4", 4, created=box.now - 10 * DAY, expires=box.now - DAY / 2)
    await refused(box, stick, "bundle_expired", config=box.config(clock=lambda: 0.0))


async def test_the_floor_rises_with_the_clock_not_past_it(installed: Box) -> None:
    box = installed
    box.now += 3 * DAY  # the box's clock moves on; a bundle dated 10 days ahead of it raises the floor to now + 1 day
    stick = box.bundle("b2", 2)
    rewrite_manifest(stick, box.kr.bundle_keys[:2],
                     created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(box.now + 10 * DAY)))
    await box.manager().import_bundle(stick)
    assert SyncState.load(box.state_dir).newest_created == box.now + DEFAULT_CLOCK_TOLERANCE


def test_signer_tools_refuse_a_bundle_dated_in_the_future(box: Box) -> None:
    stick = future_bundle(box, "bf", 2)
    sigs = (stick / "ATOLL" / "bundle.json.sigs").read_bytes()
    with pytest.raises(BundleRejected) as ei:
        sign_bundle(stick, box.kr.bundle_keys[2])
    assert ei.value.code == "created_in_future" and "2100-01-01T00:00:00Z" in ei.value.message
    assert (stick / "ATOLL" / "bundle.json.sigs").read_bytes() == sigs  # nothing signed
    before = snapshot(box.state_dir)
    with pytest.raises(BundleRejected) as ei:
        check_bundle(stick, state_dir=box.state_dir, config=box.config())
    assert ei.value.code == "created_in_future"
    assert snapshot(box.state_dir) == before
    pol = box.work / "p.toml"
    pol.write_text(POLICY)
    with pytest.raises(BundleRejected) as ei:
        create_bundle(box.work / "bc", models={"tiny": [box.gguf("c")]}, policy=pol, sequence=3,
                      expires=YEAR_2100 + DAY, created=YEAR_2100)
    assert ei.value.code == "created_in_future"
    assert not (box.work / "bc").exists()


# -- recovery by the site's root keys ------------------------------------------------------

def reset_root(box: Box, version: int = 2) -> Path:
    """Root `version`, same keys, `reset_floors`, signed by the root keys (old and new threshold)."""
    kr = box.kr
    doc = kr.root_doc(version, kr.root_keys, kr.bundle_keys, signers=[])
    doc["signed"]["reset_floors"] = True
    from sync.roots import sign_root_document

    for k in kr.root_keys[:2]:
        sign_root_document(doc, k)
    return write_json(box.work / "roots" / f"{version}.root.json", doc)


async def test_huge_sequence_recovered_by_a_reset_root(installed: Box) -> None:
    box = installed
    huge = box.bundle("huge", 2**53)
    assert (await box.manager().import_bundle(huge)).status == "installed"
    await refused(box, box.bundle("b2", 2), "sequence_replay")
    rp = reset_root(box)
    res = await box.manager().import_bundle(box.bundle("r1", 1, root_chain=(rp,), root_version=2))
    assert res.status == "installed" and res.sequence == 1
    st = SyncState.load(box.state_dir)
    assert st.highest_sequence == 1 and st.current == 1
    # nothing signed before the reset can be replayed: it names root v1
    await refused(box, huge, "root_version_mismatch")
    await refused(box, box.work / "b2", "root_version_mismatch")
    # the reset happens once: the same root carried again does not reset a second time
    assert (await box.manager().import_bundle(box.bundle("r5", 5, root_chain=(rp,), root_version=2))).status \
        == "installed"
    await refused(box, box.work / "r1", "sequence_replay")


async def test_poisoned_time_floor_recovered_by_a_reset_root(installed: Box) -> None:
    box = installed
    st = SyncState.load(box.state_dir)  # as an older atoll left it after a bundle dated 2100
    st.newest_created = YEAR_2100
    st.save(box.state_dir)
    await refused(box, box.bundle("b2", 2), "root_expired")
    rp = reset_root(box)
    res = await box.manager().import_bundle(box.bundle("r2", 2, root_chain=(rp,), root_version=2))
    assert res.status == "installed"
    assert SyncState.load(box.state_dir).newest_created <= box.now + DEFAULT_CLOCK_TOLERANCE


async def test_reset_root_needs_the_old_root_keys(installed: Box) -> None:
    box = installed
    kr = box.kr
    new_root = kr.new_keys("mallory-root", 2)
    doc = kr.root_doc(2, new_root, kr.bundle_keys, signers=[])
    doc["signed"]["reset_floors"] = True
    from sync.roots import sign_root_document

    for k in new_root:
        sign_root_document(doc, k)
    rp = write_json(box.work / "evil" / "2.root.json", doc)
    await refused(box, box.bundle("r1", 1, root_chain=(rp,), root_version=2), "root_not_signed_by_old")


# -- exact types and timestamps ------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"schema": True}, {"schema": 1.0}, {"schema": "1"},
    {"created": "2026-11-25"}, {"created": "2026-11-25Z"}, {"expires": "2099-01-01T00:00:00+14:00Z"},
    {"expires": "2099-01-01T00:00:00.5Z"}, {"expires": "2099-01-01t00:00:00z"}, {"expires": "2099-01-01 00:00:00Z"},
    {"expires": "2099-02-30T00:00:00Z"}, {"sequence": 2.0}, {"sequence": True}, {"root_version": True},
])
async def test_manifest_fields_are_checked_exactly(installed: Box, changes: dict[str, object]) -> None:
    stick = installed.bundle("b2", 2)
    rewrite_manifest(stick, installed.kr.bundle_keys[:2], **changes)
    await refused(installed, stick, "bad_manifest")


@pytest.mark.parametrize("mutate", [
    lambda s: s.update(expires="2099-01-01T00:00:00+14:00Z"),
    lambda s: s.update(expires="2099-01-01"),
    lambda s: s.update(version=True),
    lambda s: s.update(version=2.0),
    lambda s: s["roles"]["root"].update(threshold=True),
    lambda s: s.update(reset_floors="yes"),
    lambda s: s.update(reset_floors=1),
])
async def test_root_fields_are_checked_exactly(installed: Box, mutate) -> None:
    box = installed
    kr = box.kr
    doc = kr.root_doc(2, kr.root_keys, kr.bundle_keys, signers=[])
    mutate(doc["signed"])
    from sync.fsutil import canonical_json

    doc["signatures"] = [k.sign(canonical_json(doc["signed"])) for k in kr.root_keys[:2]]
    stick = box.bundle("b2", 2, root_version=2)  # the admin tools refuse such a root, so place it by hand
    write_json(stick / "ATOLL" / "root" / "2.root.json", doc)
    await refused(box, stick, "malformed_root")


@pytest.mark.parametrize("schema", ["true", "1.0", '"1"'])
def test_policy_schema_is_exactly_the_integer_one(schema: str) -> None:
    from sync.policy import parse_policy

    with pytest.raises(BundleRejected) as ei:
        parse_policy(POLICY.replace("schema = 1", f"schema = {schema}", 1).encode())
    assert ei.value.code == "bad_policy" and "schema" in ei.value.message
    assert parse_policy(POLICY.encode()).max_tokens > 0

