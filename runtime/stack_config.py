"""Stack configuration files (YAML or JSON): addresses of every process and the deployments to serve.

Runs in the launcher (`tokenrelay up`) and the head; owns no socket. Validation raises `ValueError`
naming the field to change (e.g. "deployments[0].replicas: must be an integer >= 0").

    head:
      control: tcp://127.0.0.1:7100     # ROUTER: agents, proxies and the CLI connect here
      publish: tcp://127.0.0.1:7101     # PUB: routing tables to proxies
    agent:
      host: 127.0.0.1                   # address replicas bind on (proxies must reach it)
    proxy:
      bind: 127.0.0.1:8000
      workers: 2                        # default: one per CPU core
    deployments:
      - name: mock                      # the `model` clients ask for
        engine: mock                    # MOCK engine: fake text, for tests and benchmarks
        model: mock
        replicas: 2
        engine_args: {ttft_ms: 20, itl_ms: 10, tokens: 64}
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENGINES = ("mock", "vllm")


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    engine: str
    model: str
    replicas: int = 1
    engine_args: dict[str, Any] = field(default_factory=dict)
    gpus: int = 0
    max_ongoing_requests: int = 64

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "engine": self.engine, "model": self.model,
                "replicas": self.replicas, "engine_args": dict(self.engine_args),
                "gpus": self.gpus, "max_ongoing_requests": self.max_ongoing_requests}


@dataclass(frozen=True)
class StackConfig:
    head_control: str = "tcp://127.0.0.1:7100"
    head_publish: str = "tcp://127.0.0.1:7101"
    agent_host: str = "127.0.0.1"
    proxy_bind: str = "127.0.0.1:8000"
    proxy_workers: Optional[int] = None
    deployments: tuple[DeploymentSpec, ...] = ()


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError("%s: must be an integer >= %d, got %r" % (where, minimum, value))
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("%s: must be a non-empty string, got %r" % (where, value))
    return value


def parse_deployment(raw: Any, where: str = "deployment") -> DeploymentSpec:
    if not isinstance(raw, dict):
        raise ValueError("%s: must be a mapping, got %s" % (where, type(raw).__name__))
    known = {"name", "engine", "model", "replicas", "engine_args", "gpus", "max_ongoing_requests"}
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
    json.dumps(engine_args)  # must cross the wire as plain data
    return DeploymentSpec(
        name=name, engine=engine, model=model,
        replicas=_int(raw.get("replicas", 1), where + ".replicas", 0),
        engine_args=engine_args,
        gpus=_int(raw.get("gpus", 0), where + ".gpus", 0),
        max_ongoing_requests=_int(raw.get("max_ongoing_requests", 64), where + ".max_ongoing_requests", 1),
    )


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
        head_control=_str(head.get("control", StackConfig.head_control), "head.control"),
        head_publish=_str(head.get("publish", StackConfig.head_publish), "head.publish"),
        agent_host=_str(agent.get("host", StackConfig.agent_host), "agent.host"),
        proxy_bind=_str(proxy.get("bind", StackConfig.proxy_bind), "proxy.bind"),
        proxy_workers=None if workers is None else _int(workers, "proxy.workers", 1),
        deployments=deployments,
    )


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
