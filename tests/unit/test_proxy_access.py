"""Unit tests for proxy.access: API key parsing and checks, per-key token buckets (times passed in)."""
from __future__ import annotations

from pathlib import Path

import pytest

from proxy.access import ApiKeys, RateLimiter, load_api_keys


def test_keys_from_file_and_env_with_per_key_limits(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-alpha 120\n\nsk-beta   # no limit of its own\n")
    keys = load_api_keys(str(path), env="sk-gamma, sk-alpha ,")
    assert keys.enabled and len(keys) == 3
    alpha = keys.check("Bearer sk-alpha")
    assert alpha is not None and keys.limit_of(alpha, 10) == 120
    beta = keys.check("bearer   sk-beta")
    assert beta is not None and keys.limit_of(beta, 10) == 10
    assert keys.check("Bearer sk-gamma") is not None


@pytest.mark.parametrize("header", [None, "", "sk-alpha", "Basic sk-alpha", "Bearer ", "Bearer sk-alph",
                                    "Bearer sk-alpha2"])
def test_bad_or_missing_authorization_is_refused(header: str) -> None:
    keys = ApiKeys.parse("sk-alpha", None)
    assert keys.check(header) is None


def test_no_keys_means_disabled_and_bad_files_name_the_line(tmp_path: Path) -> None:
    assert not ApiKeys.parse(None, None).enabled
    assert not ApiKeys.parse("# only comments\n", " , ").enabled
    with pytest.raises(ValueError, match="line 2"):
        ApiKeys.parse("ok\nkey 12 extra\n", None)
    with pytest.raises(ValueError, match="line 1"):
        ApiKeys.parse("key lots\n", None)
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(str(tmp_path / "missing"), env="")
    # "sk-a sk-b" (space-separated) was taken as one key: both clients then got 401
    with pytest.raises(ValueError, match=r"\$TOKENRELAY_API_KEYS: a key holds a space; separate keys with commas"):
        ApiKeys.parse(None, "sk-a sk-b")
    assert len(ApiKeys.parse(None, " sk-a , sk-b ")) == 2


def test_keys_are_kept_as_digests_only() -> None:
    keys = ApiKeys.parse("sk-secret-value", None)
    assert b"sk-secret-value" not in b"".join(keys.limits)


def test_rate_limit_bucket_allows_the_per_worker_share_then_refills() -> None:
    limiter = RateLimiter(workers=2)  # 60/min for the proxy: 30/min for this worker, burst 30
    key = b"k"
    assert all(limiter.allow(key, 60, 0.0)[0] for _ in range(30))
    ok, wait = limiter.allow(key, 60, 0.0)
    assert not ok and wait == pytest.approx(2.0)  # one token per 2 s
    assert not limiter.allow(key, 60, 1.9)[0]
    assert limiter.allow(key, 60, 2.1)[0]
    assert limiter.allow(b"other", 60, 2.1)[0]  # buckets are per key


def test_rate_limit_zero_is_unlimited_and_tiny_limits_allow_one() -> None:
    limiter = RateLimiter(workers=8)
    assert all(limiter.allow(b"k", 0, 0.0)[0] for _ in range(1000))
    assert limiter.allow(b"s", 3, 0.0)[0]  # 3/min over 8 workers: each still allows one
    assert not limiter.allow(b"s", 3, 0.0)[0]


def test_a_repeated_key_counts_once_and_is_reported_by_line_never_by_value(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("sk-alpha 120\nsk-beta\n# a comment\nsk-beta   # pasted twice\nsk-alpha 120\n")
    keys = load_api_keys(str(path), env="sk-gamma,sk-beta,,sk-gamma")
    assert len(keys) == 3  # alpha, beta, gamma
    assert keys.repeats == ("--api-keys-file line 4 repeats line 2", "--api-keys-file line 5 repeats line 1",
                            "$TOKENRELAY_API_KEYS item 2 repeats --api-keys-file line 2",
                            "$TOKENRELAY_API_KEYS item 4 repeats item 1")
    assert not any("sk-" in r for r in keys.repeats)
    alpha = keys.check("Bearer sk-alpha")
    assert alpha is not None and keys.limit_of(alpha, 10) == 120  # the environment gives no limit
    assert ApiKeys.parse("sk-a\nsk-b\n", "sk-c").repeats == ()


@pytest.mark.parametrize("text, message", [
    ("sk-a 60\nsk-b\nsk-a 600\n", r"line 3: the key of line 1 again, with another rate limit \(600/min, there "
                                  r"60/min\): keep one line"),
    ("sk-a\nsk-a 60\n", r"line 2: the key of line 1 again, with another rate limit \(60/min, there none of its "
                        r"own\)"),
])
def test_one_key_with_two_rate_limits_is_refused_naming_both_lines(text: str, message: str) -> None:
    """Which limit was meant cannot be told (the last line used to win silently)."""
    with pytest.raises(ValueError, match=message) as info:
        ApiKeys.parse(text, None)
    assert "sk-a" not in str(info.value)
