#!/usr/bin/env bash
# The GPU path, proven on a machine with an NVIDIA GPU and the CUDA toolkit (nvcc on PATH, or
# CUDA_HOME): builds qtune with --features cuda, runs the device-parameterised tests on cuda:0
# (tests/it/device.rs: the composite graph's gradients against finite differences, quantized
# weights unpacked on the device, NF4/FP4/INT8 and bf16 training, resume; with two GPUs, the
# worker pool on both), then `qtune bench --device cuda:0` in float32, bf16 and NF4 at 4 x 256
# and 8 x 1024, on SmolLM2-135M's and SmolLM2-1.7B's shapes (random weights): tokens/s and peak
# device memory. Prints the GPU model first; meant to finish in under 10 minutes on an H100-class
# GPU (the build takes most of it). Nothing here needs the network once the crates are vendored
# or cached (cargo fetch beforehand).
#
#     bash scripts/gpu-check.sh            # OUT=dir to keep the bench JSON lines there
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SECONDS=0

echo "== GPU"
nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv,noheader
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
# candle-kernels compiles for this compute capability (cudaforge reads it when set)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
nvcc --version | tail -2

echo "== build (--features cuda)"
cargo build --release --features cuda --bin qtune
cargo test --release --features cuda --test it --no-run

echo "== the device tests on cuda:0 ($SECONDS s so far)"
QTUNE_TEST_DEVICE=cuda:0 cargo test --release --features cuda --test it -- device:: --test-threads 1
if [ "$GPUS" -ge 2 ]; then
    echo "== the worker pool on cuda:0 and cuda:1"
    QTUNE_TEST_DEVICES=cuda:0,cuda:1 cargo test --release --features cuda --test it -- \
        device::the_pool_trains_on_each_of_its_devices --test-threads 1
fi

echo "== qtune bench on cuda:0 ($SECONDS s so far)"
QTUNE=target/release/qtune
printf '%-6s %-6s %-9s %10s %18s\n' shape base "b x seq" "tokens/s" "peak device GiB"
for shape in 135m 1.7b; do
    for base in f32 bf16 nf4; do
        case $base in
            f32) flags=() ;;
            bf16) flags=(--bf16) ;;
            nf4) flags=(--quant nf4 --bf16) ;;
        esac
        for bs in "4 256" "8 1024"; do
            set -- $bs
            line=$("$QTUNE" bench --device cuda:0 --shape "$shape" --batch "$1" --seq "$2" \
                --warmup 2 --steps 5 --json "${flags[@]}" | grep '^{' | tail -1)
            echo "$line" >>"$OUT/bench.jsonl"
            python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%-6s %-6s %-9s %10.0f %18.2f" % (sys.argv[2], sys.argv[3], "%sx%s" % (r["batch"], r["seq"]), r["tokens_per_second"], (r["peak_device_bytes"] or 0) / 2**30))' \
                "$line" "$shape" "$base"
        done
    done
done
echo "== done in $SECONDS s; bench JSON lines in $OUT/bench.jsonl"
