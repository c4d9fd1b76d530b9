"""Replays: the dry run, confirming it as a job, the jobs, one job's progress and controls."""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from worker.entrypoints.console.auth import Role, User
from worker.entrypoints.console.state import console_of
from worker.entrypoints.console.web import (
    form_fields,
    not_found,
    origin,
    page,
    parse_number,
    render,
    selection_from,
)
from worker.usecases.action_plans import parse_ids
from worker.usecases.replay_jobs import control_replay_job, plan_replay, start_replay_job


@page(Role.OPERATOR)
async def replay_plan(request: Request, user: User) -> Response:
    """The dry run: exactly which dead entities a replay would send (at most ``MAX_IDS``),
    how many need a read-back first, how many the filter finds already issued."""
    c = console_of(request)
    selection = selection_from(request.query_params)
    if selection.is_empty():
        return render(request, "error.html", user, status=400, title="Nothing selected",
                      message="choose an entity, a group, a customer or an event")
    plan = await run_in_threadpool(plan_replay, selection, c.plans)
    limit = c.settings.rate_limit_per_minute
    return render(request, "replay_plan.html", user, plan=plan, selection=selection,
                  query=request.url.query, velocity=min(c.console.default_velocity_per_min,
                                                        limit or 10**6), rate_limit=limit)


@page(Role.OPERATOR)
async def replay_start(request: Request, user: User) -> Response:
    """The confirmation: a job over exactly the ids the dry run listed."""
    c = console_of(request)
    form = await form_fields(request)
    ids = parse_ids(form.get("ids", ""))
    selection = selection_from(form)
    reason = form.get("reason", "").strip()
    try:
        velocity = parse_number(form.get("velocity", "0"), "velocity")
        job_id = await run_in_threadpool(
            lambda: start_replay_job(ids, selection=selection, reason=reason,
                                     operator=user.name, velocity_per_min=velocity,
                                     deps=c.support, store=c.jobs, plans=c.plans,
                                     max_velocity_per_min=c.settings.rate_limit_per_minute,
                                     origin=origin(user)))
    except ValueError as exc:
        return render(request, "error.html", user, status=400, title="Not started",
                      message=str(exc))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@page()
async def job(request: Request, user: User) -> Response:
    c = console_of(request)
    job_id = int(request.path_params["job_id"])
    found = await run_in_threadpool(c.jobs.get, job_id)
    if found is None:
        return not_found(request, user, f"no replay job {job_id}")
    items = await run_in_threadpool(c.jobs.items, job_id)
    if request.url.path.endswith(".json"):
        return JSONResponse(json.loads(json.dumps(
            {"job": found, "items": items}, default=str)))
    progress = await run_in_threadpool(
        lambda: c.jobs.progress(job_id, now=c.support.clock()))
    done = found["counts"]["done"] + found["counts"]["cancelled"]
    pending = found["counts"]["pending"]
    eta_s = 60.0 * pending / found["velocity_per_min"] if pending else 0.0
    return render(request, "job.html", user, job=found, items=items, done=done,
                  pending=pending, progress=progress, eta_s=eta_s)


@page()
async def jobs(request: Request, user: User) -> Response:
    c = console_of(request)
    rows = await run_in_threadpool(c.jobs.recent, limit=100)
    return render(request, "jobs.html", user, rows=rows)


@page(Role.OPERATOR)
async def job_control(request: Request, user: User) -> Response:
    c = console_of(request)
    job_id = int(request.path_params["job_id"])
    command = request.path_params["command"]
    if command not in ("pause", "resume", "cancel"):
        return not_found(request, user, command)
    form = await form_fields(request)
    await run_in_threadpool(lambda: control_replay_job(
        job_id, command, operator=user.name, reason=form.get("reason", ""), deps=c.support,
        store=c.jobs, origin=origin(user)))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
