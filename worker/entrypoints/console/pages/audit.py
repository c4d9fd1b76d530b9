"""The operator audit: the page, and its CSV export (streamed, every cell neutralised)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from worker.entrypoints.console.auth import Role, User
from worker.entrypoints.console.state import console_of
from worker.entrypoints.console.web import forbidden, page, parse_when, render
from worker.usecases import queries


@page()
async def audit(request: Request, user: User) -> Response:
    c = console_of(request)
    q = request.query_params
    operator, action = q.get("operator") or None, q.get("action") or None
    since, until = parse_when(q.get("since"), "since"), parse_when(q.get("until"), "until")
    if q.get("format") == "csv":
        if user.role < Role.OPERATOR:
            return forbidden(request, user, "the export needs operator")
        total = await run_in_threadpool(
            lambda: queries.audit_count(c.engine, operator=operator, action=action, since=since,
                                      until=until))
        rows_csv = queries.audit_stream(c.engine, operator=operator, action=action, since=since,
                                      until=until)
        return StreamingResponse(
            iterate_in_threadpool(audit_csv(rows_csv)), media_type="text/csv", headers={
                "content-disposition": 'attachment; filename="coupon-audit.csv"',
                "x-row-count": str(total)})
    rows = await run_in_threadpool(
        lambda: queries.audit_rows(c.engine, operator=operator, action=action, since=since,
                                 until=until))
    return render(request, "audit.html", user, rows=rows, filters=dict(q))


AUDIT_FIELDS = ("id", "at", "action", "operator", "reason", "outcome", "entity_id", "event_id",
                "details")
#: What a spreadsheet reads as the start of a formula (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%")


def spreadsheet_safe(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: one that could start a formula gets a leading
    apostrophe, which spreadsheets display as text and do not evaluate."""
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def audit_csv(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The audit as CSV, a line at a time: a header, then every row, every cell quoted and
    neutralised (``spreadsheet_safe``)."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL)

    def line(cells: Iterable[object]) -> str:
        writer.writerow([spreadsheet_safe(cell) for cell in cells])
        text = out.getvalue()
        out.seek(0)
        out.truncate()
        return text

    yield line(AUDIT_FIELDS)
    for r in rows:
        yield line(json.dumps(r[f]) if f == "details" else r[f] for f in AUDIT_FIELDS)
