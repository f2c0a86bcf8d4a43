import msgspec
import pytest

from runtime import protocol as p


def test_every_message_roundtrips_with_its_type_byte():
    samples = [
        p.GenerateRequest("r1", prompt="hi", params=p.SamplingParams(max_tokens=3, stop=["x"])),
        p.GenerateRequest("r2", messages=[p.ChatMessage("user", "hello")]),
        p.Abort(["r1", "r2"]),
        p.TokenBatch([p.Delta("r1", "a ", None, 2, 1), p.Delta("r2", "", "stop", 1, 4)]),
        p.RequestError("r1", 400, "too long", "invalid_request_error", "prompt"),
        p.ReplicaDead("rep", "boom"),
        p.AgentRegister(p.PROTOCOL_VERSION, "a1", "h", p.Capacity(2, 1 << 30, [p.GpuInfo(0, "A10", 24)])),
        p.AgentLeaving("a1", "shutting down"),
        p.RoutingTable(5, 7, 1.5, [p.DeploymentRoute(
            "d", "mock", "m", [p.ReplicaRoute("r", "tcp://x:1", 1, 0, 0.5, 8)])]),
        p.Assignment(1, 2, [p.ReplicaSpec("r", "d", "mock", "m", {"ttft_ms": 5})]),
    ]
    seen = set()
    for msg in samples:
        frames = p.encode(msg)
        assert len(frames) == 2 and len(frames[0]) == 1
        seen.add(frames[0])
        assert p.decode_frames([b"peer-id"] + frames) == msg
    assert len(seen) == len({type(m) for m in samples})


def test_garbage_is_a_protocol_error_not_a_crash():
    with pytest.raises(p.ProtocolError, match="unknown message type"):
        p.decode(b"\xee", b"")
    with pytest.raises(p.ProtocolError, match="bad GenerateRequest"):
        p.decode(p.encode(p.Abort([]))[0].replace(b"\x02", b"\x01"), msgspec.msgpack.encode({"x": 1}))
    with pytest.raises(p.ProtocolError):
        p.decode_frames([b"only-one"])
    with pytest.raises(p.ProtocolError):
        p.encode(object())


def test_wrong_field_types_are_rejected():
    frames = p.encode(p.Abort(["a"]))
    with pytest.raises(p.ProtocolError):
        p.decode(frames[0], msgspec.msgpack.encode({"request_ids": [1, 2]}))


def test_a_proxy_identity_is_logged_without_its_secret() -> None:
    from runtime.protocol import loggable_identity
    assert loggable_identity(b"proxy-host1-123-" + b"ab" * 16) == "proxy-host1-123"
    assert loggable_identity(b"no separator") == "?"
    assert loggable_identity(b"x-\xff\xfe-secret") == "x-\ufffd\ufffd"


def test_a_payload_nested_too_deep_is_a_protocol_error():
    """A DeployRequest (spec: any data) nested 100,000 maps deep raised RecursionError out of decode, past
    every socket loop's `except ProtocolError`; the head logged a traceback and never answered."""
    type_byte, _ = p.encode(p.DeployRequest("t", {}))
    deep = b"\x82\xa5token\xa1t\xa4spec" + b"\x81\xa1a" * 100_000 + b"\xc0"
    with pytest.raises(p.ProtocolError, match="bad DeployRequest payload"):
        p.decode(type_byte, deep)
