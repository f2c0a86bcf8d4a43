"""`python -m head`: run the head. Exit codes: 0 stopped, 2 bad command line or config."""
from __future__ import annotations

import dataclasses
import logging
import sqlite3
import sys

from runtime.stack_config import DeploymentSpec
from head.config import config_from_args
from head.server import Head
from head.store import StateStore
from runtime import parent_guard
from runtime.curve import keys_dir, warn_insecure
from runtime.keyring import KeyFileError, server_pair
from runtime.credentials import TOKEN_FILE, load_or_create_token, state_dir
from runtime.logs import setup_logging
from runtime.stack_config import load_stack

log = logging.getLogger("head")


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging("head", config.log_level)
    if config.parent_pid is not None:
        parent_guard.install(config.parent_pid)
    seed: tuple[DeploymentSpec, ...] = ()
    if config.config_file:
        try:
            seed = load_stack(config.config_file).deployments
        except ValueError as exc:
            log.error("[startup] %s", exc)
            return 2
    directory = state_dir(config.state_dir)
    db = directory / "stacks" / config.stack / "head.db" if config.stack else directory / "head.db"
    try:
        store = StateStore(db if config.persist else None)
        token = load_or_create_token(directory)
    except (OSError, sqlite3.Error) as exc:  # a crash here was restarted over and over by `tokenrelay up`
        if "locked" in str(exc) or "busy" in str(exc):  # another process holds the database: may pass
            log.error("[startup] the state database %s is busy: %s", db, exc)
            return 1
        log.error("[startup] cannot use the state directory %s: %s (--state-dir or $TOKENRELAY_STATE_DIR)",
                  directory, exc)
        return 2
    log.info("[startup] state in %s (admin token in %s)", db if config.persist else "memory",
             directory / TOKEN_FILE)
    if config.insecure:
        warn_insecure("head")
    else:
        keys = keys_dir(config.curve_dir, config.state_dir)
        try:
            server_pair(keys, "head")
        except KeyFileError as exc:
            log.error("[startup] %s: run `tokenrelay keys init --dir %s`, or pass --insecure", exc, keys)
            return 2
        config = dataclasses.replace(config, curve_dir=str(keys))
    head = Head(config, store, token, seed, reset=config.reset_deployments)
    try:
        head.bind()
    except Exception as exc:  # zmq.ZMQError: address in use, bad endpoint
        log.error("[startup] cannot bind: %s", exc)
        return 2
    return head.run()


if __name__ == "__main__":
    sys.exit(main())
