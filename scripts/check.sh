#!/usr/bin/env bash
# Static checks, as CI runs them: ruff (lint rules in pyproject.toml) and mypy (every package; the pure
# cores and runtime/protocol.py in strict mode). Fails on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy
