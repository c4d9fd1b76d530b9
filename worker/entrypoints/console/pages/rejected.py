"""Rejected messages: the list, one message as received, resubmitting it fixed."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from worker.domain.errors import NotFound, WorkerError
from worker.entrypoints.console.auth import Role, User
from worker.entrypoints.console.state import console_of
from worker.entrypoints.console.web import form_fields, not_found, page, render
from worker.usecases import queries
from worker.usecases.support import resubmit_rejected


@page()
async def rejected_list(request: Request, user: User) -> Response:
    c = console_of(request)
    rows = await run_in_threadpool(queries.rejected_list, c.engine, limit=200)
    return render(request, "rejected.html", user, rows=rows)


@page()
async def rejected_one(request: Request, user: User) -> Response:
    c = console_of(request)
    try:
        story = await run_in_threadpool(queries.rejected_story, c.engine,
                                        int(request.path_params["rejected_id"]))
    except NotFound as exc:
        return not_found(request, user, str(exc))
    raw = story["raw"].decode("utf-8", errors="replace")
    return render(request, "rejected_one.html", user, r=story, raw=raw, result=None)


@page(Role.OPERATOR)
async def rejected_resubmit(request: Request, user: User) -> Response:
    c = console_of(request)
    rejected_id = int(request.path_params["rejected_id"])
    form = await form_fields(request)
    payload = form.get("payload", "").encode("utf-8")
    reason = form.get("reason", "").strip()
    try:
        result = await run_in_threadpool(lambda: resubmit_rejected(
            rejected_id, payload, reason=reason, operator=user.name,
            os_user=f"console:{user.name}", deps=c.support, submitter=c.submitter,
            max_bytes=c.settings.max_event_bytes, dry_run=form.get("dry_run") == "1",
            resend=form.get("resend") == "1"))
    except (ValueError, NotFound, WorkerError) as exc:
        return render(request, "error.html", user, status=400, title="Not resubmitted",
                      message=str(exc))
    story = await run_in_threadpool(queries.rejected_story, c.engine, rejected_id)
    return render(request, "rejected_one.html", user, r=story, result=result,
                  raw=payload.decode("utf-8", errors="replace"))
