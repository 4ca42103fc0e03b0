#!/usr/bin/env bash
# llama.cpp's llama-server (the bench's llamacpp methods) and its HF -> GGUF converter, built from the llama.cpp
# vendored in PyPI's llama-cpp-python sdist, all under one git-ignored folder (never in the project's .venv):
#   bash scripts/llamacpp_env.sh [DIR]      # default: .llamacpp; 8-17 minutes on 2 cores, once
# DIR/bin/llama-server: the server; DIR/venv: gguf-py, torch (CPU) and transformers for convert_hf_to_gguf.py.
# Rerunning skips the steps already done (delete DIR/build or DIR/venv to redo one). Then:
#   bash scripts/llamacpp_gguf.sh f32                                         # a GGUF of the default target
#   python -m specdec.bench "bench.methods=[hf,specdec:none,llamacpp,llamacpp:ngram-map-k]"
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.llamacpp}"
VERSION="${LLAMACPP_PYTHON_VERSION:-0.3.36}"  # llama-cpp-python's sdist; its vendor/llama.cpp is what we build
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"

if [ ! -f "$SRC/CMakeLists.txt" ]; then
  echo "== llama-cpp-python $VERSION sdist" >&2
  [ -f "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" ] \
    || "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
  tar -xzf "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi

SERVER="$DIR/build/bin/llama-server"
if [ ! -x "$SERVER" ]; then
  echo "== building llama-server (-j $JOBS)" >&2
  # nothing here may reach the network: no prebuilt web UI download, no TLS library fetch, no tests or examples
  cmake -S "$SRC" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >"$DIR/cmake.log"
  cmake --build "$DIR/build" --target llama-server -j "$JOBS"
fi
mkdir -p "$DIR/bin"
ln -sf "$SERVER" "$DIR/bin/llama-server"
ln -sfn "$SRC" "$DIR/llama.cpp"  # the bench finds the converter at DIR/llama.cpp/convert_hf_to_gguf.py

VENV="$DIR/venv"
if [ ! -f "$VENV/.installed-$VERSION" ]; then
  echo "== converter environment $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # the project's constraints.txt pins torch to its CPU build (an unpinned torch pulls GBs of CUDA packages)
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt torch
  # transformers 5, as in the project: our checkpoints' tokenizer_config.json (tokenizer_class TokenizersBackend)
  # is unreadable for the 4.57 that the converter's requirements pin; the converter runs fine on 5.25
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt numpy sentencepiece safetensors protobuf \
    "transformers==${LLAMACPP_TRANSFORMERS_VERSION:-5.25.0}" -e "$SRC/gguf-py"
  touch "$VENV/.installed-$VERSION"
fi

"$SERVER" --version 2>&1 | head -2 >&2 || true
echo "llama-server: $DIR/bin/llama-server"
echo "converter:    $VENV/bin/python $DIR/llama.cpp/convert_hf_to_gguf.py   (or: bash scripts/llamacpp_gguf.sh <type>)"
