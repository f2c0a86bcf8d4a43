"""Each package's docstring maps its modules: a module added, renamed or removed must show up there."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "runtime", "head", "agent", "model_proc")


@pytest.mark.parametrize("package", PACKAGES)
def test_the_package_docstring_maps_exactly_its_modules(package: str) -> None:
    doc = importlib.import_module(package).__doc__ or ""
    mapped = set(re.findall(r"^  (\w+\.py)\s", doc, re.M))
    on_disk = {p.name for p in (ROOT / package).glob("*.py")} - {"__init__.py"}
    assert mapped == on_disk, "missing from the map: %s; gone from the tree: %s" % (
        sorted(on_disk - mapped), sorted(mapped - on_disk))


def test_the_proxy_map_names_the_router_it_has() -> None:
    doc = importlib.import_module("proxy").__doc__ or ""
    assert "least in-flight" not in doc and "power of two choices" in doc
