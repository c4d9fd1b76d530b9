"""Timestamps as people read them: "3 min ago", with the exact moment on hover.

Every moment on a page goes through ``moment``: a ``<time>`` element whose ``datetime`` is the
exact UTC instant (seconds, no microseconds), whose text is relative to now (or, past a day,
the date and time in the console's one time zone, ``COUPONS_CONSOLE_TIMEZONE``), and whose
``title`` (the hover) is the exact moment in that zone and in UTC. Plain text: no script.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

from markupsafe import Markup, escape

#: Past this, a relative time ("26 h ago") reads worse than the date.
RELATIVE_FOR_S = 24 * 3600


def as_datetime(value: object) -> datetime | None:
    """A timezone-aware datetime from a datetime or an ISO-8601 string; None otherwise."""
    if isinstance(value, datetime):
        found = value
    elif isinstance(value, str) and value:
        try:
            found = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return found if found.tzinfo else found.replace(tzinfo=UTC)


def relative(at: datetime, now: datetime) -> str:
    """``at`` from ``now``'s point of view: "just now", "3 min ago", "in 2 h"."""
    seconds = (now - at).total_seconds()
    ahead, seconds = seconds < 0, abs(seconds)
    if seconds < 5:
        return "just now"
    if seconds < 60:
        amount = f"{int(seconds)} s"
    elif seconds < 3600:
        amount = f"{int(seconds // 60)} min"
    elif seconds < 86400:
        amount = f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    else:
        amount = f"{int(seconds // 86400)} d"
    return f"in {amount}" if ahead else f"{amount} ago"


def exact(at: datetime, zone: tzinfo) -> str:
    """The exact moment, to the second, in ``zone`` (and in UTC when ``zone`` is not UTC)."""
    local = at.astimezone(zone)
    text = f"{local:%Y-%m-%d %H:%M:%S} {local.tzname()}"
    if local.utcoffset() != at.astimezone(UTC).utcoffset() or local.tzname() != "UTC":
        text += f" ({at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)"
    return text


def moment(value: object, *, now: datetime, zone: tzinfo, empty: str = "") -> Markup:
    """A ``<time>`` element for ``value`` (a datetime or an ISO string); ``empty`` if none."""
    at = as_datetime(value)
    if at is None:
        return escape(value if isinstance(value, str) and value else empty)
    at = at.replace(microsecond=0)
    utc = at.astimezone(UTC)
    if abs((now - at).total_seconds()) < RELATIVE_FOR_S:
        shown = relative(at, now)
    else:
        local = at.astimezone(zone)
        shown = f"{local:%Y-%m-%d %H:%M} {local.tzname()}"
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        utc.strftime("%Y-%m-%dT%H:%M:%SZ"), exact(at, zone), shown)
