#!/usr/bin/env bash
# The seeded soak, run before releases (not in CI): a fleet of 2 API replicas and 2 workers on a
# real PostgreSQL and a real S3 server, SmolLM2-135M jobs arriving all along, and every kind of
# fault at random moments (PostgreSQL crashed and restarted; the S3 server frozen, gone, slow;
# workers SIGKILLed and SIGSTOPped past their lease; an API replica killed). It prints what it
# did and checks that no job was lost, no step duplicated, no artifact corrupt, no multipart
# upload left open (scripts/chaos.py). Run as root on Debian (PostgreSQL runs as `postgres`):
#   ./scripts/chaos.sh [--minutes 20] [--seed 2026] [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-models.sh
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
}
S3_VENV="$HOME/.cache/qtune-s3/moto-venv"
if [ ! -x "$S3_VENV/bin/moto_server" ]; then
    python3 -m venv "$S3_VENV"
    "$S3_VENV/bin/pip" install -q 'moto[server]==5.2.5'
fi
cargo build -q --bin qtune
exec "$S3_VENV/bin/python" scripts/chaos.py --qtune target/debug/qtune \
    --model .cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf "$@"
