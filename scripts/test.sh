#!/usr/bin/env bash
# Install what the tests need into ./.venv (project, vLLM engine, test tools) and run every test tier:
# unit, component, integration, and the real-vLLM tier on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
