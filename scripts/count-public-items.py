#!/usr/bin/env python3
"""Counts the library's public items: what a crate depending on qtune can name.

An item counts when it is declared plain `pub` (not `pub(crate)` / `pub(super)`) in a file
module that the crate root reaches through `pub mod` declarations: functions and methods, types,
traits, constants, statics, modules, re-exports and struct fields. What a public module
re-exports from a private one (`pub use inner::{A, B}`) counts too: each named item, with the
public fields of its definition and the public functions of its `impl` blocks in that file (a
glob re-export counts the whole file), so that hiding a module behind re-exports does not shrink
the figure. Test modules are not
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
    """The text before an inline test module (`#[cfg(test)] mod tests { … }`, at a file's end)."""
    m = re.search(r"^#\[cfg\(test\)\]\s*\n\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", text, re.M)
    return text if m is None else text[: m.start()]


def reexports(path: Path):
    """(file, names or None for a glob) of what a module re-exports from its private children."""
    text = without_tests(path.read_text())
    children = {name: (public, f) for name, public, f in child_files(path)}
    for m in re.finditer(r"^\s*pub\s+use\s+(?:self::)?(\w+)::([^;]+);", text, re.M):
        if m.group(1) not in children or children[m.group(1)][0]:
            continue  # a public child is counted whole anyway
        f = children[m.group(1)][1]
        tree = re.sub(r"\s+", "", m.group(2))
        if "*" in tree:
            yield f, None
            continue
        # the last path segment of each name, as re-exported (`a::B` -> B, `X as Y` -> X)
        names = [re.sub(r"as\w+$", "", n).split("::")[-1] for n in re.split(r"[{},]", tree) if n]
        yield f, [n for n in names if n and n != "self"]


def named_items(path: Path, names) -> int:
    """The public lines of `names` in `path`: each definition, its public fields and the public
    functions of its impl blocks."""
    lines = without_tests(path.read_text()).splitlines()
    count, inside, depth = 0, False, 0
    for line in lines:
        if not inside:
            m = re.match(r"^pub\s+(?:(?:async|unsafe|const)\s+)*(?:fn|struct|enum|const|static|trait|type|union)\s+(\w+)", line)
            i = re.match(r"^impl(?:<[^>]*>)?\s+(?:\w+\s+for\s+)?(\w+)", line)
            if m and m.group(1) in names:
                count += 1
                inside = line.rstrip().endswith("{")
            elif i and i.group(1) in names:
                inside = line.rstrip().endswith("{")
            depth = 1 if inside else 0
            continue
        if ITEM.match(line):
            count += 1
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            inside = False
    return count


def main() -> int:
    counts, visited = {}, set()
    stack = [SRC / "lib.rs"]
    while stack:
        f = stack.pop()
        if f in visited:
            continue
        visited.add(f)
        counts[f] = counts.get(f, 0) + sum(
            1 for line in without_tests(f.read_text()).splitlines() if ITEM.match(line)
        )
        stack += [child for _, public, child in child_files(f) if public]
        for inner, names in reexports(f):
            if names is None:
                stack.append(inner)
            elif inner not in visited:
                counts[inner] = counts.get(inner, 0) + named_items(inner, set(names))
    total = sum(counts.values())
    if "--by-file" in sys.argv:
        for f, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"{n:5} {f.relative_to(SRC.parent)}")
    print(f"public items: {total} in {len(counts)} public modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
