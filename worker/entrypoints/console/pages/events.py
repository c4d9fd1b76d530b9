"""Reading: the overview, a customer's (or a code's, a request id's) story, one entity."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from worker.domain.errors import NotFound
from worker.entrypoints.console.auth import User
from worker.entrypoints.console.state import console_of
from worker.entrypoints.console.web import not_found, page, render
from worker.usecases import queries


@page()
async def overview(request: Request, user: User) -> Response:
    c = console_of(request)
    now = c.support.clock()
    counts = await run_in_threadpool(queries.overview_counts, c.engine, now)
    per_minute = await run_in_threadpool(queries.issued_per_minute, c.engine, now)
    circuits = await run_in_threadpool(queries.circuit_states, c.engine)
    jobs = await run_in_threadpool(c.jobs.recent, limit=10)
    calls = await run_in_threadpool(queries.calls_last_minute, c.engine, now)
    backlogs = await run_in_threadpool(c.backlogs.read)
    return render(request, "overview.html", user, counts=counts, circuits=circuits,
                  chart=sparkline(per_minute), per_minute_total=sum(per_minute), jobs=jobs,
                  calls_last_minute=calls, rate_limit=c.settings.rate_limit_per_minute,
                  backlogs=backlogs)


def sparkline(values: list[int], width: int = 360, height: int = 60) -> str:
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
    c = console_of(request)
    query = request.query_params.get("q", "").strip()
    story = await run_in_threadpool(queries.customer_story, c.engine, query) if query else None
    return render(request, "customer.html", user, query=query, story=story)


@page()
async def entity(request: Request, user: User) -> Response:
    c = console_of(request)

    def load() -> dict[str, Any]:
        with c.engine.connect() as conn:
            return queries.entity_story(conn, int(request.path_params["entity_id"]))

    try:
        story = await run_in_threadpool(load)
    except NotFound as exc:
        return not_found(request, user, str(exc))
    return render(request, "entity.html", user, e=story)
