"""Text from the outside made safe to store, log and show.

Event ids, reasons quoting a sender's keys, Capillary's messages and raw payloads all reach
PostgreSQL text columns, log lines and terminals. PostgreSQL refuses NUL and lone surrogates
(the rejection that should have kept the message would fail too); a newline forges a log line;
an escape sequence or a bidi override rewrites what an operator sees. ``printable`` turns every
such character into a visible escape (``\\x1b``, ``\\u202e``) and keeps the rest as it is, so
the text stays readable and exact enough to act on.
"""

from __future__ import annotations

import re

ELLIPSIS = "…"
# Surrogates are never valid on their own in text that leaves the process: PostgreSQL, UTF-8
# streams and most JSON parsers refuse them.
_SURROGATE = re.compile("[\ud800-\udfff]")
# What PostgreSQL refuses in text and jsonb: NUL, and those surrogates.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, *, limit: int | None = None, keep: str = "") -> str:
    """``text`` with every non-printable character escaped, cut to ``limit`` characters.

    Non-printable in Python's sense: control characters (NUL, ESC, newline, C1 controls),
    format characters (bidi overrides), separators other than the space, lone surrogates.
    Characters in ``keep`` (e.g. a newline in a multi-line message) are left alone.
    """
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in text)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + ELLIPSIS
    return text


def storable(text: str) -> str:
    """``text`` as PostgreSQL stores it: NUL and lone surrogates escaped, the rest kept as is."""
    return _UNSTORABLE.sub(lambda found: _escape(found.group()), text)


def storable_json(value: object) -> object:
    """Decoded JSON with every string and key made ``storable`` (text and jsonb refuse both)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(k) if isinstance(k, str) else k: storable_json(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [storable_json(v) for v in value]
    return value


def first_lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text``, if any."""
    if text.isascii():
        return None
    found = _SURROGATE.search(text)
    return found.group() if found else None


def codepoint(ch: str) -> str:
    """``U+0000``: how a character is named in a reason."""
    return f"U+{ord(ch):04X}"


#: How many trailing characters of a coupon code a masked code keeps: enough for a person to
#: match it against the code a customer reads out, too few to redeem it.
CODE_VISIBLE_CHARS = 4


def mask_code(code: str | None) -> str | None:
    """A coupon code for logs and viewers: all but its last characters hidden (``****3F2A``).
    Codes are bearer values: whoever reads one can redeem it."""
    if code is None:
        return None
    visible = code[-CODE_VISIBLE_CHARS:] if len(code) > 2 * CODE_VISIBLE_CHARS else ""
    return "****" + visible
