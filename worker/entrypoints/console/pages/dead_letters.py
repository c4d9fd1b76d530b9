"""Dead letters: the groups (error code x series x message), one group's entities, discard."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from worker.entrypoints.console.auth import Role, User
from worker.entrypoints.console.state import console_of
from worker.entrypoints.console.web import form_fields, origin, page, render, selection_from
from worker.usecases import queries
from worker.usecases.action_plans import by_ids, parse_ids, plan_action
from worker.usecases.support import DISCARDABLE, discard


@page()
async def dead_letters(request: Request, user: User) -> Response:
    c = console_of(request)
    groups = await run_in_threadpool(queries.dead_letter_groups, c.engine)
    for g in groups:
        g["query"] = _group_query(g)
    return render(request, "dlq.html", user, groups=groups)


def _group_query(group: dict[str, Any]) -> str:
    params = {"code": group.get("error_code") or "", "series": group.get("series_id") or ""}
    if group.get("message") is not None:
        params["message"] = group["message"]
    return urlencode(params)


@page()
async def dead_letter_group(request: Request, user: User) -> Response:
    c = console_of(request)
    selection = selection_from(request.query_params)
    rows = await run_in_threadpool(queries.dead_letters, c.engine, selection, limit=500,
                                   include_rejected=False)
    return render(request, "dlq_group.html", user, rows=rows, selection=selection,
                  query=request.url.query)


@page(Role.OPERATOR)
async def discard_plan(request: Request, user: User) -> Response:
    """The dry run of a discard: exactly which dead entities it would close (at most
    ``MAX_IDS``); the confirmation form carries their ids."""
    c = console_of(request)
    selection = replace(selection_from(request.query_params), states=DISCARDABLE)
    if selection.is_empty():
        return render(request, "error.html", user, status=400, title="Nothing selected",
                      message="choose an entity, a group, a customer or an event")
    plan = await run_in_threadpool(plan_action, selection, c.plans)
    return render(request, "discard_plan.html", user, plan=plan, selection=selection)


@page(Role.OPERATOR)
async def discard_entities(request: Request, user: User) -> Response:
    """The confirmation: close exactly the ids posted, those still dead; nothing else, even
    what matches the same filter and arrived since the dry run."""
    c = console_of(request)
    form = await form_fields(request)
    ids = parse_ids(form.get("ids", ""))
    reason = form.get("reason", "").strip()
    if not reason:
        return render(request, "error.html", user, status=400, title="Not discarded",
                      message="say why (the reason is kept in the audit)")
    results = await run_in_threadpool(lambda: discard(
        by_ids(ids, DISCARDABLE), reason=reason, operator=user.name, deps=c.support,
        origin=origin(user)))
    return render(request, "actions.html", user, title="Discarded", results=results)
