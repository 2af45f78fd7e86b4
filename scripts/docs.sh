#!/usr/bin/env bash
# Builds the docs site (docs/, an mdBook) and fails on a broken internal link or anchor.
# mdbook is installed once per machine into ~/.cache/qtune-mdbook (about 2.5 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
MDBOOK_VERSION=0.5.4
ROOT="$HOME/.cache/qtune-mdbook"
MDBOOK="$ROOT/bin/mdbook"
if ! "$MDBOOK" --version 2>/dev/null | grep -q "v$MDBOOK_VERSION"; then
    cargo install mdbook --version "$MDBOOK_VERSION" --locked --no-default-features --features search --root "$ROOT"
fi
"$MDBOOK" build docs
python3 scripts/check-doc-links.py docs/book
