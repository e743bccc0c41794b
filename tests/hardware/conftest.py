from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hardware.gguf import GGUFInfo, read_gguf


# the paths come from tests/conftest.py, which honours ATOLL_MODELS_DIR and fails loudly when a model is missing
@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> GGUFInfo:
    return read_gguf(smollm2_path)


@pytest.fixture(scope="session")
def gemma3(gemma_path: Path) -> GGUFInfo:
    return read_gguf(gemma_path)


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Capture the recoveries (INFO) as well as the warnings."""
    caplog.set_level(logging.INFO, logger="hardware")
