#!/usr/bin/env bash
# Compiles qtune with candle's CUDA backend (`--features cuda`, every target) and lints it, on a
# machine without a GPU: code that is never compiled rots. Called by .ci/run.
#
# The CUDA compiler comes from PyPI (NVIDIA's CUDA 13 wheels: their nvcc works without a GPU;
# cudarc 0.19 supports CUDA up to 13.4, so keep these pins together). candle-kernels compiles its
# kernels with nvcc for CUDA_COMPUTE_CAP (no nvidia-smi here to ask). Linking needs the driver
# library, which only a GPU machine has: this checks, it does not link or run.
# The venv and the target folder live under ~/.cache/qtune-cuda, outside the clone, so later runs
# on the same machine only recompile what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="$HOME/.cache/qtune-cuda"
VENV="$CACHE/venv"
PINS=(nvidia-cuda-nvcc==13.4.92 nvidia-cuda-runtime==13.4.92 nvidia-cuda-crt==13.4.92
      nvidia-nvvm==13.4.92 nvidia-cuda-cccl==13.3.4.3.1)
if [ ! -x "$VENV/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "${PINS[@]}"
fi
export CUDA_HOME="$VENV/lib/python3.11/site-packages/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH" NVCC="$CUDA_HOME/bin/nvcc" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="$CACHE/target"
nvcc --version | tail -2
# clippy runs the compiler's checks and the lints in one pass
cargo clippy --features cuda --all-targets -- -D warnings
