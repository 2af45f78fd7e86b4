#!/usr/bin/env bash
# qtune serve beside llama.cpp's llama-server, both serving SmolLM2-135M-Instruct's Q4_1 GGUF
# over HTTP on this machine, in one run: chat requests of 64 decoded tokens (ignore_eos, so both
# decode the same count), at once, in three cases:
#   - one request alone, on the base;
#   - 8 concurrent requests on the base;
#   - 8 concurrent requests over 4 different LoRA adapters (two each): qtune's own adapters,
#     uploaded to qtune (POST /v1/adapters) and loaded into llama-server as their `gguf-lora`
#     exports, chosen per request (llama-server's per-request "lora" field).
# llama-server runs with 8 slots and continuous batching (-np 8 -cb); qtune with its defaults
# (8 generations per batch). The servers take turns, ROUNDS rounds (default 3); medians
# printed with the CPU model. Not part of CI: llama.cpp's build takes about 15 minutes on two
# cores the first time (scripts/llama-cpp-build.sh caches it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-models.sh >/dev/null
MODEL=$PWD/.cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
BIN=$(./scripts/llama-cpp-build.sh)
cargo build --release -q --bin qtune
QTUNE=$PWD/${CARGO_TARGET_DIR:-target}/release/qtune
WORK=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $THREADS threads, $(date -u +%F)"
echo "== 4 adapters on $MODEL (8 steps each, different seeds and data orders)"
for i in 0 1 2 3; do
    cat >"$WORK/spec$i.json" <<JSON
{"base_model": "$MODEL",
 "dataset": {"url": "$PWD/examples/quickstart.jsonl", "format": "messages"},
 "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear", "dropout": 0.0},
 "training": {"max_steps": 8, "batch_size": 4, "learning_rate": 3e-4, "max_seq_len": 256},
 "seed": $i}
JSON
    "$QTUNE" train "$WORK/spec$i.json" --output "$WORK/run$i" >/dev/null 2>"$WORK/train$i.log"
    "$QTUNE" export --format gguf-lora --model "$MODEL" --adapter "$WORK/run$i/adapter" \
        --output "$WORK/adapter$i.gguf" >/dev/null
done

LLAMA_PORT=$(free_port)
# 8 slots of 512 positions each
"$BIN/llama-server" --port "$LLAMA_PORT" -m "$MODEL" -t "$THREADS" -np 8 -cb -c 4096 --no-webui \
    --lora-init-without-apply --lora "$WORK/adapter0.gguf" --lora "$WORK/adapter1.gguf" \
    --lora "$WORK/adapter2.gguf" --lora "$WORK/adapter3.gguf" >"$WORK/llama-server.log" 2>&1 &
PIDS+=($!)
QTUNE_PORT=$(free_port)
"$QTUNE" serve --listen "127.0.0.1:$QTUNE_PORT" --data-dir "$WORK/qtune-data" \
    --workers 0 --models "smollm2=$MODEL" >"$WORK/qtune.log" 2>&1 &
PIDS+=($!)
for port in "$LLAMA_PORT" "$QTUNE_PORT"; do
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        sleep 0.2
    done
done
for i in 0 1 2 3; do
    curl -sSf "http://127.0.0.1:$QTUNE_PORT/v1/adapters" -F name=adapter$i -F base_model=smollm2 \
        -F "adapter_config=@$WORK/run$i/adapter/adapter_config.json" \
        -F "adapter_model=@$WORK/run$i/adapter/adapter_model.safetensors" >/dev/null
done

python3 - "$LLAMA_PORT" "$QTUNE_PORT" "$ROUNDS" <<'PY'
import json, statistics, sys, threading, time, urllib.request

llama_port, qtune_port, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
TOKENS = 64
QUESTIONS = [
    "What is the capital of Peru?", "Name three primary colours.", "How many legs has a spider?",
    "What is the boiling point of water?", "Who wrote Hamlet?", "What is two plus two?",
    "Which planet is the largest?", "What language is spoken in Brazil?",
]

def ask(server, i, adapter):
    body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    if server == "llama-server":
        port = llama_port
        body["model"] = "smollm2"
        # every adapter named, the one this request uses at scale 1 (unnamed ones would keep
        # the scale the last request left them at)
        body["lora"] = [{"id": a, "scale": 1.0 if a == adapter else 0.0} for a in range(4)]
    else:
        port = qtune_port
        body["model"] = "smollm2" if adapter is None else f"adapter{adapter}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 json.dumps(body).encode(), {"content-type": "application/json"})
    answer = json.load(urllib.request.urlopen(req, timeout=600))
    return answer["usage"]["completion_tokens"]

def case(server, streams, adapters):
    counts = [0] * streams
    def one(i):
        counts[i] = ask(server, i, None if adapters == 0 else i % adapters)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - start
    if any(c != TOKENS for c in counts):
        sys.exit(f"{server}: decoded {counts}, not {TOKENS} each")
    return sum(counts) / wall

CASES = [("1 request, base", 1, 0), ("8 requests, base", 8, 0), ("8 requests, 4 adapters", 8, 4)]
for server in ("llama-server", "qtune"):  # warm-up: models loaded, adapters attached
    case(server, 8, 4)
results = {(s, c[0]): [] for s in ("llama-server", "qtune") for c in CASES}
for r in range(rounds):
    for name, streams, adapters in CASES:
        for server in (("llama-server", "qtune") if r % 2 == 0 else ("qtune", "llama-server")):
            tps = case(server, streams, adapters)
            results[(server, name)].append(tps)
            print(f"round {r + 1}: {server:12} {name:24} {tps:7.1f} tokens/s in all", flush=True)
print("== medians (tokens/s in all, 64 decoded per request)")
for name, _, _ in CASES:
    l = statistics.median(results[("llama-server", name)])
    q = statistics.median(results[("qtune", name)])
    print(f"{name:24} llama-server {l:7.1f}   qtune {q:7.1f}   qtune/llama-server {q / l:5.2f}x")
qb = statistics.median(results[("qtune", "8 requests, base")])
qa = statistics.median(results[("qtune", "8 requests, 4 adapters")])
q1 = statistics.median(results[("qtune", "1 request, base")])
print(f"qtune: 8 requests over 4 adapters at {qa / qb:.2f}x its 8 on the base; 8 on the base at {qb / q1:.2f}x one")
PY
