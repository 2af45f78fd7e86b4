#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with Schemathesis (PyPI): generated valid
# and invalid requests for every operation; fails on any 5xx, on a response that does not match
# the documented schema, or on an undocumented content type. Run before each release:
#   ./scripts/fuzz-api.sh [max examples per operation, default 100]
# It builds qtune, starts `qtune serve` on a free port with an API key and a temporary data dir,
# and prints how many requests were made. Meanwhile `/healthz` is timed every 50 ms on a fresh
# connection, as a load balancer would: the run fails if its p99 reaches 50 ms or a check fails.
# Schemathesis lives in ~/.cache/qtune-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES="${1:-100}"
VENV="$HOME/.cache/qtune-fuzz"
if [ ! -x "$VENV/bin/schemathesis" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "schemathesis==4.32.5"
fi
cargo build -q --bin qtune
DATA="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
QTUNE_LOG=warn target/debug/qtune serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
    --api-keys fuzz-key --max-upload-mib 4 >"$DATA/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
python3 - "$PORT" "$DATA/fuzz-done" >"$DATA/healthz.txt" <<'PY' &
import http.client, os, sys, time
port, done = int(sys.argv[1]), sys.argv[2]
times, failed = [], 0
while not os.path.exists(done):
    start = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/healthz")
        ok = c.getresponse().status == 200
        c.close()
    except OSError:
        ok = False
    if ok:
        times.append((time.perf_counter() - start) * 1000)
    else:
        failed += 1
    time.sleep(0.05)
times.sort()
pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] if times else float("nan")
print(f"/healthz during the fuzz run: {len(times)} checks, {failed} failed, "
      f"p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {times[-1] if times else float('nan'):.1f} ms")
sys.exit(0 if failed == 0 and times and pick(0.99) < 50 else 1)
PY
PROBE=$!
"$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/openapi.json" \
    -H "Authorization: Bearer fuzz-key" \
    --checks not_a_server_error,response_schema_conformance,content_type_conformance \
    --max-examples "$EXAMPLES" --seed 2026 --workers 2 \
    --report ndjson --report-ndjson-path "$DATA/events.ndjson" | tee "$DATA/summary.txt"
status=${PIPESTATUS[0]}
touch "$DATA/fuzz-done"
wait $PROBE || status=1
cat "$DATA/healthz.txt"
echo "exit status $status (schemathesis, then the /healthz check)"
grep -E "test cases|passed|failed|Requests" "$DATA/summary.txt" | tail -5 || true
kill -0 $SERVER && curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && echo "server still healthy"
exit "$status"
