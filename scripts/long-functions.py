#!/usr/bin/env python3
"""Lists functions longer than a limit (lines from `fn` to its closing brace, comments included).

    python3 scripts/long-functions.py src/api 60     # fails when one is over 60 lines
    python3 scripts/long-functions.py src 100 --list  # lists them, never fails

Functions are found by their `fn` line and matched to the brace that closes them, skipping
braces inside strings, characters and comments. `.ci/run` keeps the HTTP handlers (src/api)
short: a handler parses, calls one service and answers.
"""
import re
import sys
from pathlib import Path

FN = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:(?:async|const|unsafe|extern\s+\"C\")\s+)*fn\s+(\w+)")
LEX = re.compile(r'//[^\n]*|/\*[\s\S]*?\*/|\br(#*)"[\s\S]*?"\1|"(?:\\[\s\S]|[^"\\])*"|\'(?:\\.|[^\\\'])\'')


def blank(m):
    return re.sub(r"[^\n]", " ", m.group(0))


def functions(path: Path):
    text = LEX.sub(blank, path.read_text())
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        depth, started = 0, False
        for j in range(i, len(lines)):
            for ch in lines[j]:
                if ch == "{":
                    depth += 1
                    started = True
                elif ch == "}":
                    depth -= 1
                elif ch == ";" and not started and depth == 0:
                    break  # a declaration without a body
            else:
                if started and depth == 0:
                    yield m.group(1), i + 1, j - i + 1
                    break
                continue
            break


def main() -> int:
    root, limit = Path(sys.argv[1]), int(sys.argv[2])
    listing = "--list" in sys.argv
    over = []
    for path in sorted(root.rglob("*.rs")):
        for name, line, length in functions(path):
            if length > limit:
                over.append((length, f"{path}:{line}", name))
    for length, where, name in sorted(over, reverse=True):
        print(f"{length:5} {where} {name}")
    if over and not listing:
        print(f"{len(over)} functions over {limit} lines in {root}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
