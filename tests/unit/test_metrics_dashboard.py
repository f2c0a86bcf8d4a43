"""deploy/: the Grafana dashboard is valid JSON whose every metric name is declared in the code, and the
Prometheus config reads the head's service-discovery file."""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tokenrelay.json"
METRICS_MODULES = ["proxy/metrics.py", "head/metrics.py", "agent/metrics.py", "model_proc/metrics.py"]
# names that exist without being declared by us
BUILTIN = re.compile(r"^(up|process_[a-z_]+|python_[a-z_]+)$")
PROMQL_WORDS = {"sum", "by", "rate", "max", "min", "avg", "histogram_quantile", "increase", "le", "without",
                "on", "ignoring", "group_left", "label_values", "count", "and", "or", "unless"}
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def exprs(dashboard: dict) -> list[str]:
    out = []
    for panel in dashboard["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
        out += [t["expr"] for p in panel.get("panels", []) for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if isinstance(var.get("query"), dict):
            out.append(var["query"]["query"])
    return out


def metric_names(expr: str) -> set[str]:
    """Identifiers that are metric names: not inside {...} or "...", not PromQL functions or keywords."""
    stripped = re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", expr)  # Grafana: (metric, label)
    stripped = re.sub(r'"[^"]*"', '""', stripped)
    stripped = re.sub(r"\{[^}]*\}", "{}", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "[]", stripped)
    stripped = re.sub(r"by \([^)]*\)", "by ()", stripped)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("$")}


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def prefixed_names(path: Path) -> set[str]:
    """tokenrelay_<role>_<x> for every `PREFIX + "<x>"` in a module whose PREFIX is tokenrelay_<role>_."""
    text = path.read_text()
    m = re.search(r'^PREFIX = "([a-z_]+)"', text, re.M)
    names = set(re.findall(r'"(tokenrelay_[a-z_]+)"', text))
    if m:
        names |= {m.group(1) + x for x in re.findall(r'PREFIX \+ "([a-z_]+)"', text)}
    return names


def declared_names() -> set[str]:
    out: set[str] = set()
    for module in METRICS_MODULES:
        out |= prefixed_names(ROOT / module)
    return out


def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["refId"]


def test_metric_name_extraction():
    assert metric_names('sum by (le) (rate(tokenrelay_proxy_x_bucket{deployment=~"$d"}[$__rate_interval]))') \
        == {"tokenrelay_proxy_x_bucket"}
    assert metric_names("label_values(tokenrelay_head_deployments, deployment)") == {"tokenrelay_head_deployments"}
    assert base_name("a_total") == "a" and base_name("a_seconds_bucket") == "a_seconds"


def test_every_dashboard_metric_is_declared():
    names = declared_names()
    assert "tokenrelay_proxy_requests" in names and "tokenrelay_replica_generated_tokens" in names
    vllm_sources = ""
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin:
        loggers = Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"
        vllm_sources = loggers.read_text() if loggers.exists() else ""
    missing = []
    used = set()
    for expr in exprs(json.loads(DASHBOARD.read_text())):
        for name in metric_names(expr):
            used.add(name)
            if BUILTIN.match(name):
                continue
            if name.startswith("vllm:"):
                if vllm_sources and '"%s"' % base_name(name) not in vllm_sources:
                    missing.append(name)
                continue
            if name not in names and base_name(name) not in names:
                missing.append(name)
    assert not missing, "dashboard metrics not declared in %s: %s" % (METRICS_MODULES, sorted(missing))
    for role in ("proxy", "head", "agent", "replica"):  # every process has at least one panel
        assert any(n.startswith("tokenrelay_%s_" % role) for n in used), role


@pytest.mark.parametrize("module", METRICS_MODULES)
def test_metrics_modules_use_one_prefix(module):
    names = prefixed_names(ROOT / module)
    role = module.split("/")[0].replace("model_proc", "replica")
    assert names and all(n.startswith("tokenrelay_%s_" % role) for n in names), names


def test_documented_names_match_declared_names():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(tokenrelay_[a-z_]+)`", doc))
    declared_full = {n for n in declared_names()}
    counters_as_exposed = {base_name(n) for n in documented}
    assert declared_full <= counters_as_exposed | documented, sorted(declared_full - counters_as_exposed - documented)


def test_prometheus_config_uses_the_sd_file():
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["file_sd_configs"][0]["files"]
    assert job["metrics_path"] == "/metrics"
