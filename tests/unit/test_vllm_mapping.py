"""model_proc.vllm_mapping (the vLLM engine's pure request mapping), tested without vLLM imported."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from model_proc.engine import EngineRequestError, EngineStats
from model_proc.vllm_engine import VllmEngine
from model_proc.vllm_mapping import (
    CPU_DEFAULTS,
    DEFAULT_CPU_KV_CACHE_BYTES,
    build_sampling_kwargs,
    combine_stats,
    engine_arguments,
    map_finish_reason,
    param_of_error,
    resolve_max_tokens,
)
from runtime.protocol import GenerateRequest, SamplingParams
from tests.support import RecordingSink


def test_importing_the_engine_module_does_not_import_vllm() -> None:
    code = "import sys, model_proc.vllm_engine; print('vllm' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"


def test_every_parameter_maps_to_its_vllm_field() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, stop=["\n", "END"],
                            seed=123, presence_penalty=0.1, frequency_penalty=-0.2)
    assert build_sampling_kwargs(params) == {
        "n": 1, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop": ["\n", "END"], "seed": 123,
        "presence_penalty": 0.1, "frequency_penalty": -0.2,
    }


def test_unset_parameters_are_left_to_vllm() -> None:
    assert build_sampling_kwargs(SamplingParams()) == {"n": 1}


def test_zero_values_are_kept_not_mistaken_for_unset() -> None:
    kwargs = build_sampling_kwargs(SamplingParams(temperature=0.0, top_k=0, seed=0, presence_penalty=0.0))
    assert kwargs["temperature"] == 0.0 and kwargs["top_k"] == 0 and kwargs["seed"] == 0
    assert kwargs["presence_penalty"] == 0.0


def test_model_defaults_fill_only_unset_parameters() -> None:
    defaults = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1, "max_tokens": 100}
    kwargs = build_sampling_kwargs(SamplingParams(temperature=0.7), defaults)
    assert kwargs == {"n": 1, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


def test_max_tokens_fits() -> None:
    assert resolve_max_tokens(10, 5, 100, "prompt") == 5
    assert resolve_max_tokens(10, 90, 100, "prompt") == 90


def test_unset_max_tokens_takes_the_rest_of_the_context_or_the_model_default() -> None:
    assert resolve_max_tokens(10, None, 100, "prompt") == 90
    assert resolve_max_tokens(10, None, 100, "prompt", default=16) == 16
    assert resolve_max_tokens(95, None, 100, "prompt", default=16) == 5


def test_prompt_plus_max_tokens_over_context_is_a_400_naming_the_limits() -> None:
    with pytest.raises(EngineRequestError) as err:
        resolve_max_tokens(60, 50, 100, "messages")
    assert err.value.status == 400 and err.value.param == "messages"
    message = str(err.value)
    assert "100" in message and "60" in message and "50" in message and "at most 40" in message


def test_prompt_longer_than_context_is_a_400() -> None:
    with pytest.raises(EngineRequestError) as err:
        resolve_max_tokens(100, None, 100, "prompt")
    assert err.value.param == "prompt" and "100 tokens" in str(err.value)


def test_nonpositive_max_tokens_is_a_400_on_max_tokens() -> None:
    with pytest.raises(EngineRequestError) as err:
        resolve_max_tokens(1, 0, 100, "prompt")
    assert err.value.param == "max_tokens"


class _NamedError(ValueError):
    def __init__(self, message: str, parameter: str | None) -> None:
        super().__init__(message)
        self.parameter = parameter


@pytest.mark.parametrize("exc, param", [
    (_NamedError("temperature must be in [0, 2], got 3.", "temperature"), "temperature"),
    (ValueError("presence_penalty must be in [-2, 2], got 5."), "presence_penalty"),
    (ValueError("top_k must be 0 (disable), or at least 1, got -5."), "top_k"),
    (ValueError("something unrelated broke"), None),
])
def test_param_of_vllm_validation_errors(exc: Exception, param: str | None) -> None:
    assert param_of_error(exc) == param


def test_finish_reasons() -> None:
    assert map_finish_reason("stop") == "stop"
    assert map_finish_reason("length") == "length"
    assert map_finish_reason("abort") is None
    with pytest.raises(RuntimeError, match="error"):
        map_finish_reason("error")


def test_stats_agree_with_requests_in_flight() -> None:
    assert combine_stats(0, 3, 2, 0.5) == EngineStats(0, 0, 0.5)  # stale scheduler numbers when idle
    assert combine_stats(5, 2, 0, 0.25) == EngineStats(2, 3, 0.25)  # scheduler has not seen 3 yet
    assert combine_stats(2, 4, 1, 1.5) == EngineStats(2, 1, 1.0)


def test_cpu_defaults_fill_only_what_the_config_leaves_out() -> None:
    args = engine_arguments("/m", {"max_model_len": 512, "dtype": "float32"}, on_cpu=True, environ={})
    assert args["model"] == "/m" and args["max_model_len"] == 512 and args["dtype"] == "float32"
    assert args["enforce_eager"] is True
    assert args["kv_cache_memory_bytes"] == DEFAULT_CPU_KV_CACHE_BYTES


def test_cpu_kv_cache_from_env_or_config_is_not_overridden() -> None:
    assert "kv_cache_memory_bytes" not in engine_arguments(
        "/m", {}, on_cpu=True, environ={"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert engine_arguments("/m", {"kv_cache_memory_bytes": 5}, on_cpu=True, environ={})[
        "kv_cache_memory_bytes"] == 5


def test_gpu_gets_no_cpu_defaults() -> None:
    args = engine_arguments("org/model", {"tensor_parallel_size": 2}, on_cpu=False, environ={})
    assert args == {"model": "org/model", "tensor_parallel_size": 2}
    assert not set(CPU_DEFAULTS) & set(args)


def test_factory_rejects_bad_arguments_with_value_error() -> None:
    with pytest.raises(ValueError):
        VllmEngine("", {})
    with pytest.raises(ValueError):
        VllmEngine("m", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_the_engine_registry_builds_it_without_vllm() -> None:
    from model_proc.engine import create_engine

    engine = create_engine("vllm", "smollm2", {"max_model_len": 1024})
    assert isinstance(engine, VllmEngine) and engine.name == "vllm"
    assert engine.engine_args == {"max_model_len": 1024}


def test_add_request_before_start_is_a_503() -> None:
    with pytest.raises(EngineRequestError) as err:
        VllmEngine("m", {}).add_request(GenerateRequest("r", prompt="x"))
    assert err.value.status == 503


def test_abort_and_stats_before_start_are_harmless() -> None:
    engine = VllmEngine("m", {})
    engine.abort("nope")
    assert engine.stats() == EngineStats(0, 0, 0.0)


# --------------------------------------------------------------------------- process env (vllm_process_env)


@pytest.mark.parametrize("value, cores", [
    ("0", {0}), ("1", {1}), ("0-3", {0, 1, 2, 3}), ("0,2-3", {0, 2, 3}), (" 4-5|6-7 ", {4, 5, 6, 7}),
    ("", None), ("auto", None), ("nobind", None), ("all", None),
])
def test_core_lists_are_parsed(value: str, cores) -> None:
    from model_proc.vllm_process_env import parse_core_list

    assert parse_core_list(value) == cores


@pytest.mark.parametrize("value", ["x", "1-", "3-1", "-1", "0,,1"])
def test_bad_core_lists_name_the_variable(value: str) -> None:
    from model_proc.vllm_process_env import parse_core_list

    with pytest.raises(ValueError, match="VLLM_CPU_OMP_THREADS_BIND"):
        parse_core_list(value)


def test_pinning_restricts_every_thread_and_children_inherit_it() -> None:
    """In a child process (pinning is process-wide): threads started before and after are pinned."""
    import os

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    core = min(os.sched_getaffinity(0))
    code = (
        "import os, threading, subprocess, sys\n"
        "from model_proc.vllm_process_env import pin_to_assigned_cores\n"
        "ev = threading.Event(); t = threading.Thread(target=ev.wait); t.start()\n"
        "print(sorted(pin_to_assigned_cores({'VLLM_CPU_OMP_THREADS_BIND': '%d'})))\n"
        "print(sorted(os.sched_getaffinity(t.native_id)))\n"
        "ev.set(); t.join()\n"
        "print(subprocess.run(['cat', '/proc/self/status'], capture_output=True, text=True).stdout"
        ".split('Cpus_allowed_list:')[1].split()[0])\n" % core)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split("\n")[:3] == ["[%d]" % core, "[%d]" % core, str(core)]


def test_pinning_outside_the_allowed_cores_is_an_error_naming_the_variable() -> None:
    import os

    from model_proc.vllm_process_env import pin_to_assigned_cores

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    with pytest.raises(ValueError, match="VLLM_CPU_OMP_THREADS_BIND=4096"):
        pin_to_assigned_cores({"VLLM_CPU_OMP_THREADS_BIND": "4096"})
    assert pin_to_assigned_cores({}) is None
    assert pin_to_assigned_cores({"VLLM_CPU_OMP_THREADS_BIND": "auto"}) is None


def test_private_rpc_dir_only_when_unset(tmp_path: Path) -> None:
    from model_proc.vllm_process_env import use_private_rpc_dir

    assert use_private_rpc_dir({"VLLM_RPC_BASE_PATH": str(tmp_path)}) is None
    environ: dict[str, str] = {}
    path = use_private_rpc_dir(environ)
    try:
        assert path and Path(path).is_dir() and environ["VLLM_RPC_BASE_PATH"] == path
    finally:
        Path(path).rmdir()


def test_stale_rpc_dirs_of_dead_replicas_are_removed(tmp_path: Path) -> None:
    import os

    from model_proc.vllm_process_env import remove_stale_rpc_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in ("tokenrelay-vllm-rpc-%d-abc" % dead.pid, "tokenrelay-vllm-rpc-%d-def" % os.getpid(),
                 "tokenrelay-vllm-rpc-xyz", "someone-else-%d" % dead.pid):
        (tmp_path / name).mkdir()
    (tmp_path / ("tokenrelay-vllm-rpc-%d-abc" % dead.pid) / "socket").write_text("")
    assert remove_stale_rpc_dirs(str(tmp_path)) == ["tokenrelay-vllm-rpc-%d-abc" % dead.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "tokenrelay-vllm-rpc-%d-def" % os.getpid(), "tokenrelay-vllm-rpc-xyz", "someone-else-%d" % dead.pid])


class _Output:
    def __init__(self, text: str, finished: bool, reason=None) -> None:
        self.outputs = [SimpleNamespace(text=text, token_ids=[7], finish_reason=reason)]
        self.finished = finished
        self.prompt_token_ids = [1, 2]


def _run_prompt(outputs: list) -> RecordingSink:
    """VllmEngine._run over a fake AsyncLLM whose generate yields `outputs`."""
    async def generate(prompt, sampling, request_id):
        for out in outputs:
            yield out

    engine, sink = VllmEngine("m", {}), RecordingSink()
    engine._engine = SimpleNamespace(generate=generate, errored=False)
    engine._sink = sink
    engine._vllm = SimpleNamespace(TokensPrompt=dict, EngineDeadError=type("Dead", (Exception,), {}),
                                   VLLMClientError=type("Client", (Exception,), {}))
    asyncio.run(engine._run("r", [1, 2], None))
    return sink


def test_an_abort_vllm_made_by_itself_ends_the_request_with_an_error() -> None:
    """Our aborts cancel the request's task first; an "abort" finish that reaches it was vLLM's own, and
    it ended nothing: the request held its slot at the replica and its client waited for the idle timeout."""
    sink = _run_prompt([_Output("a", False), _Output("", True, "abort")])
    assert sink.emits == [("r", "a", None)]
    assert sink.errors == [("r", 503, "vLLM aborted the request")]


def test_an_output_stream_that_ends_unfinished_is_an_error() -> None:
    sink = _run_prompt([_Output("a", False)])
    assert sink.errors == [("r", 500, "vLLM's output stream ended before the request finished")]


def test_a_finished_output_is_one_final_emit() -> None:
    sink = _run_prompt([_Output("a", False), _Output("b", True, "length")])
    assert sink.emits == [("r", "a", None), ("r", "b", "length")] and not sink.errors
