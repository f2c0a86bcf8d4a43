#!/usr/bin/env bash
# What CI runs (.ci/run): install what the tests need into ./.venv (project, vLLM engine, test tools),
# run the static checks (ruff, mypy), then every test tier: unit, component, integration, and the
# real-vLLM tier on CPU. Extra arguments go to pytest (e.g. `-m unit` for the fast tier alone).
# The venv is reused while the files that define it are unchanged (a stamp in .venv records their hash);
# TOKENRELAY_REINSTALL=1 forces a new install.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.tokenrelay-install-stamp
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ "${TOKENRELAY_REINSTALL:-0}" = "1" ] || [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  bash scripts/install.sh
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
else
  echo "scripts/test.sh: .venv is up to date with pyproject.toml and scripts/install.sh (TOKENRELAY_REINSTALL=1 reinstalls)"
fi
bash scripts/check.sh
exec .venv/bin/python -m pytest "$@"
