"""Logging setup for every proxy process: one stderr handler, role tag `proxy[master]` / `proxy[w<pid>]`.

Runs in the proxy master before fork; workers inherit it. Owns no socket. The role tag is computed per
record from the pid, so lines logged after fork carry the worker's pid without any re-configuration.
"""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(role)s %(name)s: %(message)s"


class RoleFilter(logging.Filter):
    def __init__(self, master_pid: int) -> None:
        super().__init__()
        self._master_pid = master_pid

    def filter(self, record: logging.LogRecord) -> bool:
        pid = os.getpid()
        record.role = "proxy[master]" if pid == self._master_pid else "proxy[w%d]" % pid
        return True


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RoleFilter(os.getpid()))
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
