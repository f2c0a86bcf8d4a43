"""Pure parts of benchmarks/autoscale.py: phases, per-engine options, windows, step times and plot data."""
import json
import math

import pytest

import benchmarks.stack
from benchmarks import autoscale
from benchmarks.autoscale import Record, Run, parse_phases, plot_series, resolve, step_times, windows
from runtime.stack_config import parse_deployment


def a_run() -> Run:
    """1 client for 10 s on 1 replica, then 4 clients: desired 2 at 12 s, the second ready at 25 s."""
    run = Run(t0=0.0)
    run.samples = [(float(t), 1 if t < 10 else 4, 1 if t < 12 else 2, 1 if t < 25 else 2, "",
                    ["r1"] if t < 25 else ["r1", "r2"]) for t in range(1, 30)]
    run.records = [Record(1.0, 0.05, True), Record(5.0, 0.07, True),  # window 0: 2 ok
                   Record(11.0, 2.0, True), Record(12.0, None, False),  # window 1: a slow one, a failure
                   Record(26.0, 0.1, True)]  # window 2
    return run


def test_parse_phases():
    assert parse_phases("1:20,16:40,0:7.5") == [(1, 20.0), (16, 40.0), (0, 7.5)]
    for bad in ("1", "1:0", "-1:10", "a:10", "1:20,", "1:x"):
        with pytest.raises(ValueError, match="--phases"):
            parse_phases(bad)


def test_engine_defaults_and_mock_only_options():
    ns = resolve(autoscale.build_parser().parse_args(["--engine", "vllm"]))
    assert (ns.target, ns.max_replicas, ns.phases) == (2.0, 2, "1:30,4:180,1:60")
    ns = resolve(autoscale.build_parser().parse_args(["--target", "3"]))
    assert (ns.engine, ns.target, ns.max_replicas, ns.cold_start_s) == ("mock", 3.0, 4, 10.0)
    with pytest.raises(ValueError, match="--cold-start-s, --max-running: mock engine only"):
        resolve(autoscale.build_parser().parse_args(["--engine", "vllm", "--cold-start-s", "5",
                                                     "--max-running", "2"]))


def test_windows_and_step_time():
    run = a_run()
    rows = windows(run, 10.0, objective=500.0)
    assert [(r["t"], r["clients"], r["desired"], r["ready"], r["ok"], r["failed"]) for r in rows] == [
        (0.0, 1, 1, 1, 2, 0), (10.0, 4, 2, 1, 1, 1), (20.0, 4, 2, 2, 1, 0)]
    assert [r["ttft_p90_ms"] for r in rows] == [70.0, 2000.0, 100.0]
    assert [r["meets_objective"] for r in rows] == [True, False, True]
    assert step_times(run, [(1, 10.0), (4, 20.0)]) == [{"at_s": 10.0, "clients": 4, "ready_before": 1,
                                                        "to_new_replica_serving_s": 15.0,
                                                        "to_more_replicas_serving_s": 15.0}]
    assert len(windows(run, 10.0, 500.0, end=20.0)) == 2  # nothing after the phases' end


def test_step_time_sees_a_new_replica_while_the_old_one_restarts():
    """On a CPU host the old replica restarts on fewer cores once the new one is ready: the ready count
    stays 1 from 20 s to 40 s, yet the new replica has served since 20 s."""
    run = Run(t0=0.0)
    ready = {t: ["old"] if t < 20 else ["new"] if t < 40 else ["new", "old"] for t in range(1, 50)}
    run.samples = [(float(t), 4, 2, len(ids), "", ids) for t, ids in ready.items()]
    [step] = step_times(run, [(1, 5.0), (4, 45.0)])
    assert (step["to_new_replica_serving_s"], step["to_more_replicas_serving_s"]) == (15.0, 35.0)


def test_plot_series_load_is_a_step_function_of_the_phases():
    run = a_run()
    phases = [(1, 10.0), (4, 20.0), (0, 5.0)]
    series = plot_series(run.samples, windows(run, 10.0, 500.0), phases, 10.0, 500.0, step_times(run, phases))
    assert series["load_t"] == [0.0, 10.0, 30.0, 35.0] and series["load_clients"] == [1, 4, 0, 0]
    assert series["phase_starts"] == [10.0, 30.0]
    assert series["window_mid"] == [5.0, 15.0, 25.0] and series["failed"] == [0, 1, 0]
    assert series["ready"][:2] == [1, 1] and len(series["sample_t"]) == len(series["desired"]) == 29
    assert series["new_replica_t"] == [25.0]


def test_plot_series_marks_windows_without_requests_as_nan():
    run = Run(t0=0.0, samples=[(1.0, 0, 1, 1, "", ["r1"]), (15.0, 0, 1, 1, "", ["r1"])])
    series = plot_series(run.samples, windows(run, 10.0, 500.0), [(0, 20.0)], 10.0, 500.0)
    assert [math.isnan(v) for v in series["ttft_p90_ms"]] == [True, True]


def test_replot_draws_a_saved_result(tmp_path):
    pytest.importorskip("matplotlib")
    run = a_run()
    result = {"title": "test", "phases": [[1, 10.0], [4, 20.0]], "window_s": 10.0, "ttft_objective_ms": 500.0,
              "samples": [list(s) for s in run.samples], "windows": windows(run, 10.0, 500.0),
              "steps": step_times(run, [(1, 10.0), (4, 20.0)])}
    (tmp_path / "run.json").write_text(json.dumps(result))  # as --json writes it: tuples become lists
    path = tmp_path / "autoscale.png"
    assert autoscale.main(["--replot", str(tmp_path / "run.json"), "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("engine", ["mock", "vllm"])
def test_the_stacks_deployment_is_valid_and_autoscales(engine, tmp_path, monkeypatch):
    ports = iter(range(20000, 20010))
    monkeypatch.setattr(benchmarks.stack, "free_port", lambda: next(ports))  # no sockets in a unit test
    monkeypatch.setattr(benchmarks.stack.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    monkeypatch.setattr(autoscale.os, "environ", {})
    ns = resolve(autoscale.build_parser().parse_args(["--engine", engine]))
    stack, body = autoscale.make_stack(ns)
    spec = parse_deployment(stack.config["deployments"][0])
    assert spec.autoscaling is not None and spec.autoscaling.max_replicas == ns.max_replicas
    assert spec.autoscaling.target_ongoing_requests == ns.target
    assert body["model"] == stack.model == spec.name and body["stream"] is True
    if engine == "vllm":
        assert spec.engine == "vllm" and spec.model == "smollm2" and body["max_tokens"] == 32
        assert autoscale.os.environ["HF_HUB_OFFLINE"] == "1"
    else:
        assert spec.engine_args["startup_ms"] == 10000 and "max_tokens" not in body
