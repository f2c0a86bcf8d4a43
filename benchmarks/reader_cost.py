"""CPU a proxy worker spends per TokenBatch message in its replica reader (proxy.replicas).

Runs as a script: forks a sender process with a plain ZeroMQ ROUTER that plays a replica, and in this
process (gevent, monkey-patched like a gunicorn worker) opens one real `ReplicaConnection` with
`--streams` requests in flight. The sender paces `--messages` TokenBatches, one delta per stream each,
`--gap-ms` apart, so that (as at 1,000 streams, where ~850 messages a second reach one worker) almost
every message finds the reader parked and has to wake it. Nothing waits on the streams per message (the
direct-write path does not wake request greenlets either); the main greenlet only looks for the final
delta. Prints this process's CPU (user + system, libzmq's I/O thread included) per message over the
window between the first and the final delta. Stops what it started.

    python benchmarks/reader_cost.py                      # 15,000 messages, 1 ms apart, 22 streams
    python benchmarks/reader_cost.py --messages 5000 --gap-ms 2

To compare two versions of the reader, run it from each checkout: it imports the `proxy` package of the
tree it is in.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _sender(port: int, messages: int, gap: float, streams: int, ready, done) -> None:
    import zmq  # plain (blocking) ZeroMQ: this process is not the gevent one
    from gevent.monkey import get_original

    from runtime.protocol import Delta, TokenBatch, decode_frames, encode

    sleep = get_original("time", "sleep")

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 1000)
    router.bind("tcp://127.0.0.1:%d" % port)
    ready.set()
    ids = []
    peer = b""
    while len(ids) < streams:
        peer, *frames = router.recv_multipart()
        ids.append(decode_frames(frames).request_id)
    due = time.perf_counter()
    for n in range(messages):
        finish = "length" if n == messages - 1 else None
        router.send_multipart([peer] + encode(TokenBatch([Delta(i, "tok ", finish, 1, n + 1) for i in ids],
                                                         load=streams)))
        due += gap
        left = due - time.perf_counter()
        if left > 0:
            sleep(left)
    done.wait(60)  # until the reader has closed: no "lost connection" on its side
    router.close()
    ctx.term()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=15000)
    ap.add_argument("--gap-ms", type=float, default=1.0, help="time between two messages")
    ap.add_argument("--streams", type=int, default=22, help="requests in flight (deltas per message)")
    ap.add_argument("--port", type=int, default=0, help="sender's port (default: a free one)")
    args = ap.parse_args(argv)
    if args.messages < 2 or args.streams < 1:
        ap.error("need --messages >= 2 and --streams >= 1")

    from gevent import monkey

    monkey.patch_all()
    import gevent
    import zmq.green as zmq_green

    sys.path.insert(0, str(REPO))
    from proxy.replicas import ReplicaConnection
    from proxy.streams import RequestStream
    from runtime.protocol import GenerateRequest, ReplicaRoute

    port = args.port
    if not port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    fork = mp.get_context("fork")
    ready, done = fork.Event(), fork.Event()
    sender = fork.Process(target=_sender, daemon=True,
                          args=(port, args.messages, args.gap_ms / 1000.0, args.streams, ready, done))
    sender.start()
    try:
        if not ready.wait(10):
            print("sender did not start", file=sys.stderr)
            return 1
        ctx = zmq_green.Context()
        route = ReplicaRoute("r1", "tcp://127.0.0.1:%d" % port, 0, 0, 0.0, args.streams)
        conn = ReplicaConnection(ctx, b"reader-cost", "bench", route, hwm=1_000_000)
        streams = []
        for i in range(args.streams):
            stream = RequestStream("req-%d" % i, "r1", max_pending=1 << 30)
            conn.submit(stream, GenerateRequest(stream.request_id, prompt="x"))
            streams.append(stream)
        last = streams[-1]
        if last.get(30.0) is None:
            print("no first message within 30 s", file=sys.stderr)
            return 1
        cpu0, t0 = _cpu(), time.perf_counter()
        deadline = t0 + args.messages * args.gap_ms / 1000.0 * 3 + 30
        while not last.finished and time.perf_counter() < deadline:
            gevent.sleep(0.05)
            for stream in streams:  # keep memory flat; what the request greenlets would take
                stream.drain(1 << 30)
        cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
        conn.close("benchmark over")
        ctx.destroy(linger=0)
        if not last.finished:
            print("the final delta never came", file=sys.stderr)
            return 1
        n = args.messages - 1
        print("reader: %d messages of %d deltas in %.1f s (%.0f/s): %.1f us CPU per message, %.2f us per "
              "delta, %.3f of a core" % (n, args.streams, wall, n / wall, cpu / n * 1e6,
                                         cpu / n / args.streams * 1e6, cpu / wall))
        return 0
    finally:
        done.set()
        sender.join(5)
        if sender.is_alive():
            sender.terminate()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
