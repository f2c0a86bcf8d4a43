"""Locust version of the load generator's workload: streaming completions, TTFT and inter-token as their
own metrics, each request counted once.

Runs inside Locust (gevent; `pip install -e '.[bench]'`). Every simulated user holds one keep-alive
connection (FastHttpUser), sends a streaming request, reads the whole SSE stream, and sends the next
(closed loop, like benchmarks/loadgen.py). Locust's request statistics get exactly one entry per request:
name `<path> (stream)`, response time = end to end (to `[DONE]`), failure when the status is not 200, the
stream carries an error event, or it ends without `[DONE]`. Time to first token and the gaps between
content events are kept in a separate Locust `RequestStats` (never in the request table, so the totals
are not doubled, which the old system's Locust file did), merged from workers in distributed mode, and
printed (and with `--latency-json PATH` written) when the test stops.

    locust -f benchmarks/locustfile.py --headless -H http://127.0.0.1:8000 -u 200 -r 20 -t 60s \
        --model mock --max-tokens 128 --latency-json results/locust-latency.json
    locust -f benchmarks/locustfile.py --headless -H ... -u 1000 -r 50 -t 80s --processes 2   # more load

Options (besides Locust's own): --endpoint completions|chat, --model, --max-tokens, --prompt,
--think SECONDS, --latency-json PATH. One Locust process tops out at a few thousand streamed events
per second; for the 1,000-stream scenario use `--processes` (or benchmarks/loadgen.py, which is lighter).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

from locust import FastHttpUser, constant, events, task
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import RequestStats, StatsEntry

log = logging.getLogger("locust.tokenrelay")

LATENCY = RequestStats(use_response_times_cache=False)  # TTFT and inter-token; not request counts
TTFT_NAME, ITL_NAME, KIND = "time to first token", "inter-token", "STREAM"
_DONE = b"data: [DONE]"


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--model", default="mock")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default="Tell me a story about relays and replicas")
    parser.add_argument("--think", type=float, default=0.0, help="seconds between a user's requests")
    parser.add_argument("--latency-json", default="", help="write TTFT / inter-token percentiles here")


class StreamScan:
    """Byte-level SSE accounting of one response (no JSON parsing per event, like benchmarks/wire.py)."""

    __slots__ = ("start", "first", "last", "events", "done", "error", "_tail", "gaps")

    def __init__(self, start: float) -> None:
        self.start = start
        self.first: Optional[float] = None
        self.last = 0.0
        self.events = 0
        self.done = False
        self.error = False
        self.gaps: list[float] = []
        self._tail = b""

    def feed(self, data: bytes, now: float) -> None:
        buf = self._tail + data
        parts = buf.split(b"\n\n")
        self._tail = parts.pop()
        for event in parts:
            if event.startswith(_DONE):
                self.done = True
            elif event.startswith(b'data: {"error"'):
                self.error = True
            elif b'"content":"' in event or b'"text":"' in event:
                if b'"content":""' in event or b'"text":""' in event:
                    continue  # the finish chunk: no token
                if self.first is None:
                    self.first = now
                else:
                    self.gaps.append(now - self.last)
                self.last = now
                self.events += 1


class StreamingUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.path = "/v1/chat/completions" if opts.endpoint == "chat" else "/v1/completions"
        body: dict[str, Any] = {"model": opts.model, "stream": True, "max_tokens": opts.max_tokens}
        if opts.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": opts.prompt}]
        else:
            body["prompt"] = opts.prompt
        self.body = json.dumps(body).encode()
        self.think = opts.think

    @task
    def stream(self) -> None:
        start = time.perf_counter()
        scan = StreamScan(start)
        size = 0
        problem = ""
        with self.client.post(self.path, data=self.body, headers={"Content-Type": "application/json"},
                              stream=True, catch_response=True, name=self.path + " (stream)") as resp:
            if resp.status_code != 200:
                problem = "HTTP %s" % resp.status_code
            else:
                try:  # one SSE event per read, timed when it arrives (iter_content waits for full blocks)
                    raw = resp._response
                    while True:
                        event = raw.readline(b"\n\n")
                        if not event:
                            break
                        size += len(event)
                        scan.feed(event, time.perf_counter())
                except Exception as exc:  # a broken stream is this request's failure, reported once
                    problem = "stream broke: %s" % exc
                if not problem and (scan.error or not scan.done):
                    problem = "error event" if scan.error else "stream ended without [DONE]"
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000.0  # end to end
            resp.request_meta["response_length"] = size
            if problem:
                resp.failure(problem)
            else:
                resp.success()
                if scan.first is not None:
                    LATENCY.log_request(KIND, TTFT_NAME, (scan.first - start) * 1000.0, 0)
                for gap in scan.gaps:
                    LATENCY.log_request(KIND, ITL_NAME, gap * 1000.0, 0)
        if self.think:
            time.sleep(self.think)  # gevent-patched: yields


# --------------------------------------------------------------------------- distributed mode and report


@events.report_to_master.add_listener
def _to_master(client_id: str, data: dict) -> None:
    data["tokenrelay_latency"] = [e.serialize() for e in LATENCY.entries.values()]
    LATENCY.clear_all()  # the master keeps the totals


@events.worker_report.add_listener
def _from_worker(client_id: str, data: dict) -> None:
    for raw in data.get("tokenrelay_latency", []):
        entry = StatsEntry.unserialize(raw, LATENCY)
        LATENCY.get(entry.name, entry.method).extend(entry)


@events.test_start.add_listener
def _reset(environment: Any, **_: Any) -> None:
    LATENCY.clear_all()


def summary() -> dict[str, Any]:
    out = {}
    for name in (TTFT_NAME, ITL_NAME):
        e = LATENCY.entries.get((name, KIND))
        if e is None or not e.num_requests:
            continue
        out[name] = {"count": e.num_requests, "p50_ms": e.get_response_time_percentile(0.5),
                     "p90_ms": e.get_response_time_percentile(0.9), "p99_ms": e.get_response_time_percentile(0.99),
                     "max_ms": e.max_response_time, "mean_ms": round(e.avg_response_time, 2)}
    return out


@events.quitting.add_listener
def _report(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master (or the only process) reports
    res = summary()
    for name, s in res.items():
        logging.getLogger("locust.tokenrelay").info(
            "%s: count %d, p50 %s ms, p90 %s ms, p99 %s ms, max %s ms", name, s["count"], s["p50_ms"],
            s["p90_ms"], s["p99_ms"], s["max_ms"])
    path = getattr(environment.parsed_options, "latency_json", "")
    if path:
        with open(path, "w") as fh:
            json.dump({"latency": res, "master": isinstance(environment.runner, MasterRunner)}, fh, indent=2)
