"""Stack configuration files (YAML or JSON): addresses of every process and the deployments to serve.

Runs in the launcher (`tokenrelay up`) and the head; owns no socket. Validation raises `ValueError`
naming the field to change (e.g. "deployments[0].replicas: must be an integer >= 0").

    head:
      control: tcp://127.0.0.1:7100     # ROUTER: agents, proxies and the CLI connect here
      publish: tcp://127.0.0.1:7101     # PUB: routing tables to proxies
      state_dir: /var/lib/tokenrelay    # head.db and admin.token (default ~/.local/state/tokenrelay)
    agent:
      host: 127.0.0.1                   # address replicas bind on (proxies must reach it)
    proxy:
      bind: 127.0.0.1:8000
      workers: 2                        # default: half the cores, 1 to 4 (the replicas share the host)
    deployments:
      - name: mock                      # the `model` clients ask for
        engine: mock                    # MOCK engine: fake text, for tests and benchmarks
        model: mock
        replicas: 2
        engine_args: {ttft_ms: 20, itl_ms: 10, tokens: 64}
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import msgspec
import yaml

from runtime.addresses import check_host, check_host_port, check_metrics_port, check_zmq_endpoint
from runtime.protocol import ROUTING_POLICIES, RoutingSettings, TimeoutSettings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")  # \Z: "$" also matches before a final newline
ENGINES = ("mock", "vllm")


# fields replicas never see: changing them updates the routing table, not the replicas
PROXY_SIDE_FIELDS = ("replicas", "routing", "timeouts", "max_ongoing_requests", "rollout", "autoscaling")


@dataclass(frozen=True)
class AutoscalingConfig:
    """A deployment's `autoscaling` block (docs/deployments.md); head.autoscaler applies it."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0  # per replica: requests running or waiting in its engine
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    cold_start_timeout_s: float = 60.0  # min_replicas 0: longest a request waits in a proxy for a first replica
    target_ttft_p90_s: Optional[float] = None  # scale up while the replicas' TTFT p90 is above this


@dataclass(frozen=True)
class Rollout:
    """How a rolling update proceeds (docs/deployments.md, Updates), like Kubernetes' maxSurge and
    maxUnavailable. Read by the head only."""

    max_surge: Optional[int] = None  # new replicas beyond `replicas` at once; None: as many as fit
    max_unavailable: int = 1  # when no new replica fits beside the old ones: ready replicas short at most


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment. Every field is documented in docs/deployments.md."""

    name: str
    engine: str
    model: str
    replicas: int = 1
    engine_args: dict[str, Any] = field(default_factory=dict)
    gpus: int = 0                 # per replica; also its tensor-parallel size
    cpus: float = 0.0             # CPU cores per replica (0: no reservation)
    memory_bytes: int = 0         # memory per replica (0: no reservation)
    max_ongoing_requests: int = 64
    placement_labels: dict[str, str] = field(default_factory=dict)  # agent labels a host must carry
    drain_seconds: float = 10.0   # in-flight requests may finish this long when a replica is retired
    routing: RoutingSettings = RoutingSettings()    # read by proxies (policy, queue)
    timeouts: TimeoutSettings = TimeoutSettings()   # read by proxies; None: the proxy's default
    rollout: Rollout = Rollout()                    # read by the head: rolling update pace
    autoscaling: Optional[AutoscalingConfig] = None  # read by the head; None: `replicas` is fixed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "engine": self.engine, "model": self.model,
                "replicas": self.replicas, "engine_args": dict(self.engine_args),
                "gpus": self.gpus, "cpus": self.cpus, "memory": self.memory_bytes,
                "max_ongoing_requests": self.max_ongoing_requests,
                "placement": {"labels": dict(self.placement_labels)},
                "drain_seconds": self.drain_seconds,
                "routing": msgspec.structs.asdict(self.routing),
                "timeouts": msgspec.structs.asdict(self.timeouts),
                "rollout": {"max_surge": self.rollout.max_surge, "max_unavailable": self.rollout.max_unavailable},
                "autoscaling": dataclasses.asdict(self.autoscaling) if self.autoscaling else None}

    def same_replicas_as(self, other: "DeploymentSpec") -> bool:
        """True if replicas of `self` serve `other` unchanged: only fields the head and proxies act on
        differ (count, routing, timeouts, admission limit), so no rolling restart is needed."""
        a, b = self.to_dict(), other.to_dict()
        for key in PROXY_SIDE_FIELDS:
            a.pop(key, None)
            b.pop(key, None)
        return a == b


@dataclass(frozen=True)
class StackConfig:
    head_control: str = "tcp://127.0.0.1:7100"
    head_publish: str = "tcp://127.0.0.1:7101"
    head_state_dir: Optional[str] = None
    head_metrics_port: int = 0  # head /metrics; 0 picks a free port, -1 turns it off (docs/metrics.md)
    head_prometheus_sd_file: Optional[str] = None  # Prometheus file_sd list the head keeps up to date
    agent_host: str = "127.0.0.1"
    agent_metrics_port: int = 0
    proxy_bind: str = "127.0.0.1:8000"
    proxy_workers: Optional[int] = None
    deployments: tuple[DeploymentSpec, ...] = ()


MAX_REPLICAS = 1024  # per deployment: a typo (10**6) must be refused, not make the head place a million
# every other count (gpus, max_ongoing_requests, queue_size, ...) and memory: the spec crosses the wire in
# msgpack, which encodes no integer past 2**64 - 1; one such value in a stored spec made every `tokenrelay
# status` and every routing table of the head fail to encode (OverflowError), for every deployment
MAX_COUNT = 2**63 - 1
MAX_BYTES = 2**63 - 1


def _int(value: Any, where: str, minimum: int, maximum: Optional[int] = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError("%s: must be an integer >= %d, got %r" % (where, minimum, value))
    if maximum is not None and value > maximum:
        raise ValueError("%s: must be at most %d, got %r" % (where, maximum, value))
    return value


def check_replicas(value: Any, where: str = "replicas") -> int:
    """A replica count as deploy, scale and the config file accept it (0 to MAX_REPLICAS)."""
    return _int(value, where, 0, MAX_REPLICAS)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("%s: must be a non-empty string, got %r" % (where, value))
    return value


def _non_finite(value: Any, where: str) -> Optional[str]:
    """The path of the first nan or infinity in `value` (YAML's .nan, .inf), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        items: Any = (("%s.%s" % (where, k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = (("%s[%d]" % (where, i), v) for i, v in enumerate(value))
    else:
        return None
    for path, item in items:
        found = _non_finite(item, path)
        if found:
            return found
    return None


def parse_deployment(raw: Any, where: str = "deployment") -> DeploymentSpec:
    if not isinstance(raw, dict):
        raise ValueError("%s: must be a mapping, got %s" % (where, type(raw).__name__))
    try:
        bad = _non_finite(raw, where)
    except RecursionError:  # a spec nested thousands deep: a ValueError like any bad spec, not a crash
        raise ValueError("%s: nested too deeply" % where) from None
    if bad:  # nan compares false: a nan timeout never fired, nan cpus fit every host
        raise ValueError("%s: must be a finite number" % bad)
    known = {"name", "engine", "model", "replicas", "engine_args", "gpus", "cpus", "memory",
             "max_ongoing_requests", "placement", "drain_seconds", "routing", "timeouts", "rollout",
             "autoscaling"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError("%s: unknown field(s) %s (known: %s)" % (where, unknown, ", ".join(sorted(known))))
    name = _str(raw.get("name"), where + ".name")
    if not NAME_RE.match(name):
        raise ValueError("%s.name: %r must be 1-63 letters, digits, '.', '_' or '-'" % (where, name))
    engine = _str(raw.get("engine", "vllm"), where + ".engine")
    if engine not in ENGINES:
        raise ValueError("%s.engine: must be one of %s, got %r" % (where, ", ".join(ENGINES), engine))
    model = _str(raw.get("model", "mock" if engine == "mock" else None), where + ".model")
    engine_args = raw.get("engine_args", {}) or {}
    if not isinstance(engine_args, dict):
        raise ValueError("%s.engine_args: must be a mapping" % where)
    try:
        json.dumps(engine_args)  # must cross the wire as plain data
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError("%s.engine_args: must be plain data: %s" % (where, exc)) from None
    placement = raw.get("placement") or {}
    if not isinstance(placement, dict) or set(placement) - {"labels"}:
        raise ValueError("%s.placement: must be a mapping with only 'labels'" % where)
    labels = placement.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise ValueError("%s.placement.labels: must map strings to strings" % where)
    return DeploymentSpec(
        name=name, engine=engine, model=model,
        replicas=check_replicas(raw.get("replicas", 1), where + ".replicas"),
        engine_args=engine_args,
        gpus=_int(raw.get("gpus", 0), where + ".gpus", 0),
        cpus=_number(raw.get("cpus", 0), where + ".cpus"),
        memory_bytes=parse_size(raw.get("memory", 0), where + ".memory"),
        max_ongoing_requests=_int(raw.get("max_ongoing_requests", 64), where + ".max_ongoing_requests", 1),
        placement_labels=dict(labels),
        drain_seconds=_number(raw.get("drain_seconds", 10.0), where + ".drain_seconds"),
        routing=_routing(raw.get("routing"), where + ".routing"),
        timeouts=_timeouts(raw.get("timeouts"), where + ".timeouts"),
        rollout=_rollout(raw.get("rollout"), where + ".rollout"),
        autoscaling=_autoscaling(raw.get("autoscaling"), where + ".autoscaling"),
    )


def _autoscaling(raw: Any, where: str) -> Optional[AutoscalingConfig]:
    if raw is None:
        return None
    known = [f.name for f in dataclasses.fields(AutoscalingConfig)]
    if not isinstance(raw, dict) or set(raw) - set(known):
        raise ValueError("%s: must be a mapping with %s" % (where, ", ".join(known)))
    d = AutoscalingConfig()
    low = _int(raw.get("min_replicas", d.min_replicas), where + ".min_replicas", 0)
    high = _int(raw.get("max_replicas", max(low, d.max_replicas)), where + ".max_replicas", low, MAX_REPLICAS)
    target = _number(raw.get("target_ongoing_requests", d.target_ongoing_requests),
                     where + ".target_ongoing_requests")
    if target <= 0:
        raise ValueError("%s.target_ongoing_requests: must be > 0, got %r" % (where, target))
    cold = _number(raw.get("cold_start_timeout_s", d.cold_start_timeout_s), where + ".cold_start_timeout_s")
    if cold <= 0:
        raise ValueError("%s.cold_start_timeout_s: must be > 0, got %r" % (where, cold))
    ttft = raw.get("target_ttft_p90_s")
    if ttft is not None and _number(ttft, where + ".target_ttft_p90_s") <= 0:
        raise ValueError("%s.target_ttft_p90_s: must be > 0 (or null for none), got %r" % (where, ttft))
    return AutoscalingConfig(low, high, target,
                             _number(raw.get("upscale_delay_s", d.upscale_delay_s), where + ".upscale_delay_s"),
                             _number(raw.get("downscale_delay_s", d.downscale_delay_s), where + ".downscale_delay_s"),
                             cold, None if ttft is None else float(ttft))


def _rollout(raw: Any, where: str) -> Rollout:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict) or set(raw) - {"max_surge", "max_unavailable"}:
        raise ValueError("%s: must be a mapping with max_surge and/or max_unavailable" % where)
    surge = raw.get("max_surge")
    out = Rollout(max_surge=None if surge is None else _int(surge, where + ".max_surge", 0),
                  max_unavailable=_int(raw.get("max_unavailable", 1), where + ".max_unavailable", 0))
    if out.max_surge == 0 and out.max_unavailable == 0:
        raise ValueError("%s: max_surge 0 and max_unavailable 0 can never update; raise one of them" % where)
    return out


def _fields(raw: Any, where: str, struct: type[msgspec.Struct]) -> dict[str, Any]:
    """A mapping whose keys are fields of `struct`; None or absent means every default."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError("%s: must be a mapping" % where)
    known = struct.__struct_fields__
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError("%s: unknown field(s) %s (known: %s)" % (where, unknown, ", ".join(known)))
    return raw


def _routing(raw: Any, where: str) -> RoutingSettings:
    raw = _fields(raw, where, RoutingSettings)
    d = RoutingSettings()
    policy = raw.get("policy", d.policy)
    if policy not in ROUTING_POLICIES:
        raise ValueError("%s.policy: must be one of %s, got %r" % (where, ", ".join(ROUTING_POLICIES), policy))
    affinity = raw.get("session_affinity", d.session_affinity)
    if not isinstance(affinity, bool):
        raise ValueError("%s.session_affinity: must be true or false, got %r" % (where, affinity))
    timeout = _number(raw.get("queue_timeout_s", d.queue_timeout_s), where + ".queue_timeout_s")
    resume = raw.get("resume", d.resume)
    if not isinstance(resume, bool):
        raise ValueError("%s.resume: must be true or false, got %r" % (where, resume))
    return RoutingSettings(
        policy=policy,
        prefix_chars=_int(raw.get("prefix_chars", d.prefix_chars), where + ".prefix_chars", 1),
        max_imbalance=_int(raw.get("max_imbalance", d.max_imbalance), where + ".max_imbalance", 0),
        session_affinity=affinity,
        queue_size=_int(raw.get("queue_size", d.queue_size), where + ".queue_size", 0),
        queue_timeout_s=timeout,
        resume=resume,
    )


def _timeouts(raw: Any, where: str) -> TimeoutSettings:
    raw = _fields(raw, where, TimeoutSettings)
    out: dict[str, Optional[float]] = {}
    for name in TimeoutSettings.__struct_fields__:
        value = raw.get(name)
        if value is not None and (_number(value, "%s.%s" % (where, name)) <= 0):
            raise ValueError("%s.%s: must be a number > 0 (or null for the proxy's default), got %r"
                             % (where, name, value))
        out[name] = None if value is None else float(value)
    return TimeoutSettings(**out)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: Any, where: str) -> int:
    """Bytes from an integer or a string like "16Gi", "512M"."""
    if isinstance(value, bool):
        raise ValueError("%s: must be a size like 16Gi or a byte count, got %r" % (where, value))
    if isinstance(value, int) and value >= 0:
        size = value
    else:
        m = _SIZE_RE.match(value) if isinstance(value, str) else None
        if not m:
            raise ValueError("%s: must be a size like 16Gi or a byte count, got %r" % (where, value))
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if size > MAX_BYTES:
        raise ValueError("%s: must be at most %d bytes, got %r" % (where, MAX_BYTES, value))
    return size


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("%s: must be a number >= 0, got %r" % (where, value))
    return float(value)


def parse_stack(raw: Any) -> StackConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError("config: the top level must be a mapping")
    unknown = sorted(set(raw) - {"head", "agent", "proxy", "deployments"})
    if unknown:
        raise ValueError("config: unknown section(s) %s" % unknown)
    head = raw.get("head") or {}
    agent = raw.get("agent") or {}
    proxy = raw.get("proxy") or {}
    for section, value in (("head", head), ("agent", agent), ("proxy", proxy)):
        if not isinstance(value, dict):
            raise ValueError("%s: must be a mapping" % section)
    deployments_raw = raw.get("deployments") or []
    if not isinstance(deployments_raw, list):
        raise ValueError("deployments: must be a list")
    deployments = tuple(parse_deployment(d, "deployments[%d]" % i) for i, d in enumerate(deployments_raw))
    names = [d.name for d in deployments]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError("deployments: duplicate name(s) %s" % dupes)
    workers = proxy.get("workers")
    return StackConfig(
        head_control=check_zmq_endpoint(_str(head.get("control", StackConfig.head_control), "head.control"),
                                        "head.control"),
        head_publish=check_zmq_endpoint(_str(head.get("publish", StackConfig.head_publish), "head.publish"),
                                        "head.publish"),
        head_state_dir=None if head.get("state_dir") is None else _str(head["state_dir"], "head.state_dir"),
        head_metrics_port=check_metrics_port(_int(head.get("metrics_port", 0), "head.metrics_port", -1),
                                             "head.metrics_port"),
        head_prometheus_sd_file=None if head.get("prometheus_sd_file") is None
        else _str(head["prometheus_sd_file"], "head.prometheus_sd_file"),
        agent_host=check_host(_str(agent.get("host", StackConfig.agent_host), "agent.host"), "agent.host"),
        agent_metrics_port=check_metrics_port(_int(agent.get("metrics_port", 0), "agent.metrics_port", -1),
                                              "agent.metrics_port"),
        proxy_bind=check_host_port(_str(proxy.get("bind", StackConfig.proxy_bind), "proxy.bind"), "proxy.bind"),
        proxy_workers=None if workers is None else _int(workers, "proxy.workers", 1),
        deployments=deployments,
    )


def single_host_proxy_workers(cores: Optional[int] = None) -> int:
    """Proxy workers when `tokenrelay up` runs the whole stack on one host and the stack file names none
    (`cores`: default, the cores this process may run on).

    The replicas share the host, so the proxy leaves them most cores: half of them, at least 1, at most 4.
    One gevent worker streamed 19,600 tokens/s with a third of a core (benchmarks/README.md, scale1000),
    and on a 2-core host one worker used 0.017 CPU s per 1,000 tokens against 0.024 for two.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


def load_stack(path: str | Path) -> StackConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError("config %s: cannot read: %s" % (path, exc.strerror)) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError("config %s: not valid YAML/JSON: %s" % (path, exc)) from exc
    try:
        return parse_stack(raw)
    except ValueError as exc:
        raise ValueError("config %s: %s" % (path, exc)) from exc
