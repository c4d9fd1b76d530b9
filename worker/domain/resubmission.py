"""What a resubmission of a rejected message may change: only what failed validation, and the
metadata.

Support fixes a rejected message and sends it again. The fix must not turn it into another
request: its eventId, customer and series (and any other field that was valid) stay as the
producer sent them. A field counts as valid when the fixed event still validates with the
original's value put back in its place; one that was missing, or that fails there, is what
the fix is for.
"""

from __future__ import annotations

import json
from typing import Any

from worker.domain.errors import EventRejected
from worker.domain.events import parse_event_data

#: Free to change in a fix: notes, reasons, sources, which never name the request.
FREE = frozenset({"metadata"})
#: What names the request; a change to these is the one support most needs refused.
IDENTITY = ("eventId", "customer", "seriesIds")


def original_fields(raw: bytes) -> dict[str, Any] | None:
    """The original message's top-level fields, or None when it was not a JSON object."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def changed_valid_fields(original: dict[str, Any] | None, fixed: dict[str, Any]) -> list[str]:
    """The fields ``fixed`` changes although the original's value was valid, identity first."""
    if original is None:
        return []
    changed = []
    for key in sorted(original, key=lambda k: (k not in IDENTITY, k)):
        if key in FREE or fixed.get(key, _MISSING) == original[key]:
            continue
        try:
            parse_event_data({**fixed, key: original[key]})
        except EventRejected:
            continue  # the original's value is what failed: fixing it is allowed
        changed.append(key)
    return changed


def refusal(changed: list[str]) -> str:
    """Why a resubmission changing ``changed`` is refused, in words."""
    return (f"refused: the fix changes {', '.join(changed)}, which the original sent valid; "
            "a resubmission keeps the original eventId, customer and series (only the fields "
            "that failed validation, and the metadata, may change)")


_MISSING = object()
