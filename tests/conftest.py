"""Shared fixtures: the real models (fetched at set-up by image/fetch-models.sh), stores, the real app."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from daemon.app import create_app
from daemon.auth import create_token
from daemon.config import Settings
from daemon.services import bootstrap
from runtime.store import ModelStore
from tests.blocking import Detections, detector


def pytest_addoption(parser: pytest.Parser) -> None:
    """--image: also run the tests that need the built wheelhouse and Debian image (marker `image`)."""
    parser.addoption("--image", action="store_true", help="run the `image` tests (image/test-image.sh passes it)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the `image` tests unless --image was given (they are counted as deselected)."""
    if config.getoption("--image"):
        return
    keep = [i for i in items if i.get_closest_marker("image") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("image") is not None])
        items[:] = keep


ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("ATOLL_MODELS_DIR", ROOT / ".cache" / "models"))
SMOLLM2 = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS_DIR / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[Detections]:
    """Fail the test when product code blocks a running event loop (see tests/blocking.py)."""
    with detector() as seen:
        yield seen
    if seen.sites:
        pytest.fail("blocking call(s) on the event loop:\n" + "\n".join(dict.fromkeys(seen.sites)), pytrace=False)


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing: run image/fetch-models.sh (the README's set-up does)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF."""
    return _need(SMOLLM2)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real gemma-3-270m Q4_K_M GGUF (a base model, no chat template)."""
    return _need(GEMMA)


QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.allow_requantize = True
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


@pytest.fixture(scope="session")
def smollm2_q4_0_path(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    """A smaller variant of SmolLM2 (Q4_0), made here with llama.cpp's quantize API."""
    out = tmp_path_factory.mktemp("variants") / "SmolLM2-135M-Instruct.Q4_0.gguf"
    subprocess.run([sys.executable, "-c", QUANTIZE, str(smollm2_path), str(out), "Q4_0"], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    """A state dir with SmolLM2 in the store as family 'smollm2', built once per session."""
    d = tmp_path_factory.mktemp("template")
    ModelStore(d).add_file(smollm2_path, family="smollm2")
    return d


@pytest.fixture
def state_dir(tmp_path: Path, store_template: Path) -> Path:
    """A fresh state dir holding SmolLM2 (blobs hard-linked from the template, so it is cheap)."""
    d = tmp_path / "state"
    shutil.copytree(store_template, d, copy_function=os.link)
    return d


def snapshot_tree(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root except the SQLite DB, for 'state unchanged' checks."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("atoll.db"):
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


class App:
    """A running in-process daemon: test client plus tokens."""

    def __init__(self, client: TestClient[Any, Any], settings: Settings, user: str, admin: str) -> None:
        self.client = client
        self.settings = settings
        self.user_token = user
        self.admin_token = admin
        assert client.app is not None
        self.app: web.Application = client.app

    def headers(self, admin: bool = False) -> dict[str, str]:
        """Authorization header for the user (or admin) token."""
        return {"Authorization": f"Bearer {self.admin_token if admin else self.user_token}"}

    async def wait_ready(self, timeout: float = 60) -> None:
        """Wait for /readyz to say 200."""
        async with asyncio.timeout(timeout):
            while True:
                r = await self.client.get("/readyz")
                if r.status == 200:
                    return
                await asyncio.sleep(0.05)


AppFactory = Callable[..., "asyncio.Future[App]"]


@pytest.fixture
async def make_app(aiohttp_client: Any, state_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start the real app (real workers, real model) over `state_dir` with settings overrides."""

    async def make(wait: bool = True, **overrides: Any) -> App:
        overrides.setdefault("usb_watch", False)
        settings = Settings(state_dir=overrides.pop("state_dir", state_dir), threads=2, n_ctx=512,
                            **overrides)
        services = bootstrap(settings)
        user = create_token(services.db, "tester", "user")
        admin = create_token(services.db, "boss", "admin")
        client = await aiohttp_client(create_app(settings, services))
        a = App(client, settings, user, admin)
        if wait:
            await a.wait_ready()
        return a

    yield make


@pytest.fixture
def direct_llama(smollm2_path: Path) -> Iterator[Any]:
    """llama-cpp-python called directly in this process, same model and threads as the workers."""
    from runtime.worker import load_llama

    llm = load_llama(str(smollm2_path), n_ctx=512, n_threads=2, verbose=False)
    yield llm
    llm.close()
