"""What the generated pages share: text from the code made into Markdown for docs/reference/."""

from __future__ import annotations

import re

# A docs page named in a description or a help text (``docs/security.md``).
_DOCS_PAGE = re.compile(r"(?<![\w/`])docs/([a-z0-9-]+)\.md\b")


def link_docs_pages(text: str) -> str:
    """Each ``docs/NAME.md`` named in ``text`` as a link from a page of docs/reference/, so that
    the site's strict build fails if the page is gone."""
    return _DOCS_PAGE.sub(r"[docs/\1.md](../\1.md)", text)
