"""`python -m agent`: run this host's agent. Exit codes: 0 stopped, 2 bad command line or missing keys."""
from __future__ import annotations

import dataclasses
import logging
import sys

from agent.config import config_from_args
from agent.server import Agent
from runtime import parent_guard
from runtime.curve import keys_dir, warn_insecure
from runtime.keyring import KeyFileError, identity, server_pair, server_public
from runtime.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging("agent[%s]" % config.agent_id, config.log_level)
    if config.parent_pid is not None:
        parent_guard.install(config.parent_pid)
    if config.insecure:
        warn_insecure("agent")
    else:
        keys = keys_dir(config.curve_dir)
        try:
            identity(keys, "agent", config.agent_id)
            server_public(keys, "head")
            server_pair(keys, "replica")
        except KeyFileError as exc:
            logging.getLogger("agent").error(
                "[startup] %s: create this host's keys with `tokenrelay keys add agent %s`, or pass --insecure",
                exc, config.agent_id)
            return 2
        config = dataclasses.replace(config, curve_dir=str(keys))
    return Agent(config).run()


if __name__ == "__main__":
    sys.exit(main())
