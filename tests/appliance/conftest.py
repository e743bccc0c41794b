"""The appliance tests that need built artefacts: the offline wheelhouse and the Debian image.

They carry the `image` marker and run only with ``--image`` (image/test-image.sh passes it after
building what they need; .ci/run calls that script). Without ``--image`` they are deselected, and
pytest's summary counts them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = Path(os.environ.get("ATOLL_WHEELHOUSE", ROOT / ".cache" / "wheelhouse"))


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The wheelhouse image/wheelhouse.sh built (image/test-image.sh builds it first)."""
    if not (WHEELHOUSE / "requirements.txt").is_file():
        pytest.fail(f"no wheelhouse in {WHEELHOUSE}: run image/test-image.sh (it builds one)", pytrace=False)
    return WHEELHOUSE
