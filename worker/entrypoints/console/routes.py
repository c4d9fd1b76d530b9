"""The console's pages. Each reads through ``worker.usecases.queries`` or acts through the support
services (``worker.usecases.support``, ``worker.usecases.replay_jobs``), exactly as the CLI does; no
SQL here.

Every page needs a login; every POST needs the session's CSRF token and a role above viewer;
every action is audited with the logged-in identity.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from worker.adapters.postgres.support import Selection
from worker.adapters.rabbitmq.backlog import queue_backlogs
from worker.adapters.rabbitmq.names import split_worker
from worker.domain.errors import NotFound, WorkerError
from worker.domain.model import describe_error
from worker.domain.text import mask_code, printable
from worker.entrypoints.console import csrf, sessions
from worker.entrypoints.console.app import Console
from worker.entrypoints.console.auth import Role, User
from worker.entrypoints.console.proxies import client_address
from worker.usecases import queries
from worker.usecases.issue import utcnow
from worker.usecases.replay_jobs import control_replay_job, plan_replay, start_replay_job
from worker.usecases.support import discard, resubmit_rejected

log = logging.getLogger("worker.console")

Handler = Callable[[Request, User], Awaitable[Response]]


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def current_user(request: Request) -> User | None:
    """The logged-in user (session) or the trusted proxy's (header), with today's role."""
    c = _console(request)
    header = c.console.proxy_user_header
    if header and _client(request) in c.console.proxies():
        name = request.headers.get(header)
        if name:
            known = c.users.get(name)
            return known or User(name, Role.parse(c.console.proxy_default_role))
    name = request.session.get("user")
    if not isinstance(name, str):
        return None
    # The users file decides the role on every request: a removed user is logged out.
    return c.users.get(name)


def _origin(user: User) -> dict[str, str]:
    return {"via": "console", "role": user.role.name.lower()}


def task_id_of(worker: str | None) -> str | None:
    """The Celery task id a ledger ``worker`` column carries (``host:pid/task:<id>``)."""
    return split_worker(worker)[1] if worker else None


def render(request: Request, template: str, user: User | None, status: int = 200,
           **context: Any) -> Response:
    c = _console(request)
    return c.templates.TemplateResponse(
        request, template,
        {"user": user, "csrf_token": csrf.token(request.session),
         "flower_url": c.console.flower_url, "task_id_of": task_id_of,
         "describe_error": describe_error,
         # Viewers see coupon codes masked (a code is redeemable by whoever reads it); they
         # may still search by a full code a customer reads out.
         "shown_code": (lambda code: code) if _sees_codes(user) else mask_code,
         "redact": (lambda text, _entity: text) if _sees_codes(user) else _redact_codes,
         **context},
        status_code=status)


def _sees_codes(user: User | None) -> bool:
    return user is not None and user.role >= Role.OPERATOR


def _redact_codes(text: str | None, entity: dict[str, Any]) -> str | None:
    """``text`` (a history message, a dead reason) with the entity's coupon codes masked."""
    if not text:
        return text
    for coupon in entity.get("coupons") or []:
        code = coupon.get("code")
        if code:
            text = text.replace(code, mask_code(code) or "")
    return text


def forbidden(request: Request, user: User | None, why: str) -> Response:
    return render(request, "error.html", user, status=403, title="Forbidden", message=why)


def page(role: Role = Role.VIEWER) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Login for every page; on POST, the role and the CSRF token too."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            user = current_user(request)
            if user is None:
                if request.method == "GET":
                    target = request.url.path + (f"?{request.url.query}" if request.url.query
                                                 else "")
                    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
                return forbidden(request, None, "log in first")
            if user.role < role:
                return forbidden(request, user,
                                 f"{user.name} is a {user.role.name.lower()}; this needs "
                                 f"{role.name.lower()}")
            if request.method == "POST":
                form = await request.form()
                submitted = request.headers.get(csrf.HEADER) or form.get(csrf.FIELD)
                if not csrf.valid(request.session,
                                  submitted if isinstance(submitted, str) else None):
                    return forbidden(request, user, "missing or wrong CSRF token")
            try:
                return await handler(request, user)
            except BadInput as exc:
                # A value that cannot be read is refused, never dropped: a dropped filter
                # would widen what a page lists, or what an action touches.
                return render(request, "error.html", user, status=400, title="Bad request",
                              message=str(exc))

        endpoint.__name__ = handler.__name__
        return endpoint

    return wrap


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


class BadInput(ValueError):
    """A query or form value that cannot be read: the request answers 400 with why."""


def _when(value: str | None, name: str = "date") -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadInput(f"{name}: {value[:60]!r} is not a date and time (ISO-8601, e.g. "
                       "2026-12-07T10:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=utcnow().tzinfo)


def _number(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"{name}: {value[:60]!r} is not a whole number") from None


def _audit(c: Console, user: User, action: str, outcome: str, reason: str = "",
           **details: Any) -> None:
    with c.support.uow() as uow:
        uow.ledger.audit(action=action, operator=user.name, reason=reason, outcome=outcome,
                         now=c.support.clock(), details={**_origin(user), **details})
        uow.commit()


# -- login ---------------------------------------------------------------------------------


async def login(request: Request) -> Response:
    c = _console(request)
    nxt = request.query_params.get("next", "/")
    if not nxt.startswith("/") or nxt.startswith("//"):
        nxt = "/"
    if request.method == "GET":
        return render(request, "login.html", None, next=nxt, error=None)
    form = await _form(request)
    if not csrf.valid(request.session, form.get(csrf.FIELD)):
        return render(request, "login.html", None, status=403, next=nxt,
                      error="The form expired; try again.")
    name, password = form.get("username", ""), form.get("password", "")
    client = client_address(request)
    admission = await run_in_threadpool(c.limits.admit, name, client)
    if not admission.allowed:
        await run_in_threadpool(_audit_login, c, name, "blocked: too many failed logins",
                                client)
        wait_s = max(1, math.ceil(admission.retry_after_s))
        response = render(request, "login.html", None, status=429, next=nxt,
                          error=f"Too many failed logins; try again in {wait_s} s.")
        response.headers["retry-after"] = str(wait_s)
        return response
    user = await run_in_threadpool(c.users.authenticate, name, password)
    if user is None:
        await run_in_threadpool(_audit_login, c, name, "refused", client)
        return render(request, "login.html", None, status=401, next=nxt,
                      error="Wrong user name or password.")
    await run_in_threadpool(c.limits.succeeded, name, client)
    await sessions.log_in(request, c.sessions, user, client)
    await run_in_threadpool(_audit_login, c, name, "logged in", client)
    return RedirectResponse(nxt, status_code=303)


def _audit_login(c: Console, name: str, outcome: str, client: str) -> None:
    with c.support.uow() as uow:
        # Escaped, not cut raw: a NUL or a lone surrogate in a typed name would make
        # PostgreSQL refuse the row, and the attempt would go unaudited.
        uow.ledger.audit(action="console_login", operator=printable(name, limit=200),
                         reason="",
                         outcome=outcome, now=c.support.clock(),
                         details={"via": "console", "client": client})
        uow.commit()


async def logout(request: Request) -> Response:
    form = await _form(request)
    if csrf.valid(request.session, form.get(csrf.FIELD)):
        await sessions.log_out(request, _console(request).sessions)
    return RedirectResponse("/login", status_code=303)


# -- reading -------------------------------------------------------------------------------


@page()
async def overview(request: Request, user: User) -> Response:
    c = _console(request)
    now = c.support.clock()
    counts = await run_in_threadpool(queries.overview_counts, c.engine, now)
    per_minute = await run_in_threadpool(queries.issued_per_minute, c.engine, now)
    circuits = await run_in_threadpool(queries.circuit_states, c.engine)
    jobs = await run_in_threadpool(c.jobs.recent, limit=10)
    calls = await run_in_threadpool(queries.calls_last_minute, c.engine, now)
    backlogs = await run_in_threadpool(queue_backlogs, c.settings)
    return render(request, "overview.html", user, counts=counts, circuits=circuits,
                  chart=_sparkline(per_minute), per_minute_total=sum(per_minute), jobs=jobs,
                  calls_last_minute=calls, rate_limit=c.settings.rate_limit_per_minute,
                  backlogs=backlogs)


def _sparkline(values: list[int], width: int = 360, height: int = 60) -> str:
    """An inline SVG polyline of ``values`` (no script, no library)."""
    top = max(values) or 1
    step = width / max(1, len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - (v / top) * (height - 4) - 2:.1f}"
                      for i, v in enumerate(values))
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" '
            f'aria-label="issued per minute, last hour, peak {top}">'
            f'<polyline fill="none" stroke="#2a6" stroke-width="2" points="{points}"/></svg>')


@page()
async def customer(request: Request, user: User) -> Response:
    c = _console(request)
    query = request.query_params.get("q", "").strip()
    story = await run_in_threadpool(queries.customer_story, c.engine, query) if query else None
    return render(request, "customer.html", user, query=query, story=story)


@page()
async def entity(request: Request, user: User) -> Response:
    c = _console(request)

    def load() -> dict[str, Any]:
        with c.engine.connect() as conn:
            return queries.entity_story(conn, int(request.path_params["entity_id"]))

    try:
        story = await run_in_threadpool(load)
    except NotFound as exc:
        return render(request, "error.html", user, status=404, title="Not found",
                      message=str(exc))
    return render(request, "entity.html", user, e=story)


@page()
async def dead_letters(request: Request, user: User) -> Response:
    c = _console(request)
    groups = await run_in_threadpool(queries.dead_letter_groups, c.engine)
    for g in groups:
        g["query"] = _group_query(g)
    return render(request, "dlq.html", user, groups=groups)


def _group_query(group: dict[str, Any]) -> str:
    params = {"code": group.get("error_code") or "", "series": group.get("series_id") or ""}
    if group.get("message") is not None:
        params["message"] = group["message"]
    return urlencode(params)


def _selection_from(params: Any) -> Selection:
    """A selection from query or form fields: one entity, a group, a customer or an event."""
    entity_id = params.get("entity_id")
    if entity_id:
        return Selection(entity_ids=(_number(entity_id, "entity_id"),))
    series = params.get("series")
    return Selection(error_code=params.get("code") or None,
                     series_id=_number(series, "series") if series else None,
                     error_message=params.get("message"),
                     customer=params.get("customer") or None,
                     event_id=params.get("event") or None,
                     since=_when(params.get("since"), "since"),
                     until=_when(params.get("until"), "until"))


@page()
async def dead_letter_group(request: Request, user: User) -> Response:
    c = _console(request)
    selection = _selection_from(request.query_params)
    rows = await run_in_threadpool(queries.dead_letters, c.engine, selection, limit=500,
                                   include_rejected=False)
    return render(request, "dlq_group.html", user, rows=rows, selection=selection,
                  query=request.url.query)


@page()
async def rejected_list(request: Request, user: User) -> Response:
    c = _console(request)
    rows = await run_in_threadpool(queries.rejected_list, c.engine, limit=200)
    return render(request, "rejected.html", user, rows=rows)


@page()
async def rejected_one(request: Request, user: User) -> Response:
    c = _console(request)
    try:
        story = await run_in_threadpool(queries.rejected_story, c.engine,
                                        int(request.path_params["rejected_id"]))
    except NotFound as exc:
        return render(request, "error.html", user, status=404, title="Not found",
                      message=str(exc))
    raw = story["raw"].decode("utf-8", errors="replace")
    return render(request, "rejected_one.html", user, r=story, raw=raw, result=None)


@page()
async def audit(request: Request, user: User) -> Response:
    c = _console(request)
    q = request.query_params
    operator, action = q.get("operator") or None, q.get("action") or None
    since, until = _when(q.get("since"), "since"), _when(q.get("until"), "until")
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


# -- replay --------------------------------------------------------------------------------


@page(Role.OPERATOR)
async def replay_plan(request: Request, user: User) -> Response:
    """The dry run: how many will be sent, read back first, already issued."""
    c = _console(request)
    if user.role < Role.OPERATOR:
        return forbidden(request, user, "a dry run needs operator")
    selection = _selection_from(request.query_params)
    if selection.is_empty():
        return render(request, "error.html", user, status=400, title="Nothing selected",
                      message="choose an entity, a group, a customer or an event")
    plan = await run_in_threadpool(plan_replay, selection, c.support)
    limit = c.settings.rate_limit_per_minute
    return render(request, "replay_plan.html", user, plan=plan, selection=selection,
                  query=request.url.query, velocity=min(c.console.default_velocity_per_min,
                                                        limit or 10**6), rate_limit=limit)


@page(Role.OPERATOR)
async def replay_start(request: Request, user: User) -> Response:
    c = _console(request)
    form = await _form(request)
    selection = _selection_from(form)
    reason = form.get("reason", "").strip()
    try:
        velocity = _number(form.get("velocity", "0"), "velocity")
        if selection.is_empty():
            raise ValueError("nothing selected")
        job_id = await run_in_threadpool(
            lambda: start_replay_job(selection, reason=reason, operator=user.name,
                                     velocity_per_min=velocity, deps=c.support, store=c.jobs,
                                     max_velocity_per_min=c.settings.rate_limit_per_minute,
                                     origin=_origin(user)))
    except ValueError as exc:
        return render(request, "error.html", user, status=400, title="Not started",
                      message=str(exc))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@page()
async def job(request: Request, user: User) -> Response:
    c = _console(request)
    job_id = int(request.path_params["job_id"])
    found = await run_in_threadpool(c.jobs.get, job_id)
    if found is None:
        return render(request, "error.html", user, status=404, title="Not found",
                      message=f"no replay job {job_id}")
    items = await run_in_threadpool(c.jobs.items, job_id)
    if request.url.path.endswith(".json"):
        return JSONResponse(json.loads(json.dumps(
            {"job": found, "items": items}, default=str)))
    done = found["counts"]["done"] + found["counts"]["cancelled"]
    return render(request, "job.html", user, job=found, items=items, done=done)


@page()
async def jobs(request: Request, user: User) -> Response:
    c = _console(request)
    rows = await run_in_threadpool(c.jobs.recent, limit=100)
    return render(request, "jobs.html", user, rows=rows)


@page(Role.OPERATOR)
async def job_control(request: Request, user: User) -> Response:
    c = _console(request)
    job_id = int(request.path_params["job_id"])
    command = request.path_params["command"]
    if command not in ("pause", "resume", "cancel"):
        return render(request, "error.html", user, status=404, title="Not found",
                      message=command)
    form = await _form(request)
    await run_in_threadpool(lambda: control_replay_job(
        job_id, command, operator=user.name, reason=form.get("reason", ""), deps=c.support,
        store=c.jobs, origin=_origin(user)))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


# -- discard and resubmit ------------------------------------------------------------------


@page(Role.OPERATOR)
async def discard_entities(request: Request, user: User) -> Response:
    c = _console(request)
    form = await _form(request)
    selection = _selection_from(form)
    reason = form.get("reason", "").strip()
    if selection.is_empty() or not reason:
        return render(request, "error.html", user, status=400, title="Not discarded",
                      message="choose what to discard and say why")
    results = await run_in_threadpool(lambda: discard(
        selection, reason=reason, operator=user.name, deps=c.support, origin=_origin(user)))
    return render(request, "actions.html", user, title="Discarded", results=results)


@page(Role.OPERATOR)
async def rejected_resubmit(request: Request, user: User) -> Response:
    c = _console(request)
    rejected_id = int(request.path_params["rejected_id"])
    form = await _form(request)
    payload = form.get("payload", "").encode("utf-8")
    reason = form.get("reason", "").strip()
    try:
        result = await run_in_threadpool(lambda: resubmit_rejected(
            rejected_id, payload, reason=reason, operator=user.name,
            os_user=f"console:{user.name}", deps=c.support, submitter=c.submitter,
            max_bytes=c.settings.max_event_bytes, dry_run=form.get("dry_run") == "1"))
    except (ValueError, NotFound, WorkerError) as exc:
        return render(request, "error.html", user, status=400, title="Not resubmitted",
                      message=str(exc))
    story = await run_in_threadpool(queries.rejected_story, c.engine, rejected_id)
    return render(request, "rejected_one.html", user, r=story, result=result,
                  raw=payload.decode("utf-8", errors="replace"))


_STYLE_SHEET = Path(__file__).parent / "static" / "console.css"


async def style_sheet(request: Request) -> Response:
    """The console's style sheet: public (the login page uses it), cached for an hour."""
    return Response(_STYLE_SHEET.read_bytes(), media_type="text/css",
                    headers={"cache-control": "public, max-age=3600"})


ROUTES = [
    Route("/static/console.css", style_sheet),
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/", overview),
    Route("/customer", customer),
    Route("/entities/{entity_id:int}", entity),
    Route("/dlq", dead_letters),
    Route("/dlq/group", dead_letter_group),
    Route("/dlq/discard", discard_entities, methods=["POST"]),
    Route("/replay/plan", replay_plan),
    Route("/replay/start", replay_start, methods=["POST"]),
    Route("/jobs", jobs),
    Route("/jobs/{job_id:int}", job),
    Route("/jobs/{job_id:int}.json", job),
    Route("/jobs/{job_id:int}/{command}", job_control, methods=["POST"]),
    Route("/rejected", rejected_list),
    Route("/rejected/{rejected_id:int}", rejected_one),
    Route("/rejected/{rejected_id:int}/resubmit", rejected_resubmit, methods=["POST"]),
    Route("/audit", audit),
]
