"""The documentation stays usable: the README is a page a newcomer reads in a few minutes (at most 16 KB), and every
relative link in the README and under ``docs/`` points at a file that exists (and, with ``#anchor``, at a heading
of that page), so moving a page cannot silently break the pages that cite it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 16 * 1024
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)")


def prose(text: str) -> str:
    """The page without its fenced code blocks (a link in a code sample is not a link)."""
    return FENCE.sub("", text)


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes for ``page``: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered -1, -2, ..."""
    return anchors_of(page.read_text(encoding="utf-8"))


def anchors_of(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose(text)):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links_in(text: str) -> list[str]:
    """Every link target in ``text`` outside code (a code span becomes a placeholder, so ``[`x`](y.md)`` stays a
    link and ``[x](y.md)`` written as code is none)."""
    return LINK.findall(CODE_SPAN.sub("code", prose(text)))


def relative_links(page: Path) -> list[str]:
    """The links of ``page`` to files of this repository (``https:``, ``mailto:`` and the like are not checked)."""
    return [t for t in links_in(page.read_text(encoding="utf-8")) if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail to a page in docs/"


def test_link_parsing():
    text = "[a](x.md) ![b](img/p.png) [`c`](y.md#h) [d](https://e.org) `[e](not-a-link.md)` [f]( <z.md> )\n" \
           "```\n[g](in-code.md)\n```\n- item\n  ```\n  [h](indented-code.md)\n  ```\n"
    assert links_in(text) == ["x.md", "img/p.png", "y.md#h", "https://e.org", "z.md"]
    assert anchors_of("# A, b\n## `x` (y): τ\n## A, b\n```\n# not a heading\n```\n") == {"a-b", "a-b-1", "x-y-τ"}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: " + "; ".join(broken)
