"""The systemd units: the CI check passes on ours and fails on a misspelt or weakened unit."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / ".ci" / "check-units"
UNIT = ROOT / "systemd" / "atoll.service"


def check(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CHECK), str(unit)], capture_output=True, text=True, timeout=120)


def test_our_unit_passes_with_exposure_at_most_2() -> None:
    r = check(UNIT)
    assert r.returncode == 0, r.stderr
    score = float(re.search(r"exposure ([0-9.]+)", r.stdout).group(1))  # type: ignore[union-attr]
    assert score <= 2.0


def test_a_misspelt_directive_fails(tmp_path: Path) -> None:
    bad = tmp_path / "atoll.service"
    bad.write_text(UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    r = check(bad)
    assert r.returncode == 1
    assert "kill mode" in r.stderr.lower()


def test_a_weakened_unit_fails(tmp_path: Path) -> None:
    keep = ("ProtectSystem", "ProtectHome", "CapabilityBoundingSet", "SystemCallFilter", "PrivateUsers",
            "ProtectKernel", "RestrictNamespaces", "PrivateTmp", "NoNewPrivileges")
    text = "\n".join(line for line in UNIT.read_text().splitlines() if not line.startswith(keep))
    weak = tmp_path / "atoll.service"
    weak.write_text(text + "\n")
    r = check(weak)
    assert r.returncode == 1
    assert "is above 2.0" in r.stderr


@pytest.mark.parametrize("directive", ["Type=notify", "NotifyAccess=main", "WatchdogSec=", "KillMode=mixed",
                                       "IPAddressDeny=any", "CapabilityBoundingSet=\n", "DevicePolicy=closed",
                                       "MemoryMax=", "ConfigurationDirectory=atoll", "StateDirectory=atoll"])
def test_unit_sets(directive: str) -> None:
    assert directive in UNIT.read_text()
