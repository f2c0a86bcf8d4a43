"""Logging setup shared by every process: one format, a role tag on every line.

Runs in every process; owns no socket. Lifecycle lines carry grep-able tags: [startup], [shutdown],
[failover], [restart]. The role is a fixed string ("model_proc[r3]") or a function computed per record:
the proxy's master configures logging once before gunicorn forks, and `proxy_role` then tags each line
`proxy[master]` or `proxy[w<pid>]` from the pid that logs it, with no re-configuration after fork.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Union

FORMAT = "%(asctime)s %(levelname)-7s %(role)s %(name)s: %(message)s"

Role = Union[str, Callable[[], str]]


class _RoleFilter(logging.Filter):
    def __init__(self, role: Role) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role if isinstance(self.role, str) else self.role()
        return True


def proxy_role() -> Callable[[], str]:
    """The proxy's role tag: `proxy[master]` in the calling process, `proxy[w<pid>]` in its forks."""
    master = os.getpid()

    def role() -> str:
        pid = os.getpid()
        return "proxy[master]" if pid == master else "proxy[w%d]" % pid

    return role


def setup_logging(role: Role, level: str = "INFO") -> None:
    """Log to stderr with `role` (e.g. "model_proc[r3]", or proxy_role()) on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_RoleFilter(role))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        root.setLevel(level.upper())
    except ValueError:
        raise ValueError("--log-level: unknown level %r" % level) from None
