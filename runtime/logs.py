"""Logging setup shared by every process: one format, a role tag on every line.

Runs in every process; owns no socket. Lifecycle lines carry grep-able tags: [startup], [shutdown],
[failover], [restart].
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(role)s %(name)s: %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def setup_logging(role: str, level: str = "INFO") -> None:
    """Log to stderr with `role` (e.g. "model_proc[r3]") on every line."""
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
