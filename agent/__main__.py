"""`python -m agent`: run this host's agent. Exit codes: 0 stopped, 2 bad command line."""
from __future__ import annotations

import sys

from agent.config import config_from_args
from agent.server import Agent
from runtime import parent_guard
from runtime.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging("agent[%s]" % config.agent_id, config.log_level)
    if config.parent_pid is not None:
        parent_guard.install(config.parent_pid)
    return Agent(config).run()


if __name__ == "__main__":
    sys.exit(main())
