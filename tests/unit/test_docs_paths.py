"""Every file or folder of the project the README and the docs name exists: a page that sends a
newcomer to a module that moved is a broken map."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"\b(?:worker|coupon_devtools|tests|migrations|deploy|docs)/[A-Za-z0-9_./-]*")
#: Paths that exist only in a built wheel, never in the checkout.
BUILT_ONLY = {"worker/adapters/postgres/alembic/"}


def named_paths(page: Path) -> set[str]:
    found = set()
    for match in PATH.finditer(page.read_text()):
        path = match.group(0).rstrip(".,)")
        if path not in BUILT_ONLY:
            found.add(path)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_a_page_names_exists(page: Path) -> None:
    missing = sorted(p for p in named_paths(page) if not (ROOT / p).exists())
    assert missing == [], f"{page.name} names paths that do not exist: {missing}"


def test_the_map_finds_the_paths_it_checks() -> None:
    assert "worker/usecases/issue.py" in named_paths(ROOT / "README.md") | {
        p for page in PAGES for p in named_paths(page)}
