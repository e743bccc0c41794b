from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hardware.gguf import GGUFInfo, read_gguf

MODELS = Path(__file__).resolve().parents[2] / ".cache" / "models"


def _model(name: str) -> GGUFInfo:
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not fetched (see DESIGN.md, 'Models the tests and the demo use')")
    return read_gguf(path)


@pytest.fixture(scope="session")
def smollm2() -> GGUFInfo:
    return _model("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def gemma3() -> GGUFInfo:
    return _model("gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Capture the recoveries (INFO) as well as the warnings."""
    caplog.set_level(logging.INFO, logger="hardware")
