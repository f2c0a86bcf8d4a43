import re

import pytest

from runtime.protocol import (
    DeploymentRoute, DeploymentStatus, ReplicaRoute, RoutingTable, StatusReply, decode, encode,
)
from runtime.stack_config import MAX_BYTES, MAX_COUNT, load_stack, parse_deployment, parse_stack


def test_example_mock_config_loads():
    stack = load_stack("examples/mock.yaml")
    assert stack.proxy_bind == "127.0.0.1:8000"
    (dep,) = stack.deployments
    assert dep.engine == "mock" and dep.replicas == 2 and dep.engine_args["itl_ms"] == 10


@pytest.mark.parametrize("raw, message", [
    ({"name": "x", "engine": "tensorrt"}, "deployment.engine: must be one of"),
    ({"name": "x", "engine": "mock", "replicas": -1}, "deployment.replicas: must be an integer >= 0"),
    ({"name": "x", "engine": "mock", "replicas": True}, "deployment.replicas"),
    ({"name": "bad name!", "engine": "mock"}, "deployment.name"),
    ({"name": "abc\n", "engine": "mock"}, "deployment.name"),  # "$" matched before a final newline
    ({"name": "x", "engine": "mock", "colour": 1}, "unknown field"),
    ({"engine": "mock"}, "deployment.name: must be a non-empty string"),
    ({"name": "x", "engine": "vllm"}, "deployment.model"),
    ({"name": "x", "engine": "mock", "engine_args": [1]}, "engine_args: must be a mapping"),
])
def test_bad_deployment_names_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_deployment(raw)


def test_duplicate_deployments_and_unknown_sections_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        parse_stack({"deployments": [{"name": "a", "engine": "mock"}, {"name": "a", "engine": "mock"}]})
    with pytest.raises(ValueError, match="unknown section"):
        parse_stack({"heads": {}})


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_stack(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployments: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_stack(bad)


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_single_host_stack_leaves_most_cores_to_the_replicas(cores: int, workers: int) -> None:
    from runtime.stack_config import single_host_proxy_workers
    assert single_host_proxy_workers(cores) == workers


def test_autoscaling_scale_to_zero_and_ttft_objective_parse_with_defaults():
    dep = parse_deployment({"name": "x", "engine": "mock", "replicas": 0,
                            "autoscaling": {"min_replicas": 0, "max_replicas": 2, "target_ttft_p90_s": 0.5}})
    cfg = dep.autoscaling
    assert cfg is not None and cfg.min_replicas == 0 and cfg.max_replicas == 2
    assert cfg.cold_start_timeout_s == 60.0 and cfg.target_ttft_p90_s == 0.5
    assert parse_deployment({"name": "x", "engine": "mock", "autoscaling": {}}).autoscaling.target_ttft_p90_s is None


@pytest.mark.parametrize("block, message", [
    ({"min_replicas": 0, "cold_start_timeout_s": 0}, "cold_start_timeout_s: must be > 0"),
    ({"cold_start_timeout_s": "soon"}, "cold_start_timeout_s: must be a number"),
    ({"target_ttft_p90_s": 0}, "target_ttft_p90_s: must be > 0"),
    ({"target_ttft_p90_s": -1}, "target_ttft_p90_s: must be a number >= 0"),
    ({"ttft": 1}, "autoscaling: must be a mapping with"),
])
def test_bad_autoscaling_knobs_name_the_field(block, message):
    with pytest.raises(ValueError, match=message):
        parse_deployment({"name": "x", "engine": "mock", "autoscaling": block})


@pytest.mark.parametrize("section, message", [
    ({"head": {"control": "garbage"}}, "head.control: must be a ZeroMQ endpoint"),
    ({"head": {"publish": "127.0.0.1:7101"}}, "head.publish: must be a ZeroMQ endpoint"),
    ({"head": {"control": "tcp://127.0.0.1:99999"}}, "head.control: must be a ZeroMQ endpoint"),
    ({"proxy": {"bind": "nope"}}, "proxy.bind: must be HOST:PORT"),
    ({"proxy": {"bind": "127.0.0.1:99999"}}, "proxy.bind: must be HOST:PORT"),
    ({"proxy": {"bind": "::1:8000"}}, r"proxy.bind: an IPv6 address goes in brackets, \[::1\]:8000"),
    ({"head": {"metrics_port": 99999}}, "head.metrics_port: must be at most 65535"),
    ({"agent": {"metrics_port": 70000}}, "agent.metrics_port: must be at most 65535"),
    ({"agent": {"host": "tcp://127.0.0.1"}}, "agent.host: must be a host name or IP address"),
    # libzmq binds and connects IPv6 only with ZMQ_IPV6: every replica (or the head) would fail to bind
    ({"agent": {"host": "::1"}}, "agent.host: IPv6 addresses are not supported on the ZeroMQ sockets"),
    ({"head": {"control": "tcp://[::1]:7100"}}, "head.control: IPv6 addresses are not supported"),
])
def test_bad_addresses_are_refused_by_the_config_key(section, message):
    """They used to start every process, each then failing with its own flag's name (--bind, --head)
    and a full usage text; the operator wrote proxy.bind, not --bind."""
    with pytest.raises(ValueError, match=message):
        parse_stack(section)
    stack = parse_stack({"head": {"control": "tcp://*:7100", "publish": "ipc:///tmp/x"},
                         "proxy": {"bind": "[::1]:8000"}, "agent": {"host": "localhost", "metrics_port": -1}})
    assert (stack.agent_host, stack.agent_metrics_port) == ("localhost", -1)  # HTTP on IPv6 is fine
    assert (stack.head_control, stack.head_publish, stack.proxy_bind) == ("tcp://*:7100", "ipc:///tmp/x",
                                                                          "[::1]:8000")


@pytest.mark.parametrize("extra, path", [
    ({"timeouts": {"first_token_s": float("nan")}}, "d.timeouts.first_token_s"),
    ({"routing": {"queue_timeout_s": float("inf")}}, "d.routing.queue_timeout_s"),
    ({"cpus": float("nan")}, "d.cpus"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": float("nan")}},
     "d.autoscaling.target_ongoing_requests"),
    ({"engine_args": {"ttft_ms": [1, float("-inf")]}}, "d.engine_args.ttft_ms[1]"),
])
def test_nan_and_infinity_anywhere_in_a_spec_are_refused_naming_the_field(extra, path):
    """YAML's .nan and .inf passed every `value < 0` check: a nan timeout never fired, nan cpus fit."""
    with pytest.raises(ValueError, match=r"^%s: must be a finite number$" % path.replace("[", r"\[").replace(
            "]", r"\]")):
        parse_deployment(dict({"name": "a", "engine": "mock", "model": "m"}, **extra), "d")


@pytest.mark.parametrize("extra, path", [
    ({"max_ongoing_requests": 10**20}, "d.max_ongoing_requests"),
    ({"gpus": 10**20}, "d.gpus"),
    ({"memory": 10**20}, "d.memory"),
    ({"memory": "99999999999Ti"}, "d.memory"),
    ({"routing": {"queue_size": 10**20}}, "d.routing.queue_size"),
    ({"routing": {"prefix_chars": 10**20}}, "d.routing.prefix_chars"),
    ({"rollout": {"max_surge": 10**20}}, "d.rollout.max_surge"),
])
def test_counts_the_wire_cannot_carry_are_refused_naming_the_field(extra, path):
    """msgpack encodes no integer past 2**64 - 1: one such count in a stored spec made every status reply
    and every routing table of the head fail to encode, for every deployment, until the spec was gone."""
    with pytest.raises(ValueError, match=r"^%s: must be at most" % re.escape(path)):
        parse_deployment(dict({"name": "a", "engine": "mock"}, **extra), "d")


def test_the_largest_accepted_counts_cross_the_wire():
    big = MAX_COUNT
    spec = parse_deployment({"name": "a", "engine": "mock", "gpus": big, "memory": MAX_BYTES,
                             "max_ongoing_requests": big, "rollout": {"max_surge": big},
                             "routing": {"queue_size": big, "prefix_chars": big, "max_imbalance": big}}, "d")
    table = RoutingTable(1, 1, 0.0, [DeploymentRoute("a", "mock", "m", [
        ReplicaRoute("r", "tcp://h:1", 0, 0, 0.0, spec.max_ongoing_requests)], routing=spec.routing)])
    status = DeploymentStatus(**spec.to_dict())
    for msg in (table, StatusReply(1, 1, [status], [])):
        assert decode(*encode(msg)) == msg


def test_a_spec_nested_too_deeply_is_a_value_error():
    deep: dict = {}
    cur = deep
    for _ in range(5000):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_deployment({"name": "a", "engine": "mock", "engine_args": deep}, "d")
