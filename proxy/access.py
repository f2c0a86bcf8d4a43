"""API keys and per-key rate limits of the proxy.

Pure logic (plus reading the keys file once at worker start); runs in proxy workers; owns no socket and
never reads the clock (`RateLimiter.allow` takes `now`).

Keys come from `--api-keys-file` (one key per line, optionally followed by its own requests-per-minute
limit; `#` starts a comment) and from $TOKENRELAY_API_KEYS (comma-separated keys). Keys are kept only as
SHA-256 digests and looked up by digest, so comparing them leaks nothing useful through timing. A key
given twice counts once and is reported by where it was (`ApiKeys.repeats`: line and item numbers, never
the key); the same key on two lines with different limits is refused.

Rate limits are token buckets per key and per worker: gunicorn spreads connections over the workers,
so each worker allows limit / workers requests per minute (at least 1), with a burst of the same size.
The proxy as a whole then allows about the configured limit; a client on one keep-alive connection
always hits the same worker and gets that worker's share.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional

from proxy.config import API_KEYS_ENV


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _limit(per_minute: int) -> str:
    return "%d/min" % per_minute if per_minute else "none of its own"


@dataclass(frozen=True)
class ApiKeys:
    limits: dict[bytes, int] = field(default_factory=dict)  # key digest -> requests/minute (0: default)
    # where a key was given again, e.g. "line 7 repeats line 2" (never the key): counted once, and the
    # proxy logs each at start, since a repeat is often a copy-paste slip that hides a missing key
    repeats: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    def __len__(self) -> int:
        return len(self.limits)

    @classmethod
    def parse(cls, file_text: Optional[str], env_value: Optional[str], where: str = "--api-keys-file"
              ) -> "ApiKeys":
        """ValueError for a line that is not 'KEY [LIMIT]', a key in the environment holding a space, and
        one key on two lines with different limits (which one was meant cannot be told)."""
        limits: dict[bytes, int] = {}
        first: dict[bytes, tuple[str, int]] = {}  # digest -> where it was first given: ("line"|"item", n)
        repeats: list[str] = []
        for n, line in enumerate((file_text or "").splitlines(), 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
                raise ValueError("%s line %d: expected 'KEY [REQUESTS_PER_MINUTE]'" % (where, n))
            digest, limit = _digest(parts[0]), int(parts[1]) if len(parts) == 2 else 0
            if digest in first:
                earlier = first[digest][1]
                if limits[digest] != limit:
                    raise ValueError("%s line %d: the key of line %d again, with another rate limit (%s, there "
                                     "%s): keep one line" % (where, n, earlier, _limit(limit), _limit(limits[digest])))
                repeats.append("%s line %d repeats line %d" % (where, n, earlier))
                continue
            limits[digest], first[digest] = limit, ("line", n)
        for n, key in enumerate((env_value or "").split(","), 1):
            if len(key.split()) > 1:  # "sk-a sk-b" was one key no client sends, not two (never logged)
                raise ValueError("$%s: a key holds a space; separate keys with commas" % API_KEYS_ENV)
            if not key.strip():
                continue
            digest = _digest(key.strip())
            if digest in first:  # the file's limit, if any, stays: the environment gives none
                source, m = first[digest]
                repeats.append("$%s item %d repeats %s" % (
                    API_KEYS_ENV, n, "%s line %d" % (where, m) if source == "line" else "item %d" % m))
                continue
            limits[digest], first[digest] = 0, ("item", n)
        return cls(limits, tuple(repeats))

    def check(self, authorization: Optional[str]) -> Optional[bytes]:
        """The key's id (its digest) for a valid `Authorization: Bearer KEY` header, else None."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = _digest(token.strip())
        return digest if digest in self.limits else None

    def limit_of(self, key_id: bytes, default: int) -> int:
        return self.limits.get(key_id) or default


def load_api_keys(path: Optional[str], env: Optional[str] = None) -> ApiKeys:
    """Keys of the file at `path` plus those of $TOKENRELAY_API_KEYS (or `env`); ValueError names what
    is wrong."""
    text = None
    if path:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise ValueError("--api-keys-file %s: cannot read: %s" % (path, exc.strerror)) from None
    return ApiKeys.parse(text, os.environ.get(API_KEYS_ENV) if env is None else env)


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets per key: `per_minute` requests a minute, shared by `workers` workers."""

    def __init__(self, workers: int) -> None:
        self._workers = max(1, workers)
        self._buckets: dict[bytes, _Bucket] = {}

    def allow(self, key_id: bytes, per_minute: int, now: float) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be allowed)."""
        if per_minute <= 0:
            return True, 0.0
        share = max(1.0, per_minute / self._workers)
        rate = share / 60.0
        b = self._buckets.get(key_id)
        if b is None:
            b = self._buckets[key_id] = _Bucket(share, now)
        b.tokens = min(share, b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True, 0.0
        return False, (1.0 - b.tokens) / rate

