"""CSRF: a random token per session, required on every POST (form field or header)."""

from __future__ import annotations

import hmac
import secrets
from typing import Any

FIELD = "csrf_token"
HEADER = "x-csrf-token"


def token(session: dict[str, Any]) -> str:
    """This session's token, created on first use."""
    current = session.get("csrf")
    if not isinstance(current, str):
        current = secrets.token_urlsafe(32)
        session["csrf"] = current
    return current


def valid(session: dict[str, Any], submitted: str | None) -> bool:
    expected = session.get("csrf")
    return (isinstance(expected, str) and isinstance(submitted, str)
            and hmac.compare_digest(expected.encode(), submitted.encode()))
