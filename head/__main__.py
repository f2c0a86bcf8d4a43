"""`python -m head`: run the head. Exit codes: 0 stopped, 2 bad command line or config."""
from __future__ import annotations

import logging
import sys

from head.config import config_from_args
from head.server import Head
from runtime.logs import setup_logging
from runtime.stack_config import load_stack

log = logging.getLogger("head")


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging("head", config.log_level)
    deployments = []
    if config.config_file:
        try:
            deployments = list(load_stack(config.config_file).deployments)
        except ValueError as exc:
            log.error("[startup] %s", exc)
            return 2
    head = Head(config, deployments)
    try:
        head.bind()
    except Exception as exc:  # zmq.ZMQError: address in use, bad endpoint
        log.error("[startup] cannot bind: %s", exc)
        return 2
    return head.run()


if __name__ == "__main__":
    sys.exit(main())
