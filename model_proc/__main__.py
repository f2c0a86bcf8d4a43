"""`python -m model_proc`: start one replica (normally the agent does this).

Exit codes: 0 stopped cleanly, 1 unexpected crash, 2 bad command line, 3 engine cannot load (a restart
will not help), 4 engine died while serving.
"""
from __future__ import annotations

import asyncio
import logging
import sys

from model_proc.config import EXIT_CRASH, EXIT_LOAD_ERROR, config_from_args
from model_proc.engine import EngineLoadError, create_engine
from model_proc.server import ReplicaServer
from runtime import parent_guard
from runtime.logs import setup_logging

log = logging.getLogger("model_proc")


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging("model_proc[%s]" % config.replica_id, config.log_level)
    if config.parent_pid is not None:
        parent_guard.install(config.parent_pid)
    try:
        engine = create_engine(config.engine, config.model, config.engine_args)
    except EngineLoadError as exc:
        log.error("[startup] %s", exc)
        return EXIT_LOAD_ERROR
    try:
        return asyncio.run(ReplicaServer(config, engine).run())
    except Exception:
        log.exception("[shutdown] replica crashed")
        return EXIT_CRASH


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    sys.exit(main())
