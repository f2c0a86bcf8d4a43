import asyncio

import pytest

from model_proc.engine import EngineLoadError, EngineRequestError, create_engine
from runtime.protocol import ChatMessage, GenerateRequest, Resume, SamplingParams


class Sink:
    def __init__(self):
        self.deltas = []
        self.errors = []
        self.fatals = []
        self.done = asyncio.Event()

    def emit(self, rid, text, finish, prompt_tokens, completion_tokens, token_ids=()):
        self.deltas.append((rid, text, finish, prompt_tokens, completion_tokens))
        self.ids = getattr(self, "ids", []) + list(token_ids)
        self.times = getattr(self, "times", []) + [asyncio.get_running_loop().time()]
        if finish:
            self.done.set()

    def error(self, rid, status, message, param=None):
        self.errors.append((rid, status, message))

    def fatal(self, reason):
        self.fatals.append(reason)
        self.done.set()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_deterministic_text_honours_max_tokens_and_counts():
    async def go():
        eng = create_engine("mock", "m", {"ttft_ms": 1, "itl_ms": 1})
        sink = Sink()
        await eng.start(sink)
        eng.add_request(GenerateRequest("a", prompt="one two three", params=SamplingParams(max_tokens=5)))
        await sink.done.wait()
        return sink.deltas
    first, second = run(go()), run(go())
    assert first == second
    assert len(first) == 5
    assert [d[2] for d in first] == [None] * 4 + ["length"]
    assert first[-1][3:] == (3, 5)


def test_chat_and_stop_string():
    async def go():
        eng = create_engine("mock", "m", {"ttft_ms": 0, "itl_ms": 0, "tokens": 50})
        sink = Sink()
        await eng.start(sink)
        eng.add_request(GenerateRequest("c", messages=[ChatMessage("user", "hi")],
                                        params=SamplingParams(stop=["lazy"])))
        await sink.done.wait()
        return sink.deltas
    deltas = run(go())
    assert deltas[-1][2] == "stop"
    assert "lazy" not in "".join(d[1] for d in deltas)


def _stopped(stop, max_tokens=20):
    async def go():
        eng = create_engine("mock", "m", {"ttft_ms": 0, "itl_ms": 0})
        sink = Sink()
        await eng.start(sink)
        eng.add_request(GenerateRequest("s", prompt="hi", params=SamplingParams(max_tokens=max_tokens, stop=stop)))
        await sink.done.wait()
        return sink
    return run(go())


@pytest.mark.parametrize("stop", [["zy d"], ["og wh", "nope"], ["y"], ["dog while tokens"]])
def test_a_stop_string_ends_the_text_wherever_it_falls_as_in_vllm(stop):
    """Only a whole word stopped the mock: "zy d" (across two tokens) or "y" (inside one) never did, and
    the answer ran to max_tokens with the stop string in it."""
    full = "".join(d[1] for d in _stopped([], 20).deltas)  # "a lazy dog while tokens ..." for "hi"
    sink = _stopped(stop)
    text = "".join(d[1] for d in sink.deltas)
    end, first = min((full.find(s), s) for s in stop if s in full)
    assert text == full[:end] and sink.deltas[-1][2] == "stop"
    assert all(d[1] for d in sink.deltas[:-1])  # no empty chunks while text is held back
    assert sink.deltas[-1][4] == len(full[:end + len(first)].split())  # tokens: up to the one completing it
    assert getattr(sink, "ids", []) == []  # held-back text has no token ids: not resumable, as on vLLM


def test_a_stop_string_that_never_comes_holds_back_nothing_at_the_end():
    full = "".join(d[1] for d in _stopped([], 6).deltas)
    sink = _stopped(["zzz"], 6)
    assert "".join(d[1] for d in sink.deltas) == full and sink.deltas[-1][2] == "length"


def test_abort_stops_generation_and_max_running_queues():
    async def go():
        eng = create_engine("mock", "m", {"ttft_ms": 1, "itl_ms": 5, "tokens": 1000, "max_running": 1})
        sink = Sink()
        await eng.start(sink)
        eng.add_request(GenerateRequest("a", prompt="x"))
        eng.add_request(GenerateRequest("b", prompt="y", params=SamplingParams(max_tokens=2)))
        assert (eng.stats().running, eng.stats().waiting) == (1, 1)
        await asyncio.sleep(0.05)
        eng.abort("a")
        eng.abort("a")  # idempotent
        count = len([d for d in sink.deltas if d[0] == "a"])
        await sink.done.wait()
        await asyncio.sleep(0.05)
        return count, sink.deltas, eng.stats()
    count, deltas, stats = run(go())
    assert 0 < count == len([d for d in deltas if d[0] == "a"])
    assert deltas[-1][0] == "b" and deltas[-1][2] == "length"
    assert (stats.running, stats.waiting) == (0, 0)


def test_bad_args_and_too_long_prompts():
    with pytest.raises(EngineLoadError, match="unknown mock engine_args"):
        create_engine("mock", "m", {"speed": 3})
    with pytest.raises(EngineLoadError, match="unknown engine"):
        create_engine("tensorrt", "m", {})

    async def go():
        eng = create_engine("mock", "m", {"max_context": 4})
        await eng.start(Sink())
        eng.add_request(GenerateRequest("a", prompt="a b c", params=SamplingParams(max_tokens=2)))
    with pytest.raises(EngineRequestError, match="maximum context length is 4"):
        run(go())


def _generate(request, args=None):
    async def go():
        eng = create_engine("mock", "m", args or {"ttft_ms": 0, "itl_ms": 0})
        sink = Sink()
        await eng.start(sink)
        eng.add_request(request)
        await sink.done.wait()
        return sink
    return run(go())


def test_resumed_request_continues_exactly_where_the_lost_replica_was():
    params = SamplingParams(max_tokens=12)
    whole = _generate(GenerateRequest("a", prompt="resume me", params=params))
    for cut in (1, 5, 11):
        rest = _generate(GenerateRequest("b", prompt="resume me", params=params, resume=Resume(whole.ids[:cut])))
        assert "".join(d[1] for d in whole.deltas[:cut] + rest.deltas) == "".join(d[1] for d in whole.deltas)
        assert [d[4] for d in rest.deltas] == list(range(cut + 1, 13))  # counts include the replayed tokens
        assert rest.deltas[-1][2] == "length"
    done = _generate(GenerateRequest("c", prompt="resume me", params=params, resume=Resume(whole.ids)))
    assert done.deltas == [("c", "", "length", 2, 12)]  # only the end was lost


def test_resume_with_foreign_token_ids_is_refused():
    async def go():
        eng = create_engine("mock", "m", {})
        await eng.start(Sink())
        eng.add_request(GenerateRequest("x", prompt="p", resume=Resume([10**6])))
    with pytest.raises(EngineRequestError, match="resume"):
        run(go())


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: where it would sleep until the next timer, its clock jumps there.
    `stall` makes it late, as a callback that blocked the loop would; no wall clock is read."""

    def __init__(self):
        super().__init__()
        self.now = 0.0
        select = self._selector.select

        def jump(timeout=None):
            events = select(0)
            if not events and timeout:
                self.now += timeout
            return events
        self._selector.select = jump

    def time(self):
        return self.now

    def stall(self, seconds):
        self.now += seconds


def test_tokens_follow_an_absolute_schedule_without_drift():
    """A loop stalled for 30 ms mid-stream delays the tokens due meanwhile, not every later one."""
    async def go():
        eng = create_engine("mock", "m", {"ttft_ms": 20, "itl_ms": 5})
        sink = Sink()
        await eng.start(sink)
        loop = asyncio.get_running_loop()
        begun = loop.time()
        eng.add_request(GenerateRequest("t", prompt="timing", params=SamplingParams(max_tokens=40)))
        loop.call_later(0.0625, loop.stall, 0.03)  # the loop is late by 30 ms once, between tokens 8 and 9
        await sink.done.wait()
        return begun, sink.times
    loop = VirtualTimeLoop()
    try:
        begun, times = loop.run_until_complete(asyncio.wait_for(go(), 10))
    finally:
        loop.close()
    assert len(times) == 40
    due = [begun + 0.020 + k * 0.005 for k in range(40)]
    late = [round(t - d, 6) for t, d in zip(times, due, strict=True)]
    assert late[:9] == [0.0] * 9 and late[9] > 0.02  # the stall delays the token due during it ...
    assert late[-1] == 0.0, late  # ... and no later one: the last is on time, not 30 ms late


def test_relayed_openai_bodies_are_refused_naming_the_endpoint():
    async def go():
        eng = create_engine("mock", "m", {})
        await eng.start(Sink())
        eng.add_request(GenerateRequest("a", endpoint="/v1/responses", body=b'{"model":"m","input":"x"}'))
    with pytest.raises(EngineRequestError, match="does not serve /v1/responses") as exc:
        run(go())
    assert exc.value.param == "endpoint" and exc.value.status == 400


@pytest.mark.parametrize("args, message", [
    ({"max_running": -1}, "max_running must be an integer >= 0, got -1"),  # queued every request forever
    ({"max_running": 2.7}, "max_running must be an integer"),  # silently 2
    ({"abort_raises": "false"}, "abort_raises must be true or false"),  # was true: every abort crashed
    ({"fatal_trigger": 5}, "fatal_trigger must be a non-empty string"),  # every request a 500
    ({"max_context": -3}, "max_context must be an integer >= 1"),  # every request a 400
    ({"tokens": True}, "tokens must be an integer >= 1"),  # was 1
    ({"ttft_ms": "20"}, "ttft_ms must be a number >= 0"),
    ({"itl_ms": -1}, "itl_ms must be a number >= 0"),
    ({"startup_ms": float("nan")}, "startup_ms must be a number >= 0"),
])
def test_engine_args_of_the_wrong_type_or_range_stop_the_replica_at_start(args, message):
    """A bad value is an EngineLoadError (the replica does not start, the operator reads why), never a
    replica that hangs or crashes on its requests."""
    with pytest.raises(EngineLoadError, match=message):
        create_engine("mock", "m", args)


def test_max_running_zero_or_absent_is_unlimited():
    assert create_engine("mock", "m", {"max_running": 0}).max_running is None
    assert create_engine("mock", "m", {}).max_running is None
    assert create_engine("mock", "m", {"max_running": 3, "ttft_ms": 1.5, "fatal_trigger": "X"}).max_running == 3
