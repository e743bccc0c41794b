"""A replayed overheat against the real daemon and real models, with requests running throughout.

The only fake is the sensor timeline (recorded readings replayed with --sensor-replay);
the governor, the variant choice, the hot swaps and the workers are real.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from runtime.store import ModelStore
from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.slow

GiB = 1 << 30
BOX = {"ram_total_bytes": 16 * GiB, "ram_available_bytes": 10 * GiB, "cpu_count": 8, "load_1m": 1.0}
# normal -> constrained (82 C) -> critical (93 C) -> constrained (84 C, below 90-5 for the dwell)
#        -> normal (70 C, below 80-5 for the dwell)
TIMELINE = [(0, 50.0), (4, 82.0), (8, 93.0), (12, 84.0), (16, 70.0)]
GOVERNOR = """
[governor]
cpu_constrained_c = 80.0
cpu_critical_c = 90.0
temp_hysteresis_c = 5.0
min_dwell_s = 1.5
"""


def get(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


class Load(threading.Thread):
    """Sequential chat requests until stopped; records (time, status, error code, fingerprint)."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.results: list[tuple[float, int, str | None, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about ships."}],
                           "max_tokens": 24, "temperature": 0}).encode()
        while not self.stop.is_set():
            req = urllib.request.Request(self.url + "/v1/chat/completions", data=body, headers={
                "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    fp = json.load(r)["system_fingerprint"]
                    self.results.append((time.monotonic(), r.status, None, fp))
            except urllib.error.HTTPError as e:
                code = json.loads(e.read())["error"]["code"]
                self.results.append((time.monotonic(), e.code, code, e.headers.get("Retry-After")))
                time.sleep(0.2)


def test_overheat_constrains_swaps_refuses_and_recovers(state_dir: Path, tmp_path: Path,
                                                        smollm2_q4_0_path: Path) -> None:
    store = ModelStore(state_dir)
    small = store.add_file(smollm2_q4_0_path, family="smollm2")
    big = next(v for v in store.families()["smollm2"] if v.digest != small.digest)
    timeline = tmp_path / "overheat.jsonl"
    timeline.write_text("".join(json.dumps({"t": t, **BOX, "cpu_temp_c": c}) + "\n" for t, c in TIMELINE))
    cfg = tmp_path / "atoll.toml"
    cfg.write_text(GOVERNOR)
    d = Daemon(state_dir, "--config", str(cfg), "--sensor-replay", str(timeline), "--governor-interval", "0.2",
               "--critical-drain-seconds", "1")
    try:
        d.wait_ready()
        token = d.token()
        assert get(d.url + "/admin/status", token)["models"][0]["quantization"] == "Q4_1"
        load = Load(d.url, token)
        load.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            hw = get(d.url + "/admin/hardware", token)
            if [h["to"] for h in hw["governor"]["history"]][-1:] == ["normal"] and \
                    get(d.url + "/admin/status", token)["models"][0]["quantization"] == "Q4_1":
                break
            time.sleep(0.2)
        # serving after recovery: wait for two more requests to finish rather than for a fixed time
        recovered_at = len(load.results)
        deadline = time.monotonic() + 60
        while len(load.results) < recovered_at + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        load.stop.set()
        load.join(timeout=60)
        hw = get(d.url + "/admin/hardware", token)
    finally:
        d.stop()

    states = [(h["from"], h["to"]) for h in hw["governor"]["history"]]
    assert states == [("normal", "constrained"), ("constrained", "critical"), ("critical", "constrained"),
                      ("constrained", "normal")], states
    assert all(h["reason"] for h in hw["governor"]["history"])
    swaps = hw["swaps"]["smollm2"]
    assert [(s["from_digest"], s["to_digest"], s["outcome"]) for s in swaps] == [
        (big.digest, small.digest, "ok"), (small.digest, big.digest, "ok")]
    assert all(s["overlap"] for s in swaps)  # 10 GiB available: the new variant loaded before the old stopped

    statuses = [(s, code) for _, s, code, _ in load.results]
    # requests ran throughout; the only failures are the documented 503s of the critical state
    assert all(s == 200 or (s == 503 and code in ("overloaded", "interrupted")) for s, code in statuses), statuses
    assert any(s == 503 for s, _ in statuses), "critical should have refused some requests"
    served = [fp for _, s, _, fp in load.results if s == 200]
    assert f"sha256-{small.digest[:16]}" in served and f"sha256-{big.digest[:16]}" in served
    assert served[0] == f"sha256-{big.digest[:16]}" and served[-1] == f"sha256-{big.digest[:16]}"
    assert all(s == 200 for _, s, _, _ in load.results[-2:])
    lat = hw["swap_latencies"]
    assert [x["state"] for x in lat] == ["constrained", "normal"] and all(x["ok"] for x in lat)
    print("state change -> serving on the new variant (s):", [x["seconds_from_state_change"] for x in lat])
    print("governor CPU % of a core:", hw["governor"]["cpu_percent"])
