"""Capillary's answers read as they really come: tolerant parsing, strict outcomes.

One reading of a bulk-issue answer, whatever its HTTP status:

- Entries speak per series in every status that carries them (a 400 with per-entry results
  as much as a 201). An entry with a coupon is issued, always, whatever its errors say.
- The status decides only for a call without any readable entry (``classify_unanswered``).
- A requested series missing from an answer that has entries is unknown (read back).
- ``totalCount`` / ``failureCount`` that disagree with the entries make every series without
  a coupon entry unknown: the counts do not say which series they disagree about, and a
  read-back settles it, never a guess.
- Configuration and auth codes pause the fleet wherever they appear (an entry, the call-level
  ``errors``, the status): ``ParsedAnswer.outage``.

Parsing is tolerant: the series from ``entityId``, else ``result.seriesId``; entries in any
order, missing, repeated or for series not asked for; errors as objects or strings; codes as
numbers or strings; dates with or without time and offset (a date or a time without offset
is in the organisation's time zone, ``CAPILLARY_TIMEZONE``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

from worker.adapters.capillary.api import EntryOutcome
from worker.domain.events import SERIES_ID_MAX
from worker.domain.model import (
    CONFIGURATION_CODES,
    CONFLICTING_ENTRIES,
    COUNTS_DISAGREE,
    EMPTY_ENTRY,
    MISSING_ENTRY,
    Coupon,
    EntryError,
    Verdict,
)
from worker.domain.text import printable
from worker.domain.verdicts import classify_entry_error, classify_unanswered

#: The ledger's column ranges for numbers taken from an answer (``SERIES_ID_MAX`` for the series
#: id, bigint, numeric(18, 4)): a value beyond them is not stored in its column (None; the raw
#: answer keeps it).
BIGINT_MAX = 2**63 - 1
MAX_DISCOUNT = Decimal("99999999999999.9999")
#: Characters of an error message and of a coupon code kept (four bytes each at most: under
#: PostgreSQL's limit for an index entry).
MAX_MESSAGE_CHARS = 500
MAX_CODE_CHARS = 200
#: Warnings kept per series, and characters of each.
MAX_WARNINGS = 10
MAX_WARNING_CHARS = 300
#: Statuses with which a gateway or Capillary refuses the caller's credentials.
AUTH_STATUSES = frozenset({401, 403, 407})

_LEADING_CODE = re.compile(r"^\s*(\d{3,4})\b[\s:.\-]*(.*)$", re.DOTALL)
_END_OF_DAY = time(23, 59, 59)


def capped(message: str) -> str:
    """Capillary's message as the ledger keeps it: one line, at most ``MAX_MESSAGE_CHARS``.

    A dead entity's message is in an index (the dead-letter groups), and PostgreSQL refuses an
    index entry over about 2.7 kB: a gateway's page of text as the message made the outcome
    unrecordable, and the entity went round its lease again and again.
    """
    return printable(message, limit=MAX_MESSAGE_CHARS)


def parse_timestamp(value: object, tz: tzinfo = UTC, *,
                    end_of_day: bool = False) -> datetime | None:
    """An ISO-8601 timestamp or date as an aware datetime.

    A time without offset is in ``tz`` (the organisation's zone); a date alone is that day's
    midnight in ``tz``, or its last second with ``end_of_day`` (an expiry moment: the coupon is
    valid through that day).
    """
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        return parsed
    date_only = "T" not in text.upper() and " " not in text and ":" not in text
    if date_only and end_of_day:
        parsed = datetime.combine(parsed.date(), _END_OF_DAY)
    return parsed.replace(tzinfo=tz)


def _decimal(value: object) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    # What the ledger's numeric(18, 4) columns store.
    return number if number.is_finite() and abs(number) <= MAX_DISCOUNT else None


def int_or_none(value: object, limit: int | None = None) -> int | None:
    """An integer (a JSON number or its text, ``"709"``, ``709.0``), or None; with ``limit``,
    None as well outside ±limit (a column's range)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if limit is None or -limit <= number <= limit else None


def _code(code: str) -> str:
    """A coupon code as the ledger keeps it (the raw answer keeps it whole).

    Codes are short; one longer than ``MAX_CODE_CHARS`` (a broken answer) is cut and given a
    digest of the whole, so that it stays unique and the same code is recorded the same way
    twice: the unique index on it refuses entries over about 2.7 kB.
    """
    if len(code) <= MAX_CODE_CHARS:
        return code
    digest = hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{code[:MAX_CODE_CHARS - 18]}…~{digest}"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def coupon_code(result: object) -> str | None:
    """The coupon code of a ``result`` object, when it has one (a string or a number)."""
    if not isinstance(result, dict):
        return None
    code = result.get("code")
    if isinstance(code, bool) or not isinstance(code, (str, int)):
        return None
    text = str(code).strip()
    return text or None


def parse_coupon(result: dict[str, Any], series_id: int, tz: tzinfo = UTC) -> Coupon:
    """A coupon from a bulk-issue ``result`` object (or a read-back row)."""
    return Coupon(
        code=_code(coupon_code(result) or str(result.get("code"))),
        series_id=int_or_none(result.get("seriesId"), SERIES_ID_MAX) or series_id,
        capillary_id=int_or_none(result.get("id"), BIGINT_MAX),
        description=_text(result.get("description")),
        discount_code=_text(result.get("discountCode")),
        discount_type=_text(result.get("discountType")),
        discount_value=_decimal(result.get("discountValue")),
        discount_upto=_decimal(result.get("discountUpto")),
        discount_on=_text(result.get("discountOn")),
        valid_till=parse_timestamp(result.get("validTill"), tz),
        valid_till_date_time=parse_timestamp(result.get("validTillDateTime"), tz,
                                             end_of_day=True),
        raw=result,
    )


def parse_error(item: object, status: int) -> EntryError:
    """One error of an ``errors`` list: an object ``{code, message}`` or a string (which may
    start with its code, ``"709: user already has a coupon"``)."""
    code: int | None = None
    if isinstance(item, dict):
        code = int_or_none(item.get("code"))
        message = str(item.get("message") or "no error message")
    else:
        message = item if isinstance(item, str) else json.dumps(item, default=str)
        match = _LEADING_CODE.match(message)
        if match:
            code = int(match.group(1))
            message = match.group(2) or message
    message = capped(message) or "no error message"
    verdict = classify_entry_error(code, message)
    return EntryError(str(code) if code is not None else f"http_{status}", message, verdict)


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and not value)


def parse_errors(value: object, status: int) -> list[EntryError]:
    """Every error of an ``errors`` field: a list, a single object or string, or nothing."""
    if _blank(value):
        return []
    items = value if isinstance(value, list) else [value]
    return [parse_error(item, status) for item in items if not _blank(item)]


def parse_warnings(value: object) -> list[str]:
    """A ``warnings`` field as text, whatever its shape."""
    if _blank(value):
        return []
    items = value if isinstance(value, list) else [value]
    warnings = []
    for item in items[:MAX_WARNINGS]:
        if isinstance(item, dict):
            code, message = item.get("code"), item.get("message")
            text = " ".join(str(p) for p in (code, message) if p not in (None, ""))
            text = text or json.dumps(item, default=str, sort_keys=True)
        else:
            text = str(item)
        if text:
            warnings.append(printable(text, limit=MAX_WARNING_CHARS))
    return warnings


#: Which of an entry's errors speaks for it: a configuration error pauses, an admitted
#: "may have issued" is unknown, then the first of the rest.
_ERROR_PRECEDENCE = {Verdict.OUTAGE: 0, Verdict.AMBIGUOUS: 1}


def _speaking_error(errors: list[EntryError]) -> EntryError:
    return min(errors, key=lambda e: _ERROR_PRECEDENCE.get(e.verdict, 2))


@dataclass
class _Seen:
    """What the entries of one answer say about one series."""

    coupons: list[Coupon] = field(default_factory=list)
    errors: list[list[EntryError]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    entries: int = 0


@dataclass(frozen=True)
class ParsedAnswer:
    """A bulk-issue answer, read: one outcome per requested series."""

    entries: dict[int, EntryOutcome]
    #: No entry of the answer could be read: the status (and the call-level errors) decided.
    unreadable: bool
    #: A configuration or auth error anywhere in the answer: the fleet pauses.
    outage: EntryError | None = None


def _series_of(row: dict[str, Any], requested: set[int]) -> int | None:
    """The series an entry speaks for: ``entityId``, else ``result.seriesId``."""
    entity = int_or_none(row.get("entityId"))
    if entity in requested:
        return entity
    result = row.get("result")
    fallback = int_or_none(result.get("seriesId")) if isinstance(result, dict) else None
    return fallback if fallback in requested else None


def _outcome(series_id: int, seen: _Seen) -> EntryOutcome:
    warnings = list(dict.fromkeys(seen.warnings))
    if seen.coupons:
        first = seen.coupons[0]
        others = sorted({c.code for c in seen.coupons[1:]} - {first.code})
        if others:
            warnings.append(f"the answer carried more coupons for this series: "
                            f"{', '.join(others)}")
        if any(seen.errors):
            warnings.append("the entry carried a coupon with errors: "
                            + "; ".join(f"{e.code} {e.message}"
                                        for errs in seen.errors for e in errs))
        kept = tuple(warnings[:MAX_WARNINGS])
        # Recorded with the coupon: shown by ``events show`` and the console.
        return EntryOutcome(series_id, Verdict.ISSUED, coupon=replace(first, warnings=kept),
                            warnings=kept)
    said = [_speaking_error(errs) if errs else None for errs in seen.errors]
    if any(e is None for e in said) or not said:
        # An entry with neither a coupon nor an error does not say "not issued".
        error = EntryError(EMPTY_ENTRY, "entry has neither a coupon nor an error",
                           Verdict.AMBIGUOUS)
    else:
        errors = [e for e in said if e is not None]
        verdicts = {e.verdict for e in errors}
        error = _speaking_error(errors)
        if len(verdicts) > 1 and error.verdict is not Verdict.OUTAGE:
            error = EntryError(CONFLICTING_ENTRIES, capped(
                "repeated entries disagree: " + "; ".join(f"{e.code} {e.message}"
                                                         for e in errors)), Verdict.AMBIGUOUS)
    return EntryOutcome(series_id, error.verdict, error=error,
                        warnings=tuple(warnings[:MAX_WARNINGS]))


def _counts_disagree(body: dict[str, Any], requested: int,
                     entries: dict[int, EntryOutcome]) -> str | None:
    """Why ``totalCount`` / ``failureCount`` disagree with the entries, or None."""
    failed = sum(1 for e in entries.values()
                 if e.verdict is not Verdict.ISSUED and e.error is not None
                 and e.error.code not in (MISSING_ENTRY, EMPTY_ENTRY))
    issued = sum(1 for e in entries.values() if e.verdict is Verdict.ISSUED)
    reasons = []
    if "totalCount" in body and body["totalCount"] is not None:
        total = int_or_none(body["totalCount"])
        if total != requested:
            reasons.append(f"totalCount {body['totalCount']!r} for {requested} series asked")
    if "failureCount" in body and body["failureCount"] is not None:
        failures = int_or_none(body["failureCount"])
        if failures is None or not failed <= failures <= requested - issued:
            reasons.append(f"failureCount {body['failureCount']!r} with {failed} refused and "
                           f"{issued} issued entries")
    return "; ".join(reasons) or None


def _call_level_outage(status: int, body: object) -> EntryError | None:
    if status in AUTH_STATUSES:
        return EntryError(f"http_{status}", call_level_message(body) or f"HTTP {status}",
                          Verdict.OUTAGE)
    errors = parse_errors(body.get("errors"), status) if isinstance(body, dict) else []
    found = next((e for e in errors
                  if int_or_none(e.code) in CONFIGURATION_CODES | AUTH_STATUSES), None)
    return None if found is None else EntryError(found.code, found.message, Verdict.OUTAGE)


def call_level_message(body: object) -> str | None:
    """The first call-level error message of an answer, if it has one."""
    errors = parse_errors(body.get("errors"), 0) if isinstance(body, dict) else []
    return errors[0].message if errors else None


def parse_bulk_answer(series_ids: list[int], status: int, body: object,
                      tz: tzinfo = UTC) -> ParsedAnswer:
    """Per-series outcomes from a bulk-issue answer of any status (see the module's rules)."""
    requested = set(series_ids)
    rows = body.get("response") if isinstance(body, dict) else None
    seen: dict[int, _Seen] = {}
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        series_id = _series_of(row, requested)
        if series_id is None:
            continue
        item = seen.setdefault(series_id, _Seen())
        item.entries += 1
        result = row.get("result")
        if coupon_code(result) is not None:
            assert isinstance(result, dict)
            item.coupons.append(parse_coupon(result, series_id, tz))
        item.errors.append(parse_errors(row.get("errors"), status))
        item.warnings.extend(parse_warnings(row.get("warnings")))
    outage = _call_level_outage(status, body)
    if not seen:
        # No entry speaks for any series asked for (an error body, an empty or foreign list):
        # the status decides. A configuration code in the call-level errors pauses the fleet
        # (``outage``); it stands for the series too, unless the status leaves the outcome
        # unknown (a 5xx, a 2xx): then they are read back before anything is sent again.
        verdict = classify_unanswered(status)
        if outage is not None and verdict is not Verdict.AMBIGUOUS:
            error = outage
        else:
            error = EntryError(outage.code if outage else f"http_{status}",
                               (outage.message if outage else call_level_message(body))
                               or f"HTTP {status}", verdict)
        return ParsedAnswer({s: EntryOutcome(s, error.verdict, error=error) for s in series_ids},
                            unreadable=True, outage=outage)
    entries = {s: _outcome(s, item) for s, item in seen.items()}
    for series_id in series_ids:
        if series_id not in entries:
            entries[series_id] = EntryOutcome(
                series_id, Verdict.AMBIGUOUS,
                error=EntryError(MISSING_ENTRY, "answer has no entry for this series",
                                 Verdict.AMBIGUOUS))
    outage = outage or next((e.error for e in entries.values()
                             if e.error is not None and e.verdict is Verdict.OUTAGE), None)
    disagreement = _counts_disagree(body, len(requested), entries) \
        if isinstance(body, dict) else None
    if disagreement:
        for series_id, entry in entries.items():
            if entry.verdict is Verdict.ISSUED or entry.error is None:
                continue
            said = f" (the entry said {entry.error.code} {entry.error.message})" \
                if entry.error.code not in (MISSING_ENTRY, EMPTY_ENTRY) else ""
            entries[series_id] = EntryOutcome(
                series_id, Verdict.AMBIGUOUS, warnings=entry.warnings,
                error=EntryError(COUNTS_DISAGREE, capped(
                    f"the answer's counts disagree with its entries: {disagreement}{said}"),
                    Verdict.AMBIGUOUS))
    return ParsedAnswer({s: entries[s] for s in series_ids}, unreadable=False, outage=outage)
