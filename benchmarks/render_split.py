"""What vLLM 0.32's render / token-in-token-out / derender split would move out of a replica's front end.

Issue 16 asks to choose, by measurement, between vLLM's serving classes inside the replica (what tokenrelay
runs: the replica's event loop shapes every token, as `vllm serve`'s API server does) and the split under
`vllm.entrypoints.scale_out` (a CPU-only render server turns OpenAI requests into token ids and generate
chunks back into OpenAI chunks; the engine's front end only moves token ids). This script measures, on
the same model, machine and load, the CPU seconds per 1,000 output tokens of:

  A  `vllm serve`'s API server, streaming /v1/chat/completions (the front end that tokenrelay's replica
     matches: benchmarks/vllm_compare.py shows 0.94-1.04 of it per token);
  B  `vllm serve --tokens-only`'s API server, streaming /inference/v1/generate with the token ids that the
     render server made from the same chat request (the engine-side front end of the split);
  C  the render server (`python -m vllm.entrypoints.launchers.render.entry`), derendering B's recorded
     chunk streams through /v1/chat/completions/derender, one call per chunk carrying `stream_state`, as
     vLLM designs it; with `--parser hermes` a second render server with a tool parser, whose stream
     state replays every earlier token of the stream on each chunk (it derenders the same recorded
     streams, plain text with no tool call, against the prompt of a request that offers a tool: the
     parser's cost on text, not on a call).

For each: the whole API-server process (without the engine core's process) and its event-loop thread.
On a GPU host the event-loop thread is what saturates first, so A/B bounds how many more tokens one
engine's front end could serve after the split, and C says how many render cores those tokens then need.
Servers run one at a time except the render server, which idles while B runs (it made B's requests).
Stops only the processes it started, by PID; talks to 127.0.0.1 only.

    python benchmarks/render_split.py                         # smollm2, 16 clients, ~4 min
    python benchmarks/render_split.py --clients 64 --duration 20 --parser hermes
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.meters import CpuMeter, MainThreadCpu  # noqa: E402
from benchmarks.stack import http  # noqa: E402
from benchmarks.vllm_compare import PROMPT, EngineSettings, VllmServer, settings_from  # noqa: E402
from runtime.proctree import collect_tree  # noqa: E402

log = logging.getLogger("bench")


class FlaggedServer(VllmServer):
    """A vLLM entry point with extra flags, ready when GET /health answers 200."""

    def __init__(self, settings: EngineSettings, module: str, extra: list[str], engine: bool = True) -> None:
        super().__init__(settings)
        self.module, self.extra, self.engine = module, extra, engine

    def start(self) -> None:
        import subprocess

        (self.dir / "rpc").mkdir()
        env = dict(os.environ, VLLM_RPC_BASE_PATH=str(self.dir / "rpc"))
        args = self.settings.vllm_args(self.port)
        if not self.engine:  # the render server takes the model options but allocates nothing
            args = [a for a in args if a != "--enforce-eager"]
        cmd = [sys.executable, "-m", self.module] + args + self.extra
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        log.info("bench [startup] %s %s pid %d on %s, logs %s", self.module, " ".join(self.extra),
                 self.proc.pid, self.url, self.log_path)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while http("GET", self.url + "/health", None, timeout=5.0)[0] != 200:
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("%s did not answer within %.0fs; see %s" % (self.module, timeout,
                                                                                self.log_path))
            time.sleep(0.5)

    def front_end_meters(self) -> dict[str, Any]:
        def root() -> list[Any]:
            return [] if self.proc is None else collect_tree(self.proc.pid)[:1]
        return {"process": CpuMeter(root, trees=False, overlaps=True), "loop": MainThreadCpu(root)}


# --------------------------------------------------------------------------- load


async def sse_events(resp: aiohttp.ClientResponse) -> Any:
    """The JSON payloads of a server-sent event stream (stops at [DONE])."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


class Window:
    """Tokens counted while the measured window is open, and the meters read at its edges."""

    def __init__(self, meters: dict[str, Any]) -> None:
        self.meters, self.open, self.tokens, self.errors = meters, False, 0, 0

    def add(self, n: int) -> None:
        if self.open:
            self.tokens += n


async def drive(clients: int, ramp: float, duration: float, meters: dict[str, Any],
                one: Callable[[aiohttp.ClientSession, Window], Any]) -> dict[str, Any]:
    """`clients` loops of `one` started over `ramp` seconds; the window is `duration` seconds after it."""
    win = Window(meters)
    stop_at = time.monotonic() + ramp + duration

    async def loop(i: int, session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(ramp * i / clients)
        while time.monotonic() < stop_at:
            try:
                await one(session, win)
            except (aiohttp.ClientError, ValueError, KeyError) as exc:
                win.errors += 1
                log.warning("bench [load] request failed: %s", exc)
                await asyncio.sleep(0.5)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks = [asyncio.create_task(loop(i, session)) for i in range(clients)]
        await asyncio.sleep(ramp)
        for m in meters.values():
            m.start()
        win.open, t0 = True, time.monotonic()
        await asyncio.sleep(duration)
        win.open = False
        for m in meters.values():
            m.stop()
        elapsed = time.monotonic() - t0
        await asyncio.gather(*tasks)
    out: dict[str, Any] = {"tokens": win.tokens, "tokens_per_s": win.tokens / elapsed, "errors": win.errors}
    for name, m in meters.items():
        out[name + "_cpu_s"] = m.seconds
        out[name + "_per_1k_tokens"] = 1000.0 * m.seconds / win.tokens if win.tokens and m.seconds else None
    return out


def chat_body(ns: argparse.Namespace, settings: EngineSettings) -> dict[str, Any]:
    body: dict[str, Any] = {"model": settings.name, "messages": [{"role": "user", "content": ns.prompt}],
                            "max_tokens": ns.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True}
    if ns.parser:
        body["tools"] = [{"type": "function", "function": {
            "name": "get_weather", "description": "the weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        body["tool_choice"] = "auto"
    return body


def full_chat(url: str, body: dict[str, Any]) -> Callable[[aiohttp.ClientSession, Window], Any]:
    """Tokens as they come: one per chunk with text; with ignore_eos every answer has exactly max_tokens,
    so what the chunks did not show (outputs merged into one chunk, deltas without text) is added when
    the answer ends: the same count as B's token ids, without asking for usage in every chunk."""
    async def one(session: aiohttp.ClientSession, win: Window) -> None:
        seen = 0
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for event in sse_events(resp):
                for choice in event.get("choices") or []:
                    if choice.get("delta", {}).get("content"):
                        seen += 1
                        win.add(1)
        win.add(max(0, body["max_tokens"] - seen))
    return one


def token_generate(url: str, rendered: dict[str, Any], record: list[list[dict[str, Any]]]
                   ) -> Callable[[aiohttp.ClientSession, Window], Any]:
    async def one(session: aiohttp.ClientSession, win: Window) -> None:
        req = dict(rendered, request_id=str(uuid.uuid4()), stream=True)
        chunks = []
        async with session.post(url + "/inference/v1/generate", json=req) as resp:
            resp.raise_for_status()
            async for event in sse_events(resp):
                win.add(sum(len(c.get("token_ids") or []) for c in event.get("choices") or []))
                chunks.append(event)
        if len(record) < 4:
            record.append(chunks)
    return one


def derender(url: str, streams: list[list[dict[str, Any]]], prompt_ids: list[int],
             chat_request: Optional[dict[str, Any]]) -> Callable[[aiohttp.ClientSession, Window], Any]:
    if not streams:
        raise RuntimeError("phase B recorded no chunk stream to derender")
    turn = [0]

    async def one(session: aiohttp.ClientSession, win: Window) -> None:
        chunks = streams[turn[0] % len(streams)]
        turn[0] += 1
        state = None
        for chunk in chunks:
            body: dict[str, Any] = {"stream": True, "generate_chunk": chunk, "stream_state": state,
                                    "prompt_token_ids": prompt_ids}
            if chat_request is not None:
                body["chat_request"] = chat_request
            async with session.post(url + "/v1/chat/completions/derender", json=body) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise ValueError("derender answered %d: %s" % (resp.status, str(answer)[:300]))
            state = answer["stream_state"]
            win.add(sum(len(c.get("token_ids") or []) for c in chunk.get("choices") or []))
    return one


# --------------------------------------------------------------------------- phases


def render_request(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The render server's token-in GenerateRequest for one chat request."""
    status, raw = http("POST", url + "/v1/chat/completions/render", body, timeout=30.0)
    if status != 200:
        raise RuntimeError("render answered %d: %r" % (status, raw[:500]))
    rendered: dict[str, Any] = json.loads(raw)
    return rendered


def run_phase(label: str, server: FlaggedServer, ns: argparse.Namespace,
              one: Callable[[aiohttp.ClientSession, Window], Any]) -> dict[str, Any]:
    log.info("bench [run] %s: %d clients, %.0fs ramp, %.0fs measured", label, ns.clients, ns.ramp, ns.duration)
    result = asyncio.run(drive(ns.clients, ns.ramp, ns.duration, server.front_end_meters(), one))
    log.info("bench [run] %s: %s", label, json.dumps(result))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--ramp", type=float, default=8.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--parser", default=None, help="also derender with this tool parser (e.g. hermes)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", default=None)
    ns = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s")
    settings = settings_from(ns)
    os.environ.update(settings.environment())
    parser_ns = copy.copy(ns)
    ns.parser = None
    body = chat_body(ns, settings)
    results: dict[str, Any] = {"settings": vars(ns) | {"parser": parser_ns.parser}}
    render_mod = "vllm.entrypoints.launchers.render.entry"
    servers: list[FlaggedServer] = []
    try:
        render = FlaggedServer(settings, render_mod, [], engine=False)
        servers.append(render)
        render.start()
        render.wait_ready(ns.start_timeout)
        rendered = render_request(render.url, body)
        log.info("bench [render] %d prompt tokens", len(rendered["token_ids"]))

        full = FlaggedServer(settings, "vllm.entrypoints.openai.api_server", [])
        servers.append(full)
        full.start()
        full.wait_ready(ns.start_timeout)
        results["A_full_chat"] = run_phase("A full chat front end", full, ns, full_chat(full.url, body))
        full.stop()

        tokens = FlaggedServer(settings, "vllm.entrypoints.openai.api_server", ["--tokens-only"])
        servers.append(tokens)
        tokens.start()
        tokens.wait_ready(ns.start_timeout)
        record: list[list[dict[str, Any]]] = []
        results["B_tokens_only"] = run_phase("B tokens-only front end", tokens, ns,
                                             token_generate(tokens.url, rendered, record))
        tokens.stop()

        results["C_derender_plain"] = run_phase("C derender (no parser)", render, ns,
                                                derender(render.url, record, rendered["token_ids"], None))
        render.stop()
        if parser_ns.parser:
            parsed = FlaggedServer(settings, render_mod, ["--tool-call-parser", parser_ns.parser,
                                                          "--enable-auto-tool-choice"], engine=False)
            servers.append(parsed)
            parsed.start()
            parsed.wait_ready(ns.start_timeout)
            pbody = chat_body(parser_ns, settings)
            prendered = render_request(parsed.url, pbody)
            results["C_derender_" + parser_ns.parser] = run_phase(
                "C derender (%s parser)" % parser_ns.parser, parsed, ns,
                derender(parsed.url, record, prendered["token_ids"], pbody))
    finally:
        for s in servers:
            if s.proc is not None and s.proc.poll() is None:
                s.stop()
    print_table(results)
    out = Path(ns.out) if ns.out else Path(__file__).parent / "results" / ("render_split-%d.json" % time.time())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log.info("bench [done] wrote %s", out)
    return 0


def print_table(results: dict[str, Any]) -> None:
    def f(v: Optional[float]) -> str:
        return "-" if v is None else "%.4f" % v
    print("%-22s %9s %7s %22s %22s" % ("phase", "tokens/s", "errors", "process CPU s/1k tok",
                                       "loop thread CPU s/1k tok"))
    for name, r in results.items():
        if name == "settings":
            continue
        print("%-22s %9.0f %7d %22s %22s" % (name, r["tokens_per_s"], r["errors"], f(r["process_per_1k_tokens"]),
                                            f(r["loop_per_1k_tokens"])))
    a, b = results.get("A_full_chat"), results.get("B_tokens_only")
    if a and b and a["loop_per_1k_tokens"] and b["loop_per_1k_tokens"]:
        print("engine-side front end, loop thread: tokens-only / full chat = %.3f"
              % (b["loop_per_1k_tokens"] / a["loop_per_1k_tokens"]))


if __name__ == "__main__":
    sys.exit(main())
