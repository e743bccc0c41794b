"""image/install.sh from the real wheelhouse: installs with no network into a root; a missing or
altered wheel stops it before anything changes, naming the file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.image


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mode, link target) of everything under root: a failed install must change none of it."""
    out = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mode,
                                             os.readlink(p) if p.is_symlink() else "")
    return out


def install(house: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the wheelhouse's install.sh into `root` with no network (unshare -n: no interface but lo)."""
    cmd = ["bash", str(house / "install.sh"), "--root", str(root), *extra]
    if shutil.which("unshare"):
        cmd = ["unshare", "-n", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PIP_INDEX_URL": "http://192.0.2.1/nowhere"})


def copy_house(src: Path, dst: Path) -> Path:
    """A private copy of the wheelhouse (hard links: cheap; replace a file before altering it)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


@pytest.fixture(scope="module")
def installed(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One real install into an empty root."""
    root = tmp_path_factory.mktemp("box") / "root"
    r = install(wheelhouse, root)
    assert r.returncode == 0, r.stderr
    yield root


def test_install_into_a_root(installed: Path, wheelhouse: Path) -> None:
    venv = installed / "opt" / "atoll" / "venv"
    assert venv.is_symlink() and re.fullmatch(r"venv-[0-9][^/]*-[0-9a-f]{8}", os.readlink(venv))
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import llama_cpp, daemon.notify, runtime.lifeline; print(llama_cpp.__version__)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # the venv holds exactly the pinned wheels
    req = (wheelhouse / "requirements.txt").read_text()
    frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all"], capture_output=True,
                            text=True, check=True).stdout
    def norm(text: str) -> set[str]:
        return {re.sub(r"[-_.]+", "-", line.split(" ")[0]).lower() for line in text.splitlines() if "==" in line}

    assert norm(req) <= norm(frozen)
    assert (installed / "etc/systemd/system/multi-user.target.wants/atoll.service").is_symlink()
    assert (installed / "etc/systemd/system/atoll.service.d/10-lan.conf").is_file()
    assert (installed / "etc/udev/rules.d/99-atoll-usb.rules").is_file()
    assert "atoll:" in (installed / "etc/passwd").read_text()


def test_a_missing_wheel_stops_before_changing_anything(installed: Path, wheelhouse: Path, tmp_path: Path) -> None:
    house = copy_house(wheelhouse, tmp_path / "house")
    victim = next((house / "wheels").glob("yarl-*.whl"))
    victim.unlink()
    before = tree(installed)
    r = install(house, installed)
    assert r.returncode == 1
    assert f"missing wheel: wheels/{victim.name}" in r.stderr
    assert "nothing was changed" in r.stderr
    assert tree(installed) == before


def test_a_changed_wheel_stops_before_changing_anything(installed: Path, wheelhouse: Path, tmp_path: Path) -> None:
    house = copy_house(wheelhouse, tmp_path / "house")
    victim = next((house / "wheels").glob("jsonschema-[0-9]*.whl"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.unlink()  # break the hard link: the shared wheelhouse stays intact
    victim.write_bytes(bytes(data))
    before = tree(installed)
    r = install(house, installed)
    assert r.returncode == 1
    assert f"hash mismatch: wheels/{victim.name}" in r.stderr
    assert tree(installed) == before


def test_a_dependency_missing_from_the_list_stops_the_install(wheelhouse: Path, tmp_path: Path) -> None:
    """The builder forgot a dependency entirely (no wheel, no line): pip names it; nothing is left behind."""
    house = copy_house(wheelhouse, tmp_path / "house")
    req = house / "requirements.txt"
    lines = req.read_text().splitlines()
    req.unlink()
    req.write_text("".join(f"{line}\n" for line in lines if not line.startswith("yarl==")))
    next((house / "wheels").glob("yarl-*.whl")).unlink()
    root = tmp_path / "root"
    root.mkdir()
    r = install(house, root)
    assert r.returncode == 1
    assert "yarl" in r.stderr and "nothing was changed" in r.stderr
    assert tree(root) == {}


def test_a_second_install_of_a_new_wheelhouse_keeps_the_old_venv(installed: Path, wheelhouse: Path,
                                                                  tmp_path: Path) -> None:
    """The same wheelhouse again changes nothing; the old venv directory is never removed."""
    old = os.readlink(installed / "opt/atoll/venv")
    r = install(wheelhouse, installed)
    assert r.returncode == 0, r.stderr
    assert "already installed" in r.stdout
    assert os.readlink(installed / "opt/atoll/venv") == old
