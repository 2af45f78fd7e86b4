#!/usr/bin/env python3
"""Fails on a broken internal link or anchor in the docs.

- The built site (docs/book, from `mdbook build docs`): every relative href and src of every page
  must name a file of the site, and its #fragment an id in that page.
- README.md (read on GitHub, beside the site): every relative link must name a file of the
  repository, and a #fragment into a Markdown page a heading of it (as mdBook and GitHub make ids).

    python3 scripts/check-doc-links.py [docs/book]
"""

import html.parser
import os
import re
import sys
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)
            if name in ("href", "src") and value:
                self.links.append(value)


def external(link):
    return re.match(r"^[a-z][a-z0-9+.-]*:", link) is not None or link.startswith("//")


def read_page(path, cache={}):
    if path not in cache:
        page = Page()
        with open(path, encoding="utf-8") as f:
            page.feed(f.read())
        cache[path] = page
    return cache[path]


def check_site(site):
    broken, checked = [], 0
    for root, _, files in os.walk(site):
        for name in files:
            # print.html is every page again, on one page; the pages themselves are checked
            if not name.endswith(".html") or name == "print.html":
                continue
            path = os.path.join(root, name)
            for link in read_page(path).links:
                if external(link) or link.startswith("#") and link in ("#", "#sidebar", "#menu-bar"):
                    continue
                url = urllib.parse.urlsplit(link)
                base = site if url.path.startswith("/") else os.path.dirname(path)
                target = path if not url.path else os.path.normpath(
                    os.path.join(base, urllib.parse.unquote(url.path).lstrip("/")))
                if os.path.isdir(target):
                    target = os.path.join(target, "index.html")
                checked += 1
                where = os.path.relpath(path, site)
                if not os.path.exists(target):
                    broken.append(f"{where}: {link}: no such file")
                elif url.fragment and target.endswith(".html"):
                    if urllib.parse.unquote(url.fragment) not in read_page(target).ids:
                        broken.append(f"{where}: {link}: no such anchor")
    return broken, checked


def heading_ids(markdown_path):
    """The ids mdBook gives the headings of a Markdown page (GitHub's are the same for ours)."""
    ids, seen = set(), {}
    in_code = False
    with open(markdown_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                in_code = not in_code
            m = None if in_code else re.match(r"^#{1,6} (.*)$", line)
            if not m:
                continue
            text = re.sub(r"`|\*|\[([^\]]*)\]\([^)]*\)", lambda g: g.group(1) or "", m.group(1))
            base = "".join(
                c.lower() if c.isalnum() or c in "_-" else "-" if c.isspace() else ""
                for c in text.strip())
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def check_markdown(path):
    broken, checked = [], 0
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if external(link):
            continue
        url = urllib.parse.urlsplit(link)
        target = os.path.normpath(os.path.join(os.path.dirname(path), url.path)) if url.path else path
        checked += 1
        if not os.path.exists(target):
            broken.append(f"{os.path.relpath(path, REPO)}: {link}: no such file")
        elif url.fragment and target.endswith(".md") and url.fragment not in heading_ids(target):
            broken.append(f"{os.path.relpath(path, REPO)}: {link}: no such heading")
    return broken, checked


def main():
    site = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "docs", "book")
    if not os.path.isfile(os.path.join(site, "index.html")):
        sys.exit(f"{site} holds no built site: run `mdbook build docs` first")
    broken, checked = check_site(site)
    for md in [os.path.join(REPO, "README.md")]:
        b, c = check_markdown(md)
        broken += b
        checked += c
    for line in broken:
        print("broken link:", line)
    print(f"{checked} internal links checked, {len(broken)} broken")
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
