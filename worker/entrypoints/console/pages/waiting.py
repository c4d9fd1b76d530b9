"""Waiting: entities waiting for a retry or for an unknown outcome to settle, with "retry now"
and "give up" for operators (``worker.usecases.waiting``)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from worker.adapters.postgres.waiting import KINDS, WaitingReader
from worker.entrypoints.console.auth import Role, User
from worker.entrypoints.console.state import console_of
from worker.entrypoints.console.web import BadInput, origin, page, render
from worker.usecases.action_plans import parse_ids
from worker.usecases.waiting import give_up, retry_now

#: The most rows the page shows; the counts above it cover everything.
SHOWN = 500


@page()
async def waiting(request: Request, user: User) -> Response:
    c = console_of(request)
    kind = request.query_params.get("kind") or None
    if kind is not None and kind not in KINDS:
        raise BadInput(f"kind: {kind[:40]!r} is not one of {', '.join(KINDS)}")
    reader = WaitingReader(c.engine)
    now = c.support.clock()
    rows = await run_in_threadpool(lambda: reader.entities(now=now, kind=kind, limit=SHOWN))
    counts = await run_in_threadpool(reader.counts)
    return render(request, "waiting.html", user, rows=rows, counts=counts, kind=kind,
                  shown=SHOWN)


async def _chosen(request: Request) -> tuple[tuple[int, ...], str]:
    form = await request.form()
    ticked = [v for v in form.getlist("id") if isinstance(v, str)]
    reason = form.get("reason")
    return parse_ids(",".join(ticked)), reason.strip() if isinstance(reason, str) else ""


@page(Role.OPERATOR)
async def waiting_retry(request: Request, user: User) -> Response:
    c = console_of(request)
    ids, reason = await _chosen(request)
    results = await run_in_threadpool(lambda: retry_now(
        ids, operator=user.name, reason=reason, deps=c.support, origin=origin(user)))
    return render(request, "actions.html", user, title="Retry now", results=results,
                  back=("/waiting", "Back to waiting"))


@page(Role.OPERATOR)
async def waiting_give_up(request: Request, user: User) -> Response:
    c = console_of(request)
    ids, reason = await _chosen(request)
    if not reason:
        raise BadInput("say why you give up (the reason becomes the dead letter's)")
    results = await run_in_threadpool(lambda: give_up(
        ids, operator=user.name, reason=reason, deps=c.support, origin=origin(user)))
    return render(request, "actions.html", user, title="Given up", results=results,
                  back=("/dlq", "Back to dead letters"))
