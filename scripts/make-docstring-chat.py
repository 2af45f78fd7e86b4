#!/usr/bin/env python3
"""A real mixed-length chat dataset from text every machine here ships with: the docstrings of
Python's standard library as question/answer pairs ("What does `json.dumps` do?" -> its
docstring), for the real-data epoch benchmark (scripts/compare-peft.py --configs epoch).

Deterministic for one Python version (docstrings change between versions: the version and the
file's sha256 are printed). Answers are 40 to 4,000 characters, long, middle and short ones all present.

    python3 scripts/make-docstring-chat.py OUT.jsonl [--rows 900]
"""

import argparse
import hashlib
import importlib
import inspect
import json
import random
import sys

MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmath",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fnmatch", "fractions",
    "functools", "getopt", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "lzma", "mailbox",
    "math", "mimetypes", "operator", "optparse", "os", "os.path", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shelve", "shlex", "shutil", "signal", "smtplib",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "turtle", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib", "codecs", "collections.abc", "concurrent.futures",
    "ctypes", "email.utils", "ftplib", "gettext", "http.cookiejar", "http.server", "locale",
    "multiprocessing.pool", "pdb", "pkgutil", "platform", "plistlib", "poplib", "pstats",
    "pydoc", "select", "selectors", "socketserver", "ssl", "sysconfig", "telnetlib", "trace",
    "types", "unittest.mock", "wave", "webbrowser", "xml.sax", "xmlrpc.client", "zipimport",
]

QUESTIONS = [
    "What does `{name}` do in Python?",
    "Explain `{name}` from the Python standard library.",
    "How do I use `{name}`?",
    "Describe `{name}`.",
]


def harvest():
    """(qualified name, docstring) for the modules' public functions, classes and methods."""
    seen, out = set(), []
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # e.g. turtle without tkinter: fewer examples, still deterministic
            continue
        items = [(mod_name, mod)]
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", mod_name) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                items.append((f"{mod_name}.{name}", obj))
                if inspect.isclass(obj):
                    for m, meth in sorted(vars(obj).items()):
                        if not m.startswith("_") and callable(meth):
                            items.append((f"{mod_name}.{name}.{m}", meth))
        for qual, obj in items:
            doc = inspect.getdoc(obj)
            if not doc or qual in seen:
                continue
            doc = doc.strip()
            if 40 <= len(doc) <= 4000 and doc not in seen:
                seen.add(qual)
                seen.add(doc)
                out.append((qual, doc))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=900)
    a = ap.parse_args()
    pairs = harvest()
    rng = random.Random(0)
    # long answers first, up to a third of the rows, then middle ones, then short ones fill the
    # rest: most docstrings are short, and the length mix is what padding and packing are about
    bands = [[p for p in pairs if lo <= len(p[1]) < hi] for lo, hi in ((1200, 4001), (300, 1200), (40, 300))]
    rows = []
    for i, band in enumerate(bands):
        rng.shuffle(band)
        want = a.rows - len(rows) if i == 2 else min(len(band), a.rows // 3)
        rows += band[:want]
    rng.shuffle(rows)
    with open(a.out, "w") as f:
        for i, (qual, doc) in enumerate(rows):
            q = QUESTIONS[i % len(QUESTIONS)].format(name=qual)
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": doc}]}) + "\n")
    lens = sorted(len(d) for _, d in rows)
    digest = hashlib.sha256(open(a.out, "rb").read()).hexdigest()
    print(json.dumps({"rows": len(rows), "python": sys.version.split()[0], "sha256": digest,
                      "answer_chars": {"min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]},
                      "harvested": len(pairs), "bands": [len(b) for b in bands]}))


if __name__ == "__main__":
    main()
