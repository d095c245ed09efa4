"""The documentation a user clones is complete: no page points outside the repository, and
the files and modules the pages name exist."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                         if n.endswith(".md")]


def _text(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as fh:
        return fh.read()


@pytest.mark.parametrize("page", PAGES)
def test_no_page_points_outside_the_repository(page):
    assert not re.findall(r"(?<![\w/])\.\./[\w./-]+", _text(page)), page


@pytest.mark.parametrize("page", PAGES)
def test_named_pages_and_modules_exist(page):
    text = _text(page)
    named = set(re.findall(r"docs/[A-Z]+\.md", text))
    named |= {f"docs/{n}" for n in re.findall(r"\b([A-Z]+\.md)\b", text) if n != "README.md"}
    named |= set(re.findall(r"\bdecolla/[\w/]+\.(?:py|npz|txt)\b", text))
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{page} names {missing}"
