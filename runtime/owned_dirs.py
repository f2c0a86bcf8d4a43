"""Temporary directories removed at exit by the process that made them, and by no other.

Runs in any process; owns no socket. Forked children (gunicorn workers, vLLM's engine processes) inherit
atexit handlers and run them at their own exit: the handler checks the pid so that a child never removes
a directory its parent still uses.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def owned_temp_dir(prefix: str) -> str:
    """A new directory under the temp dir, removed when this process (not a child) exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(_remove_if_owner, os.getpid(), path)
    return path


def _remove_if_owner(owner: int, path: str) -> None:
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)
