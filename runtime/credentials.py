"""Where tokenrelay keeps local state and how the admin credential is found.

Runs in the head and the CLI; owns no socket. The head's control commands (deploy, scale, delete,
status) need the admin token. Lookup order for clients: --token, $TOKENRELAY_ADMIN_TOKEN, the token file
in the state directory (written by the head on first start, mode 0600).
Environment variables: TOKENRELAY_STATE_DIR (default ~/.local/state/tokenrelay), TOKENRELAY_ADMIN_TOKEN.
"""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Optional

TOKEN_ENV = "TOKENRELAY_ADMIN_TOKEN"
STATE_DIR_ENV = "TOKENRELAY_STATE_DIR"
TOKEN_FILE = "admin.token"


def state_dir(explicit: Optional[str] = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else Path.home() / ".local" / "state" / "tokenrelay"


def load_or_create_token(directory: Path) -> str:
    """The head's admin token: from $TOKENRELAY_ADMIN_TOKEN, else the state dir's file (created once)."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env
    path = directory / TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return token


def client_token(explicit: Optional[str] = None, directory: Optional[str] = None) -> str:
    """The token a CLI call sends ("" if none is found: the head will refuse with a clear message)."""
    if explicit:
        return explicit
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env
    try:
        return (state_dir(directory) / TOKEN_FILE).read_text().strip()
    except OSError:
        return ""


def token_matches(expected: str, given: str) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), given.encode())
