"""One replica alone under load: its CPU per 1,000 streamed tokens, messages per token, optional py-spy.

Runs as a script in its own process: starts `python -m model_proc --engine mock` on a free 127.0.0.1 port
(no agent, no head, no proxy) and drives it like `--peers` proxy workers would, with plain ZeroMQ DEALERs
(one identity each) from one poll loop in this process, keeping `--concurrency` requests in flight (a new
one as soon as one finishes). It reports the replica's CPU seconds per 1,000 tokens over the measured
window, tokens and TokenBatch messages per second, and with `--py-spy` the top functions of the replica
(benchmarks.profile_serving's folding). It measures what the serving path costs on the replica side,
without the proxy's noise. Stops only the replica it started.

    python benchmarks/profile_replica.py --concurrency 500 --duration 20
    python benchmarks/profile_replica.py --concurrency 500 --duration 20 --py-spy --top 20 --out results/replica
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import zmq  # noqa: E402

from benchmarks.profile_serving import Recorder, format_top  # noqa: E402
from benchmarks.stack import REPO, free_port, stop_process  # noqa: E402
from runtime.protocol import GenerateRequest, RequestError, SamplingParams, TokenBatch, decode_frames, encode  # noqa: E402

log = logging.getLogger("bench")


class Driver:
    """`peers` DEALERs to the replica, `concurrency` requests kept in flight over them (round robin)."""

    def __init__(self, endpoint: str, peers: int, concurrency: int, max_tokens: int) -> None:
        self.ctx = zmq.Context()
        self.socks = []
        for i in range(peers):
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, b"bench-peer-%d" % i)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.RCVHWM, 0)
            s.connect(endpoint)
            self.socks.append(s)
        self.concurrency = concurrency
        self.params = SamplingParams(max_tokens=max_tokens)
        self.next_id = 0
        self.started = 0  # requests started by the ramp (then each finished one starts the next)
        self.tokens = 0
        self.messages = 0
        self.finished = 0
        self.errors = 0

    def _submit(self, sock: zmq.Socket) -> None:
        self.next_id += 1
        req = GenerateRequest("b%d" % self.next_id, prompt="profile the replica %d" % self.next_id,
                              params=self.params)
        sock.send_multipart(encode(req))

    def run(self, seconds: float, ramp: float) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        start = time.monotonic()
        end = start + seconds
        while time.monotonic() < end:
            due = min(self.concurrency, int(self.concurrency * (time.monotonic() - start) / ramp) + 1
                      if ramp > 0 else self.concurrency)
            while self.started < due:
                self._submit(self.socks[self.started % len(self.socks)])
                self.started += 1
            for sock, _ in poller.poll(20):
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on(sock, decode_frames(frames))

    def _on(self, sock: zmq.Socket, msg: Any) -> None:
        if isinstance(msg, TokenBatch):
            if not msg.deltas:
                return  # a load report
            self.messages += 1
            for d in msg.deltas:
                if d.text:
                    self.tokens += 1
                if d.finish_reason is not None:
                    self.finished += 1
                    self._submit(sock)
        elif isinstance(msg, RequestError):
            self.errors += 1
            self._submit(sock)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run(ns: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    engine_args = {"ttft_ms": ns.ttft_ms, "itl_ms": ns.itl_ms, "tokens": ns.tokens}
    cmd = [sys.executable, "-m", "model_proc", "--replica-id", "bench", "--engine", "mock",
           "--engine-args", json.dumps(engine_args), "--bind", "tcp://127.0.0.1:%d" % port,
           "--metrics-port", "-1", "--log-level", "WARNING", "--event-loop", ns.event_loop,
           "--insecure"]  # the driver's DEALERs are plain: this measures the replica's own cost
    replica = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL)
    driver = Driver("tcp://127.0.0.1:%d" % port, ns.peers, ns.concurrency, ns.tokens)
    try:
        time.sleep(1.0)  # imports and bind; the first requests wait in the DEALERs' queues anyway
        proc = psutil.Process(replica.pid)
        driver.run(ns.ramp, ns.ramp)  # ramp: not measured
        t0, cpu0, tok0, msg0 = time.monotonic(), cpu_seconds(proc), driver.tokens, driver.messages
        recorder = None
        if ns.py_spy:
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            recorder = Recorder(pyspy, Path(ns.out), ns.rate, ns.duration)
            recorder.start({"replica": [proc]})
        driver.run(ns.duration, 0.0)
        wall, cpu = time.monotonic() - t0, cpu_seconds(proc) - cpu0
        tokens, messages = driver.tokens - tok0, driver.messages - msg0
        profiles = recorder.wait() if recorder else []
    finally:
        driver.close()
        stop_process(replica, [], grace=5.0, sig=signal.SIGTERM)
    keys = ("concurrency", "peers", "ttft_ms", "itl_ms", "tokens", "duration", "ramp", "event_loop")
    return {"settings": {k: getattr(ns, k) for k in keys},
            "window_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "messages_per_s": round(messages / wall, 1),
            "tokens_per_message": round(tokens / max(messages, 1), 2),
            "replica_cpu_s": round(cpu, 3), "replica_cores": round(cpu / wall, 3),
            "replica_cpu_ms_per_1k_tokens": round(1e6 * cpu / max(tokens, 1), 3),
            "errors": driver.errors, "profiles": profiles}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="One mock replica under load: CPU per token, optional py-spy.")
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--peers", type=int, default=2, help="proxy workers to imitate (DEALER identities)")
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--itl-ms", type=float, default=50.0)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--ramp", type=float, default=5.0, help="seconds to reach full concurrency (not measured)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="the replica's event loop (model_proc --event-loop)")
    p.add_argument("--py-spy", action="store_true", help="profile the replica over the measured window")
    p.add_argument("--rate", type=int, default=100)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default="benchmarks/results",
                   help="directory for the .folded stacks and replica.json (default %(default)s, git-ignored)")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    res = run(ns)
    print("replica: %(tokens_per_s).0f tokens/s in %(messages_per_s).0f TokenBatch/s (%(tokens_per_message).1f "
          "tokens each), %(replica_cores).3f cores, %(replica_cpu_ms_per_1k_tokens).2f ms CPU per 1k tokens, "
          "%(errors)d errors" % res)
    for role, pid, folded in res.pop("profiles"):
        if folded is not None:
            print(format_top("%s pid %d" % (role, pid), folded, ns.top, ns.rate, ns.duration))
    (Path(ns.out) / "replica.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
