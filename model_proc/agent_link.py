"""The replica's link to its agent: ReplicaHello, ReplicaStatus (the heartbeat) and ReplicaDead.

Runs in model_proc's asyncio loop. Owns the agent DEALER (connects `config.agent`; with a key directory,
as a CURVE client with the agent's own key, which the agent serves with), used only from that loop.
`heartbeat` runs as a task of the replica's loop itself, so a stuck loop stops the heartbeat; it also
ends the replica when the agent (its parent process) is gone, or, for a replica that may outlive its
agent (adopt mode), when the stack's launcher (`--stack-pid`) is.
Must never block the loop: sends are non-blocking, and a message the agent is not reading is dropped.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import zmq
import zmq.asyncio

from model_proc.config import ReplicaConfig
from runtime import curve, parent_guard
from runtime.keyring import identity
from runtime.protocol import ReplicaHello, encode

log = logging.getLogger(__name__)

HELLO_EVERY = 2  # status reports between two ReplicaHello (a restarted agent learns of us within 0.5 s)


class AgentLink:
    """The DEALER to the agent, or nothing when the replica runs without one (`config.agent` unset)."""

    def __init__(self, ctx: zmq.asyncio.Context, config: ReplicaConfig, keys: Optional[Path]) -> None:
        self._config = config
        self._socket: Optional[zmq.asyncio.Socket] = None
        if config.agent:
            self._socket = ctx.socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.SNDHWM, 16)
            if keys is not None and config.agent_key:
                agent = identity(keys, "agent", config.agent_key)
                curve.connect(self._socket, agent, agent.public)  # the agent serves with its own key
            self._socket.connect(config.agent)

    def send(self, msg: object) -> None:
        if self._socket is None:
            return
        fut: Any = self._socket.send_multipart(encode(msg), flags=zmq.NOBLOCK)  # an asyncio Future
        if fut.done() and fut.exception() is not None:
            log.debug("status to agent dropped: %s", fut.exception())

    async def heartbeat(self, hello: ReplicaHello, send_status: Callable[[], None], stop: asyncio.Event) -> None:
        """Every status interval: `send_status()`, and `hello` again every HELLO_EVERY statuses so a
        restarted agent (adopt mode) learns who we are. Sets `stop` and returns when the agent is gone."""
        parent, stack = self._config.parent_pid, self._config.stack_pid
        sent = 0
        while True:
            sent += 1
            if sent % HELLO_EVERY == 0:
                self.send(hello)
            send_status()
            if parent is not None and not parent_guard.parent_alive(parent):
                log.error("[shutdown] agent (pid %d) is gone; exiting", parent)
                stop.set()
                return
            if stack is not None and not parent_guard.process_alive(stack):
                log.error("[shutdown] the stack's launcher (pid %d) is gone; exiting", stack)
                stop.set()
                return
            await asyncio.sleep(self._config.status_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
