"""Policy documents: typed, strictly validated, every error names its key."""

from __future__ import annotations

import pytest

from sync.errors import BundleRejected
from sync.policy import parse_policy
from tests.sync.helpers import POLICY


def test_valid_policy() -> None:
    p = parse_policy(POLICY.encode())
    assert p.allowed_families == ("tiny", "tiny2")
    assert (p.max_context, p.max_tokens, p.queue_size) == (4096, 512, 8)
    assert (p.thermal_constrained_c, p.thermal_critical_c) == (80.0, 90.0)
    assert (p.memory_constrained_free_mb, p.memory_critical_free_mb) == (1024, 512)
    assert (p.log_prompts, p.prompt_retention_days) == (False, 0)
    assert p.usage_retention_days == 90


def test_usage_retention_is_optional() -> None:
    assert "usage_retention_days = 90\n" in POLICY
    assert parse_policy(POLICY.replace("usage_retention_days = 90\n", "").encode()).usage_retention_days is None


@pytest.mark.parametrize("days", [0, 30, 36_500])
def test_usage_retention_in_range(days: int) -> None:
    text = POLICY.replace("usage_retention_days = 90", f"usage_retention_days = {days}")
    assert parse_policy(text.encode()).usage_retention_days == days


def test_example_policy_is_valid() -> None:
    from sync.policy import EXAMPLE_POLICY, load_policy

    assert load_policy(EXAMPLE_POLICY).usage_retention_days == 90


def test_prompt_logging_with_retention() -> None:
    text = POLICY.replace("log_prompts = false", "log_prompts = true").replace(
        "prompt_retention_days = 0", "prompt_retention_days = 7")
    assert parse_policy(text.encode()).prompt_retention_days == 7


@pytest.mark.parametrize(("old", "new", "names"), [
    ("queue_size = 8", "queue_size = 8\nburst = 2", "burst"),
    ("schema = 1", "schema = 1\n[extra]\na = 1", "extra"),
    ("max_tokens = 512", 'max_tokens = "512"', "limits.max_tokens"),
    ("max_tokens = 512", "max_tokens = 9999", "limits.max_tokens"),
    ("queue_size = 8", "queue_size = 0", "limits.queue_size"),
    ("critical_c = 90.0", "critical_c = 70.0", "thermal.critical_c"),
    ("constrained_c = 80.0", "constrained_c = true", "thermal.constrained_c"),
    ("critical_free_mb = 512", "critical_free_mb = 2048", "memory.critical_free_mb"),
    ("prompt_retention_days = 0", "prompt_retention_days = 30", "logging.prompt_retention_days"),
    ("log_prompts = false", "log_prompts = 0", "logging.log_prompts"),
    *[("usage_retention_days = 90", f"usage_retention_days = {bad}", "logging.usage_retention_days")
      for bad in ('"30"', "true", "30.0", "-1", "36501", "[30]")],
    ('allowed_families = ["tiny", "tiny2"]', 'allowed_families = ["Bad Name"]', "allowed_families"),
    ("[memory]", "[memoryx]", "memory"),
    ("schema = 1", "schema = 2", "schema"),
    ("schema = 1", "schema = = 1", "TOML"),
])
def test_invalid_policy_names_the_problem(old: str, new: str, names: str) -> None:
    assert old in POLICY
    with pytest.raises(BundleRejected) as ei:
        parse_policy(POLICY.replace(old, new, 1).encode())
    assert ei.value.code == "bad_policy"
    assert names in ei.value.message


def test_oversized_policy() -> None:
    with pytest.raises(BundleRejected):
        parse_policy(POLICY.encode() + b"#" * 70_000)
