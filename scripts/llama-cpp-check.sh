#!/usr/bin/env bash
# qtune's GGUF exports checked with llama.cpp itself, and qtune's decoding timed beside
# llama-bench in the same run. Not part of CI: building llama.cpp takes about 15 minutes on two
# cores (then it is cached under ~/.cache/qtune-llama-cpp).
#
# 1. builds llama.cpp b11434 (scripts/llama-cpp-build.sh: llama-server, llama-bench);
# 2. trains a small adapter on SmolLM2-135M-Instruct (the test model, Q4_1 GGUF) for 20 steps;
# 3. asks the quickstart question of qtune generate --adapter, of llama-server on the `gguf`
#    export (f16, chat template from the file), of llama-server on the base with the
#    `gguf-lora` export (--lora), and of llama-server on a `gguf` export made from a Hugging Face
#    folder (the `merged` export), greedily, and fails unless all four answer the same;
# 4. runs llama-bench (-p 32 -n 64, 2 threads) and qtune bench-generate alternately, three times
#    each (quote medians: single runs on a shared machine vary by a quarter).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-models.sh >/dev/null
MODEL=.cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS=${THREADS:-2}
BIN=$(./scripts/llama-cpp-build.sh)
cargo build --release -q
QTUNE=${CARGO_TARGET_DIR:-target}/release/qtune
WORK=$(mktemp -d)
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill $SERVER_PID 2>/dev/null; rm -rf "$WORK"' EXIT

echo "== CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $THREADS threads"
echo "== a 20-step adapter on $MODEL"
cat >"$WORK/spec.json" <<JSON
{"base_model": "$PWD/$MODEL",
 "dataset": {"url": "$PWD/examples/quickstart.jsonl", "format": "messages"},
 "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear", "dropout": 0.0},
 "training": {"max_steps": 20, "batch_size": 4, "learning_rate": 3e-4, "max_seq_len": 256},
 "seed": 0}
JSON
"$QTUNE" train "$WORK/spec.json" --output "$WORK/run" >/dev/null 2>"$WORK/train.log"
ADAPTER="$WORK/run/adapter"
"$QTUNE" export --format gguf --type f16 --model "$MODEL" --adapter "$ADAPTER" --output "$WORK/merged-f16.gguf" >/dev/null
"$QTUNE" export --format gguf-lora --model "$MODEL" --adapter "$ADAPTER" --output "$WORK/adapter.gguf" >/dev/null
# a GGUF made from a Hugging Face folder (its tokenizer's llama.cpp name found by the hash of
# its ids, as convert_hf_to_gguf.py finds it): the folder is the base with the adapter merged,
# exported again over an adapter of (all but) zeros: one step at learning rate 1e-30
"$QTUNE" export --format merged --model "$MODEL" --adapter "$ADAPTER" --output "$WORK/folder" >/dev/null
sed -e 's/"max_steps": 20/"max_steps": 1/' -e 's/"learning_rate": 3e-4/"learning_rate": 1e-30/' \
    "$WORK/spec.json" >"$WORK/zero.json"
"$QTUNE" train "$WORK/zero.json" --output "$WORK/zero" >/dev/null 2>>"$WORK/train.log"
"$QTUNE" export --format gguf --type f16 --model "$WORK/folder" --adapter "$WORK/zero/adapter" \
    --output "$WORK/folder-f16.gguf" >/dev/null

QUESTION="What is the capital of Peru?"
TOKENS=24
qtune_answer=$("$QTUNE" generate --model "$MODEL" --adapter "$ADAPTER" --prompt "$QUESTION" --max-new-tokens $TOKENS 2>/dev/null)
echo "qtune generate --adapter:      $qtune_answer"

ask_llama_server() { # model args…: llama-server's chat route, greedy, the GGUF's own chat template
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$BIN/llama-server" --port "$port" -t "$THREADS" -c 512 --no-webui "$@" >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    python3 - "$port" "$QUESTION" "$TOKENS" <<'PY' || { tail -20 "$WORK/server.log" >&2; exit 1; }
import json, sys, time, urllib.request
port, question, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        break
    except Exception:
        time.sleep(0.1)
body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": tokens}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                             {"content-type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["message"]["content"])
PY
    kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true; SERVER_PID=""
}
merged_answer=$(ask_llama_server -m "$WORK/merged-f16.gguf")
echo "llama.cpp, gguf export (f16): $merged_answer"
lora_answer=$(ask_llama_server -m "$MODEL" --lora "$WORK/adapter.gguf")
echo "llama.cpp, base + gguf-lora:  $lora_answer"
folder_answer=$(ask_llama_server -m "$WORK/folder-f16.gguf")
echo "llama.cpp, gguf from a folder: $folder_answer"
if [ "$qtune_answer" != "$merged_answer" ] || [ "$qtune_answer" != "$lora_answer" ] \
    || [ "$qtune_answer" != "$folder_answer" ]; then
    echo "the answers differ" >&2
    exit 1
fi
echo "all four answer the same"

echo "== decode side by side, alternating (llama-bench tg64 after pp32; qtune bench-generate 32 prompt tokens, 64 decoded)"
for round in 1 2 3; do
    "$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 32 -n 64 -o md 2>/dev/null | grep -E "pp32|tg64" | sed "s/^/llama-bench (round $round): /"
    "$QTUNE" bench-generate --model "$MODEL" --streams 1 --adapters 1 2>/dev/null | grep "base, 1 streams:" | sed "s/^/qtune (round $round):/"
done
