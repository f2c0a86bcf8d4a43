"""The agent's log when the head refuses its messages: a revoked agent is refused on every heartbeat
(2 a second) and logged an ERROR line each time, for as long as it ran. No sockets: the reactor's
handler of head frames is driven by hand."""
from __future__ import annotations

import logging

from agent.config import AgentConfig
from agent.server import Agent
from runtime.protocol import ControlReply, encode


REVOKED = encode(ControlReply(False, "forbidden", "key agent-gpu1 may not send AgentHeartbeat (revoked)"))


def _agent(monkeypatch) -> tuple[Agent, list[float]]:
    """An agent with no keys and a clock the test moves (`now[0]`)."""
    monkeypatch.delenv("TOKENRELAY_CURVE_DIR", raising=False)
    now = [0.0]
    return Agent(AgentConfig(metrics_port=-1), clock=lambda: now[0]), now


def test_a_repeated_refusal_is_logged_once_a_minute(monkeypatch, caplog) -> None:
    agent, now = _agent(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="agent.server"):
        for _ in range(20):  # ten seconds of heartbeats
            agent._on_head_frames(REVOKED)
            now[0] += 0.5
        assert len(caplog.records) == 1 and "head refused: forbidden key agent-gpu1" in caplog.text
        now[0] = 61.0
        agent._on_head_frames(REVOKED)
        assert len(caplog.records) == 2  # still said while it lasts
        agent._on_head_frames(encode(ControlReply(False, "protocol", "unsupported protocol version 2")))
        assert len(caplog.records) == 3 and "unsupported protocol version" in caplog.records[-1].getMessage()


def test_a_refusal_after_an_accepted_message_is_logged_at_once(monkeypatch, caplog) -> None:
    """Accepted again, then revoked again within the minute: the new refusal is news, not a repeat."""
    agent, now = _agent(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="agent.server"):
        agent._on_head_frames(REVOKED)
        now[0] = 5.0
        agent._on_head_frames(encode(ControlReply(True)))
        now[0] = 10.0
        agent._on_head_frames(REVOKED)
        assert len(caplog.records) == 2
