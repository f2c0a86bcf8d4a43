"""`python -m model_proc`: start one replica (normally the agent does this).

Exit codes: 0 stopped cleanly, 1 unexpected crash, 2 bad command line or missing keys, 3 engine cannot load (a restart
will not help), 4 engine died while serving.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import sys
from typing import Any, Coroutine

from model_proc.config import EXIT_CRASH, EXIT_LOAD_ERROR, EXIT_USAGE, config_from_args
from model_proc.engine import EngineLoadError, create_engine
from model_proc.server import ReplicaServer
from runtime import parent_guard
from runtime.curve import keys_dir, warn_insecure
from runtime.keyring import KeyFileError, identity, server_pair
from runtime.logs import setup_logging

log = logging.getLogger("model_proc")


def _run(main_coro: Coroutine[Any, Any, int], event_loop: str) -> int:
    """Run the replica's loop: on uvloop where it is installed (a core dependency on Linux and macOS)
    unless `event_loop` is "asyncio".

    uvloop's timers fire within about a millisecond either side of their time (libuv's millisecond
    clock). asyncio's fire 0.5-1 ms late (it rounds the epoll timeout up to whole milliseconds), and ticks
    that fire together stay clumped: with the mock engine that was most of the TTFT the benchmark charged
    to tokenrelay (benchmarks/README.md), against a floor server that runs on uvloop. The replica's CPU
    per token is about the same on both. vLLM's own server runs AsyncLLM on uvloop."""
    uvloop: Any = None
    if event_loop != "asyncio":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if event_loop == "uvloop":
                main_coro.close()
                log.error("[startup] --event-loop uvloop: uvloop is not installed")
                return EXIT_USAGE
    log.info("[startup] event loop: %s", "uvloop" if uvloop is not None else "asyncio")
    return uvloop.run(main_coro) if uvloop is not None else asyncio.run(main_coro)


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging("model_proc[%s]" % config.replica_id, config.log_level)
    if config.parent_pid is not None:
        parent_guard.install(config.parent_pid)
    if config.insecure:
        warn_insecure("replica %s" % config.replica_id)
    else:
        keys = keys_dir(config.curve_dir)
        try:
            server_pair(keys, "replica")
            if config.agent:
                if not config.agent_key:
                    raise KeyFileError("--agent needs --agent-key (the agent's id) to connect securely")
                identity(keys, "agent", config.agent_key)
        except KeyFileError as exc:
            log.error("[startup] %s (or pass --insecure)", exc)
            return EXIT_USAGE
        config = dataclasses.replace(config, curve_dir=str(keys))
    try:
        engine_args = dict(config.engine_args)
        if config.engine == "vllm":  # clients name the deployment: vLLM's serving layer must answer to it
            own = engine_args.get("served_model_name") or []
            names = [own] if isinstance(own, str) else list(own)
            name = config.deployment or config.model
            engine_args["served_model_name"] = names if name in names else [name] + names
        engine = create_engine(config.engine, config.model, engine_args)
    except EngineLoadError as exc:
        log.error("[startup] %s", exc)
        return EXIT_LOAD_ERROR
    try:
        return _run(ReplicaServer(config, engine).run(), config.event_loop)
    except Exception:
        log.exception("[shutdown] replica crashed")
        return EXIT_CRASH


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    sys.exit(main())
