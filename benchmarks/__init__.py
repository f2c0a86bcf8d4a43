"""tokenrelay benchmarks: load generation and serving-path measurements. They print numbers; tests check
behaviour.

Runs only in benchmark processes, never inside the serving stack; owns no socket at import time.

Module map:
  wire.py          pure: chunked transfer decoding, SSE event classification, per-stream accounting
  stats.py         pure: request records, percentiles, run summaries
  http_client.py   one keep-alive HTTP/1.1 connection streaming one request at a time (asyncio streams)
  loadgen.py       closed-loop load generator: library (`run_level`) and CLI, with `--self-test`
  selftest.py      `loadgen.py --self-test`: the generator's own ceiling against an in-process floor
  floor_server.py  the no-proxy baseline: answers the OpenAI streaming endpoints with mock timing
  plot.py          matplotlib (Agg) charts of several concurrency levels
  stack.py         start/stop a `python -m runtime up` stack and sample the proxy's CPU time
  serving_path.py  tokenrelay vs the floor under the same load, as a comparison table

Scripts run either as `python benchmarks/loadgen.py ...` or `python -m benchmarks.loadgen ...` from the
repository root.
"""
