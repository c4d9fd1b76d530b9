"""Every file or folder of the project the README and the docs name exists: a page that sends a
newcomer to a module that moved is a broken map. The site's navigation (mkdocs.yml) lists every
page of docs/ and only pages that exist, and the site builds with MkDocs' strict checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
PATH = re.compile(r"\b(?:worker|coupon_devtools|tests|migrations|deploy|docs)/[A-Za-z0-9_./-]*")
#: Paths that exist only in a built wheel, never in the checkout.
BUILT_ONLY = {"worker/adapters/postgres/alembic/"}


def named_paths(page: Path) -> set[str]:
    found = set()
    for match in PATH.finditer(page.read_text(encoding="utf-8")):
        path = match.group(0).rstrip(".,)")
        if path not in BUILT_ONLY:
            found.add(path)
    return found


class _MkDocsLoader(yaml.SafeLoader):
    """mkdocs.yml as data: its ``!!python/name:`` tags (the Mermaid fence) read as their name."""


_MkDocsLoader.add_multi_constructor(
    "tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)


def nav_pages(nav: Any) -> list[str]:
    """Every page the navigation names, at any depth."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def mkdocs_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"),
                                       Loader=_MkDocsLoader)  # noqa: S506 - a safe loader
    return loaded


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_page_names_exists(page: Path) -> None:
    missing = sorted(p for p in named_paths(page) if not (ROOT / p).exists())
    assert missing == [], f"{page.name} names paths that do not exist: {missing}"


def test_the_map_finds_the_paths_it_checks() -> None:
    named = {p for page in PAGES for p in named_paths(page)}
    assert "worker/usecases/issue.py" in named
    # the generated references and the site's own pages are among the pages checked
    assert DOCS / "reference" / "configuration.md" in PAGES
    assert DOCS / "architecture.md" in PAGES


def test_the_navigation_names_only_pages_that_exist() -> None:
    listed = nav_pages(mkdocs_config()["nav"])
    missing = sorted(page for page in listed if not (DOCS / page).is_file())
    assert missing == [], f"mkdocs.yml's nav names pages that do not exist: {missing}"
    assert len(listed) == len(set(listed)), "a page is listed twice in mkdocs.yml's nav"


def test_every_page_is_in_the_navigation() -> None:
    listed = set(nav_pages(mkdocs_config()["nav"]))
    pages = {page.relative_to(DOCS).as_posix() for page in DOCS.rglob("*.md")}
    assert sorted(pages - listed) == [], (
        f"pages missing from mkdocs.yml's nav: {sorted(pages - listed)}")


def test_the_site_builds_with_every_link_and_anchor_resolved(tmp_path: Path) -> None:
    # mkdocs.yml sets strict and turns every link, anchor and navigation check into a warning:
    # a broken one fails the build.
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()


def test_the_architecture_page_names_every_module_of_the_runtime() -> None:
    """The map is whole: a module added to ``worker/`` without a word on the architecture page
    is a room the newcomer's map does not show."""
    page = (DOCS / "architecture.md").read_text(encoding="utf-8")
    # A module is named by its path or by its path's tail in backquotes (`cli/render.py`).
    named = re.findall(r"`([A-Za-z0-9_./]+\.py)`", page)
    unnamed = sorted(
        path for path in (str(m.relative_to(ROOT)) for m in (ROOT / "worker").rglob("*.py")
                          if m.name not in ("__init__.py", "__main__.py"))
        if not any(path == name or path.endswith("/" + name) for name in named))
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"
