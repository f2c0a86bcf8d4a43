"""Pure mapping between tokenrelay's requests and vLLM's arguments, for model_proc.vllm_engine.

Runs inside model_proc (called by `VllmEngine`); owns no socket and never imports vLLM, so all of it is
unit-tested without vLLM (tests/unit/test_vllm_mapping.py):
- `engine_arguments`: the `AsyncEngineArgs` keywords, with CPU-safe defaults only where the config is silent;
- `build_sampling_kwargs` and `resolve_max_tokens`: a plain request's sampling parameters, the model's
  generation-config defaults filling unset ones, and the completion budget that fits the context;
- `param_of_error`, `map_finish_reason`, `combine_stats`: vLLM's errors, finish reasons and scheduler
  numbers in tokenrelay's terms.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

from model_proc.engine import EngineRequestError, EngineStats
from runtime.protocol import SamplingParams

GiB = 1 << 30
CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KV_CACHE_BYTES = 1 * GiB
# Applied on CPU only, and only for keys the deployment's engine_args leave out.
CPU_DEFAULTS: dict[str, Any] = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 2048}
# tokenrelay parameter -> vLLM SamplingParams field (same names today; the table is the contract).
_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty",
                 "frequency_penalty")
# Generation-config defaults vLLM knows (`ModelConfig.get_diff_sampling_param`) that we also apply.
_DEFAULTABLE = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "min_p")
_PARAM_NAMES = frozenset(_PARAM_FIELDS + ("stop", "n"))


def build_sampling_kwargs(params: SamplingParams, defaults: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Keyword arguments for vLLM's `SamplingParams`, without `output_kind` and `max_tokens`.

    Unset fields fall back to the model's generation-config `defaults` (what vLLM's own OpenAI server
    does), then to vLLM's defaults. `max_tokens` is settled by `resolve_max_tokens`, which needs the
    prompt length.
    """
    kwargs: dict[str, Any] = {"n": 1}
    for name in _DEFAULTABLE:
        if defaults and defaults.get(name) is not None:
            kwargs[name] = defaults[name]
    for name in _PARAM_FIELDS:
        value = getattr(params, name)
        if value is not None and name != "max_tokens":
            kwargs[name] = value
    if params.stop:
        kwargs["stop"] = list(params.stop)
    return kwargs


def resolve_max_tokens(prompt_tokens: int, requested: Optional[int], max_model_len: int,
                       prompt_param: str, default: Optional[int] = None) -> int:
    """The completion budget for a prompt; raise EngineRequestError (400) when it cannot fit."""
    if prompt_tokens >= max_model_len:
        raise EngineRequestError(
            "this model's maximum context length is %d tokens, but the %s is %d tokens; shorten it"
            % (max_model_len, prompt_param, prompt_tokens), param=prompt_param)
    room = max_model_len - prompt_tokens
    if requested is None:
        return min(room, default) if default else room
    if requested < 1:
        raise EngineRequestError("max_tokens must be at least 1, got %d" % requested, param="max_tokens")
    if requested > room:
        raise EngineRequestError(
            "this model's maximum context length is %d tokens, but %d tokens were requested "
            "(%d in the %s, %d for the completion): lower max_tokens to at most %d or shorten the %s"
            % (max_model_len, prompt_tokens + requested, prompt_tokens, prompt_param, requested, room,
               prompt_param), param=prompt_param)
    return requested


def param_of_error(exc: BaseException) -> Optional[str]:
    """The request parameter a vLLM validation error is about (vLLM names it only sometimes)."""
    named = getattr(exc, "parameter", None)
    if named:
        return str(named)
    match = re.match(r"\s*([a-z_]+)\b", str(exc))
    if match and match.group(1) in _PARAM_NAMES:
        return match.group(1)
    return None


def map_finish_reason(reason: Optional[str]) -> Optional[str]:
    """vLLM finish reason -> ours: "stop"/"length" pass; "abort" -> None (the caller ends the request: a
    503 unless we cancelled it); others are errors."""
    if reason in ("stop", "length"):
        return reason
    if reason == "abort":
        return None
    raise RuntimeError("generation ended with finish_reason=%r" % reason)


def combine_stats(in_flight: int, running: int, waiting: int, kv_cache_usage: float) -> EngineStats:
    """Scheduler numbers lag a step behind our own count of requests; make the two agree."""
    if in_flight <= 0:
        return EngineStats(running=0, waiting=0, kv_cache_usage=max(0.0, kv_cache_usage))
    running = min(running, in_flight)
    return EngineStats(running=running, waiting=max(waiting, in_flight - running),
                       kv_cache_usage=min(1.0, max(0.0, kv_cache_usage)))


def engine_arguments(model: str, engine_args: dict[str, Any], on_cpu: bool,
                     environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The `AsyncEngineArgs` keywords: the config's own values, plus CPU defaults it leaves out."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    args = dict(engine_args)
    args["model"] = model
    if on_cpu:
        for key, value in CPU_DEFAULTS.items():
            args.setdefault(key, value)
        if "kv_cache_memory_bytes" not in args and not env.get(CPU_KV_CACHE_ENV):
            # Without either vLLM asks for 92% of NUMA node 0's memory.
            args["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    return args
