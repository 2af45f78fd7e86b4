#!/usr/bin/env python3
"""Counts the library's public items: what a crate depending on qtune can name.

An item counts when it is declared plain `pub` (not `pub(crate)` / `pub(super)`) in a file
module that the crate root reaches through `pub mod` declarations, or in a private module that
such a module re-exports from (`pub use inner::Thing;` makes all of `inner`'s public items count:
an over-count, so that hiding a module behind re-exports cannot shrink the figure): functions and
methods, types, traits, constants, statics, modules, re-exports and struct fields. Test modules are not
counted. A grep-level count (no macro expansion, no trait impls), kept to compare before and
after a change, as `cargo public-api` would on a nightly toolchain.

    python3 scripts/count-public-items.py          # the total
    python3 scripts/count-public-items.py --by-file
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ITEM = re.compile(
    r"^\s*pub\s+(?:(?:async|unsafe|const|extern\s+\"C\")\s+)*(fn|struct|enum|const|static|trait|type|mod|use|union)\b"
    r"|^\s*pub\s+\w+\s*:"
)


def child_files(path: Path):
    """(name, is_pub, file) for each `mod x;` a module file declares."""
    text = path.read_text()
    base = path.parent if path.name in ("mod.rs", "lib.rs") else path.with_suffix("")
    for m in re.finditer(r"^\s*(pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text, re.M):
        vis, name = m.group(1), m.group(2)
        for f in (base / f"{name}.rs", base / name / "mod.rs"):
            if f.exists():
                yield name, (vis or "").strip() == "pub", f


def without_tests(text: str) -> str:
    i = text.find("#[cfg(test)]")
    return text if i < 0 else text[:i]


def reexported_files(path: Path):
    """The files of the child modules a module re-exports from (`pub use child::…`)."""
    text = without_tests(path.read_text())
    children = {name: f for name, _, f in child_files(path)}
    for m in re.finditer(r"^\s*pub\s+use\s+(?:self::)?(\w+)::", text, re.M):
        if m.group(1) in children:
            yield children[m.group(1)]


def main() -> int:
    counts = {}
    stack = [SRC / "lib.rs"]
    while stack:
        f = stack.pop()
        if f in counts:
            continue
        counts[f] = sum(1 for line in without_tests(f.read_text()).splitlines() if ITEM.match(line))
        stack += [child for _, public, child in child_files(f) if public]
        stack += list(reexported_files(f))
    total = sum(counts.values())
    if "--by-file" in sys.argv:
        for f, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"{n:5} {f.relative_to(SRC.parent)}")
    print(f"public items: {total} in {len(counts)} public modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
