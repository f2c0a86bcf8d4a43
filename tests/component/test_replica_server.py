"""model_proc's ReplicaServer with real ZeroMQ sockets, in one process (asyncio)."""
import asyncio

import zmq
import zmq.asyncio

from model_proc.config import EXIT_CRASH, EXIT_ENGINE_DIED, EXIT_USAGE, ReplicaConfig
from model_proc.engine import EngineRequestError, EngineStats, create_engine
from model_proc.server import ReplicaServer
from runtime.protocol import (
    Abort, GenerateRequest, ReplicaDead, ReplicaHello, ReplicaStatus, RequestError, SamplingParams,
    TokenBatch, decode_frames, encode,
)


async def _start(engine_args, ctx, agent=None):
    cfg = ReplicaConfig("r1", "mock", "m", engine_args, agent=agent, status_interval=0.05, drain_seconds=0.5)
    server = ReplicaServer(cfg, create_engine("mock", "m", engine_args), ctx)
    task = asyncio.ensure_future(server.run())
    for _ in range(200):
        if server.endpoint and server._ready:
            break
        await asyncio.sleep(0.01)
    return server, task


async def _recv(sock, timeout=5.0):
    frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
    return decode_frames(frames)


async def _expect_death(dealer, agent, task, reason: str, exit_code: int) -> None:
    """The replica tells the proxy (after any token batches) and its agent that it is dead, with
    `reason`, and exits with `exit_code`."""
    msg = await _recv(dealer)
    while isinstance(msg, TokenBatch):
        msg = await _recv(dealer)
    assert isinstance(msg, ReplicaDead) and reason in msg.reason
    assert await asyncio.wait_for(task, 5) == exit_code
    seen_dead = False
    while not seen_dead:
        seen_dead = isinstance(await _recv(agent), ReplicaDead)


def test_batches_per_step_abort_and_errors():
    async def go():
        ctx = zmq.asyncio.Context()
        server, task = await _start({"ttft_ms": 5, "itl_ms": 5}, ctx)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        # three requests started together: their tokens leave together, one message per step
        for rid in ("a", "b", "c"):
            await dealer.send_multipart(encode(GenerateRequest(rid, prompt="p q", params=SamplingParams(max_tokens=4))))
        finished, batches, sizes = set(), 0, []
        text = {"a": "", "b": "", "c": ""}
        while len(finished) < 3:
            msg = await _recv(dealer)
            assert isinstance(msg, TokenBatch)
            if not msg.deltas:  # a load report (TokenBatch.load), not an engine step
                continue
            batches += 1
            sizes.append(len(msg.deltas))
            for d in msg.deltas:
                text[d.request_id] += d.text
                if d.finish_reason:
                    finished.add(d.request_id)
                    assert (d.finish_reason, d.prompt_tokens, d.completion_tokens) == ("length", 2, 4)
        assert batches < 12 and max(sizes) == 3  # not one message per token per request
        assert text["a"] == text["b"] == text["c"] and len(text["a"].split()) == 4
        # a request the engine refuses comes back as a RequestError with the client's status
        await dealer.send_multipart(encode(GenerateRequest("big", prompt="x", params=SamplingParams(max_tokens=10**6))))
        err = await _recv(dealer)
        assert isinstance(err, RequestError) and err.status == 400 and err.param == "prompt"
        # abort stops generation
        long_request = GenerateRequest("long", prompt="x", params=SamplingParams(max_tokens=10**3))
        await dealer.send_multipart(encode(long_request))
        await _recv(dealer)
        await dealer.send_multipart(encode(Abort(["long"])))
        await asyncio.sleep(0.1)
        generated = server.tokens_generated
        await asyncio.sleep(0.1)
        assert server.tokens_generated == generated
        assert server.requests_aborted == 1 and server.engine.stats().running == 0
        # garbage does not kill the replica
        await dealer.send_multipart([b"\xff", b"junk"])
        await dealer.send_multipart(encode(GenerateRequest("ok", prompt="x", params=SamplingParams(max_tokens=1))))
        while True:
            msg = await _recv(dealer)
            if isinstance(msg, TokenBatch) and msg.deltas and msg.deltas[-1].request_id == "ok":
                break
        server._on_signal(15)
        assert await asyncio.wait_for(task, 5) == 0
        dealer.close(0)
        ctx.term()
    asyncio.run(go())


def test_vanished_proxy_has_its_requests_aborted():
    async def go():
        ctx = zmq.asyncio.Context()
        server, task = await _start({"ttft_ms": 1, "itl_ms": 2, "tokens": 4000}, ctx)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(server.endpoint)
        await dealer.send_multipart(encode(GenerateRequest("x", prompt="hi")))
        await _recv(dealer)
        dealer.close(0)
        for _ in range(300):
            if server.engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        assert server.engine.stats().running == 0 and server.requests_aborted == 1
        server._on_signal(15)
        await asyncio.wait_for(task, 5)
        ctx.term()
    asyncio.run(go())


def test_engine_death_is_announced_to_proxies_and_agent():
    async def go():
        ctx = zmq.asyncio.Context()
        agent = ctx.socket(zmq.ROUTER)
        port = agent.bind_to_random_port("tcp://127.0.0.1")
        server, task = await _start({"ttft_ms": 1, "itl_ms": 50, "fatal_trigger": "KABOOM"}, ctx,
                                    agent="tcp://127.0.0.1:%d" % port)
        hello = await _recv(agent)
        assert isinstance(hello, ReplicaHello) and hello.endpoint == server.endpoint
        status = await _recv(agent)
        assert isinstance(status, ReplicaStatus)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        await dealer.send_multipart(encode(GenerateRequest("a", prompt="fine", params=SamplingParams(max_tokens=100))))
        await _recv(dealer)
        await dealer.send_multipart(encode(GenerateRequest("b", prompt="KABOOM")))
        await _expect_death(dealer, agent, task, "fatal_trigger", EXIT_ENGINE_DIED)
        dealer.close(0)
        agent.close(0)
        ctx.term()
    asyncio.run(go())


def test_load_reaches_every_proxy_worker_once():
    """A proxy worker learns each new load, from a TokenBatch or an empty push, and a worker that the
    last step's TokenBatch already told gets no extra push."""
    async def go():
        ctx = zmq.asyncio.Context()
        server, task = await _start({"ttft_ms": 5, "itl_ms": 5}, ctx)
        idle, busy = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for sock in (idle, busy):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.endpoint)
        await idle.send_multipart(encode(GenerateRequest("i", prompt="x", params=SamplingParams(max_tokens=1))))
        msg = await _recv(idle)
        while not (msg.deltas and msg.deltas[-1].finish_reason):
            msg = await _recv(idle)
        while msg.load != 0:  # the push after "i" ended, unless its own last batch said 0 already
            msg = await _recv(idle)
        # "b" runs ~60 ms, longer than load_push.LOAD_PUSH_INTERVAL: the idle worker must hear of it meanwhile
        await busy.send_multipart(encode(GenerateRequest("b", prompt="x", params=SamplingParams(max_tokens=12))))
        loads, last = [], None
        while last is None or not (last.deltas and last.deltas[-1].finish_reason):
            last = await _recv(busy)
            assert last.deltas or last.load not in loads[-1:], "a push repeated the load just sent"
            loads.append(last.load)
        assert last.load == 0 and loads[0] == 1  # "b" running, then none
        seen = []
        while not seen or seen[-1] != 0:  # the idle worker is pushed 1 and then 0, with no tokens
            report = await _recv(idle)
            assert isinstance(report, TokenBatch) and not report.deltas
            seen.append(report.load)
        assert seen[0] == 1
        extra = asyncio.ensure_future(_recv(busy, timeout=0.2))  # 8 push intervals: nothing more comes
        try:
            await extra
            raise AssertionError("busy worker got a load push its last TokenBatch had already carried")
        except asyncio.TimeoutError:
            pass
        server._on_signal(15)
        await asyncio.wait_for(task, 5)
        idle.close(0)
        busy.close(0)
        ctx.term()
    asyncio.run(go())


def test_a_crash_in_the_receive_path_is_announced_and_exits_non_zero():
    """engine.abort raising inside the receive loop: never a deaf replica that still looks alive."""
    async def go():
        ctx = zmq.asyncio.Context()
        agent = ctx.socket(zmq.ROUTER)
        port = agent.bind_to_random_port("tcp://127.0.0.1")
        server, task = await _start({"ttft_ms": 1, "itl_ms": 50, "abort_raises": True}, ctx,
                                    agent="tcp://127.0.0.1:%d" % port)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        await dealer.send_multipart(encode(GenerateRequest("a", prompt="p", params=SamplingParams(max_tokens=100))))
        await _recv(dealer)
        await dealer.send_multipart(encode(Abort(["a"])))
        await _expect_death(dealer, agent, task, "receive loop crashed", EXIT_CRASH)
        dealer.close(0)
        agent.close(0)
        ctx.term()
    asyncio.run(go())


def test_status_reports_the_ttft_p90_of_recent_requests():
    async def go():
        ctx = zmq.asyncio.Context()
        server, task = await _start({"ttft_ms": 150, "itl_ms": 5}, ctx)
        assert server.status().ttft_p90_s is None  # nothing served yet
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        for rid in ("a", "b"):
            await dealer.send_multipart(encode(GenerateRequest(rid, prompt="p", params=SamplingParams(max_tokens=2))))
        done = set()
        while len(done) < 2:
            msg = await _recv(dealer)
            done.update(d.request_id for d in msg.deltas if d.finish_reason)
        ttft = server.status().ttft_p90_s
        assert ttft is not None and 0.14 <= ttft < 1.0, ttft  # the mock engine's 150 ms to its first token
        server._on_signal(15)
        assert await asyncio.wait_for(task, 5) == 0
        dealer.close(0)
        ctx.term()
    asyncio.run(go())


def test_an_address_it_cannot_bind_is_a_usage_error_not_a_crash(caplog):
    """agent.host 192.0.2.1 (not this host's): the replica died with a traceback and exit 1, which the
    agent restarted six times with backoff; exit 2 (bad command line) stops that at once."""
    async def go():
        ctx = zmq.asyncio.Context()
        cfg = ReplicaConfig("r1", "mock", "m", {}, bind="tcp://192.0.2.1:*")
        code = await asyncio.wait_for(ReplicaServer(cfg, create_engine("mock", "m", {}), ctx).run(), 5)
        ctx.term()
        return code
    assert asyncio.run(go()) == EXIT_USAGE
    assert "cannot bind the data socket to tcp://192.0.2.1:*: Cannot assign requested address" in caplog.text


def test_an_engine_refusal_with_a_5xx_status_is_a_server_error_not_the_requests_fault():
    """EngineRequestError(status=503) ("engine is dead"), 501 (cannot resume): the RequestError's type was
    always invalid_request_error, which the client then got with its 5xx status."""
    class Refusing:
        name, model_card = "refusing", b""

        async def start(self, sink):
            pass

        def add_request(self, req):
            raise EngineRequestError("engine is dead", status=503) if req.request_id == "dead" else \
                EngineRequestError("bad prompt", param="prompt")

        def abort(self, request_id):
            pass

        def stats(self):
            return EngineStats(0, 0, 0.0)

        async def shutdown(self):
            pass

    async def go():
        ctx = zmq.asyncio.Context()
        cfg = ReplicaConfig("r1", "mock", "m", {}, status_interval=0.05, drain_seconds=0.5)
        server = ReplicaServer(cfg, Refusing(), ctx)
        task = asyncio.ensure_future(server.run())
        while not (server.endpoint and server._ready):
            await asyncio.sleep(0.01)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        got = {}
        for rid in ("dead", "bad"):
            await dealer.send_multipart(encode(GenerateRequest(rid, prompt="x")))
            msg = await _recv(dealer)
            while isinstance(msg, TokenBatch):
                msg = await _recv(dealer)
            got[rid] = (msg.status, msg.type)
        server._on_signal(15)
        await asyncio.wait_for(task, 5)
        dealer.close(0)
        ctx.term()
        return got

    assert asyncio.run(go()) == {"dead": (503, "server_error"), "bad": (400, "invalid_request_error")}
