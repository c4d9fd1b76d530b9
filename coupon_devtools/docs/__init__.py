"""The reference pages generated from the code: the configuration (from the settings classes),
the command line (from the click commands) and the log events (from the logging calls).

``make docs-reference`` (``python -m coupon_devtools.docs``) writes them; ``--check`` says which
are stale and exits 1, and ``tests/unit/test_docs_reference.py`` fails the same way, so a setting
or a command that changed without its page is caught. Nothing here needs a service.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coupon_devtools.docs.cli import render_cli
from coupon_devtools.docs.configuration import render_configuration
from coupon_devtools.docs.log_events import render_log_events

#: The command that regenerates every page, as the failure messages name it.
REGENERATE = "make docs-reference"

ROOT = Path(__file__).resolve().parents[2]

#: Each generated page, relative to the project's root, and what renders it.
PAGES: dict[str, Callable[[], str]] = {
    "docs/reference/configuration.md": render_configuration,
    "docs/reference/cli.md": render_cli,
    "docs/reference/log-events.md": render_log_events,
}


def stale_pages(root: Path = ROOT) -> list[str]:
    """The generated pages whose file differs from what the code renders now (or is missing)."""
    stale = []
    for relative, render in PAGES.items():
        path = root / relative
        if not path.exists() or path.read_text(encoding="utf-8") != render():
            stale.append(relative)
    return stale


def write_pages(root: Path = ROOT) -> list[str]:
    """Write every generated page; returns those whose content changed."""
    changed = []
    for relative, render in PAGES.items():
        path = root / relative
        text = render()
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(relative)
    return changed
