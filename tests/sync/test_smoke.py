"""Happy paths: install, upgrade, already installed, rollback, release layout."""

from __future__ import annotations

import os

from sync.state import SyncState, read_current_release
from tests.sync.conftest import Box


async def test_first_import_installs_release(installed: Box) -> None:
    sd = installed.state_dir
    rel = read_current_release(sd)
    assert rel is not None and rel.sequence == 1
    assert os.readlink(sd / "current") == "releases/1"
    assert set(rel.families) == {"tiny"}
    for d in rel.blobs:
        assert (sd / "blobs" / f"sha256-{d}").is_file()
    st = SyncState.load(sd)
    assert (st.current, st.previous, st.highest_sequence, st.pending) == (1, None, 1, None)
    assert [e for e, _ in installed.audit_log][-1] == "sync.import.installed"
