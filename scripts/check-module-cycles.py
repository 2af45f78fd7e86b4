#!/usr/bin/env python3
"""Fails when a module of src/ imports a module that imports it back (directly or round a loop).

The graph is over files: each `src/**/*.rs` is one module. An edge A -> B is any path in A's code
(a `use` or an inline `crate::…` / `super::…` / `self::…` path, tests included) that names an item
of B. A path resolves to the deepest file module it passes through; a name that a module only
re-exports (`pub use x::Y;`) resolves to where it comes from. Declaring a child (`mod x;`) is not
an import, and neither is re-exporting a name (`pub use`): a `mod.rs` that only declares its
children and re-exports their items is their facade, not a user of them.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_of(path: Path) -> tuple:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod" or parts == ["lib"] or parts == ["main"]:
        parts = parts[:-1] if parts[-1] == "mod" else []
    return tuple(parts)


# comments and string literals, whichever starts first (a `//` inside a string is not a comment);
# an escape may be a backslash before a line break (a string continued on the next line)
LEXEMES = re.compile(r'//[^\n]*|/\*[\s\S]*?\*/|\br(#*)"[\s\S]*?"\1|"(?:\\[\s\S]|[^"\\])*"')


def strip_comments(text: str) -> str:
    return LEXEMES.sub(lambda m: '""' if m.group(0).endswith('"') or m.group(0).startswith("r") else "", text)


def expand_use(tree: str) -> list:
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+as\s+\w+", "", tree)  # `x as y` imports x
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(2)
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur:
        items.append(cur)
    out = []
    for item in items:
        out += [prefix + p for p in expand_use(item)]
    return out


def cycles(nodes, edges) -> list:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    # main.rs is the binary's root, a crate of its own that only calls into the library
    files = {module_of(p): p for p in SRC.rglob("*.rs") if p != SRC / "main.rs"}
    modules = set(files)
    texts = {m: strip_comments(p.read_text()) for m, p in files.items()}

    def absolute(m, path):
        parts = path.split("::")
        base = list(m)
        if parts[0] == "crate":
            return parts[1:]
        if parts[0] == "self":
            return base + parts[1:]
        if parts[0] == "super":
            cur = base
            while parts and parts[0] == "super":
                cur = cur[:-1]
                parts = parts[1:]
            return cur + parts
        if parts[0] in {c[-1] for c in modules if len(c) == len(base) + 1 and list(c[:-1]) == base}:
            return base + parts  # a child module named without self::
        return None

    reexports = {}
    for m, text in texts.items():
        for tree in re.findall(r"\bpub(?:\(crate\))?\s+use\s+([^;]+);", text):
            for p in expand_use(tree):
                a = absolute(m, p)
                if a:
                    reexports[(m, a[-1])] = a

    def resolve(path_parts, depth=0):
        parts = list(path_parts)
        best = ()
        for i in range(len(parts) + 1):
            if tuple(parts[:i]) in modules:
                best = tuple(parts[:i])
            else:
                break
        rest = parts[len(best):]
        if rest and (best, rest[0]) in reexports and depth < 10:
            return resolve(reexports[(best, rest[0])] + rest[1:], depth + 1)
        return best

    edges = {m: set() for m in modules}
    path_re = re.compile(r"\b(?:crate|super|self)(?:::(?:\w+|\{[^;]*?\}))+")
    for m, text in texts.items():
        paths = []
        # `pub use` re-exports a name (a facade over a module's children), it does not use it
        for tree in re.findall(r"(?<!pub )(?<!pub\(crate\) )\buse\s+([^;]+);", text):
            paths += expand_use(tree)
        paths += [p for p in path_re.findall(text) if "{" not in p]
        for p in paths:
            if p == "super::*":
                continue  # an inline `mod tests` importing the file it sits in
            a = absolute(m, p)
            if a is None:
                continue
            target = resolve(a)
            if target != m and target in modules and not (m and target == ()):
                edges[m].add(target)

    name = lambda m: "::".join(m) or "crate"
    sccs = [("files", comp, edges) for comp in cycles(modules, edges)]

    # The same question a level up: within each folder module, its children (a file, or a
    # folder taken whole with everything under it) must not import each other round a loop.
    # Two files can each be clear of cycles while their folders tie together (train::cost uses
    # a file of train::model, and another file of train::model uses train::cost).
    parents = {m[:-1] for m in modules if m}
    for parent in sorted(parents):
        def child(m):
            return m[: len(parent) + 1] if len(m) > len(parent) and m[: len(parent)] == parent else None
        kids = {child(m) for m in modules} - {None}
        tied = {k: set() for k in kids}
        for a in modules:
            ca = child(a)
            for b in edges[a]:
                cb = child(b)
                if ca and cb and ca != cb:
                    tied[ca].add(cb)
        sccs += [("modules", comp, tied) for comp in cycles(kids, tied)]
    if not sccs:
        print(f"module graph: {len(modules)} modules, {sum(map(len, edges.values()))} imports, no cycles")
        return 0
    for level, comp, graph in sccs:
        members = set(comp)
        print(f"import cycle among {level}: " + ", ".join(sorted(name(c) for c in comp)))
        for a in sorted(comp):
            for b in sorted(graph[a] & members):
                print(f"    {name(a)} -> {name(b)}")
                if level == "modules":
                    for f in sorted(m for m in modules if m[: len(a)] == a):
                        for g in sorted(t for t in edges[f] if t[: len(b)] == b):
                            print(f"        {name(f)} uses {name(g)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
