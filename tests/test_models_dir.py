"""The demo models are found through ATOLL_MODELS_DIR, and a missing one fails the run loudly (never a skip)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GEMMA, ROOT, SMOLLM2

# one test that needs each model through the shared fixtures: a hardware test and a sync smoke test
NEEDS_MODELS = ["tests/hardware/test_estimate.py::test_shape_from_real_headers",
                "tests/sync/test_smoke.py::test_real_model_bundle"]


def run_pytest(models_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ATOLL_MODELS_DIR": str(models_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NEEDS_MODELS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_models_elsewhere_are_used(tmp_path: Path) -> None:
    elsewhere = tmp_path / "models"
    elsewhere.mkdir()
    for model in (SMOLLM2, GEMMA):
        if not model.is_file():
            pytest.fail(f"{model} is missing: run image/fetch-models.sh", pytrace=False)
        (elsewhere / model.name).symlink_to(model)
    r = run_pytest(elsewhere)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout and "skipped" not in r.stdout


def test_missing_models_fail_loudly_with_the_fix(tmp_path: Path) -> None:
    r = run_pytest(tmp_path / "empty")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "skipped" not in r.stdout
    assert r.stdout.count("run image/fetch-models.sh") >= 2, r.stdout  # each test says what to do
    assert str(tmp_path / "empty") in r.stdout  # and where it looked
