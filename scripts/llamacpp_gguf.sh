#!/usr/bin/env bash
# A GGUF of the default target (or of --checkpoint DIR) for llama.cpp, converted once; prints its path.
#   bash scripts/llamacpp_gguf.sh f32|bf16|f16|q8_0|q4_1 [--checkpoint DIR] [--dir .llamacpp]
# f32/bf16/f16/q8_0: llama.cpp's convert_hf_to_gguf.py --outtype on our safetensors checkpoint, in the converter
# environment of scripts/llamacpp_env.sh, cached in .llamacpp/gguf; q4_1: the default target's own shipped file.
# The bench makes the one it needs by itself (bench.llamacpp_gguf); this is for using llama.cpp by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m specdec.bench.peer_llamacpp "$@"
