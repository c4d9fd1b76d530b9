"""Circuit: the fleet-wide circuit breaker for everyone to see, and for operators to
open (Capillary asked us to stop) or close (the key or the configuration is fixed).

The same use case as ``coupon-worker circuit`` (``worker.usecases.circuit_control``), audited in
the same transaction that moves the switch, with the logged-in identity; no Capillary
credentials are needed here. Closing makes the entities waiting out the pause due at once, and
the workers call again within about a second.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from worker.entrypoints.console.auth import Role, User
from worker.entrypoints.console.state import console_of
from worker.entrypoints.console.web import form_fields, page, render
from worker.usecases import queries
from worker.usecases.circuit_control import circuit_state, close_circuit, open_circuit

#: The longest an opening from the console may last, in minutes (a day): longer pauses are
#: a decision for the command line.
MAX_OPEN_MIN = 24 * 60
#: Recent openings and closings shown under the state.
HISTORY_ROWS = 10
CIRCUIT_ACTIONS = ("circuit_open", "circuit_close")


@page()
async def circuit(request: Request, user: User) -> Response:
    return await _show(request, user)


async def _show(request: Request, user: User, *, error: str | None = None,
                status: int = 200) -> Response:
    c = console_of(request)
    state = await run_in_threadpool(circuit_state, c.support)
    history = await run_in_threadpool(lambda: sorted(
        (row for action in CIRCUIT_ACTIONS
         for row in queries.audit_rows(c.engine, action=action, limit=HISTORY_ROWS)),
        key=lambda row: row["at"], reverse=True)[:HISTORY_ROWS])
    return render(request, "circuit.html", user, status=status, circuit=state, history=history,
                  can_move=user.role >= Role.OPERATOR, error=error, max_open_min=MAX_OPEN_MIN)


@page(Role.OPERATOR)
async def circuit_open(request: Request, user: User) -> Response:
    c = console_of(request)
    form = await form_fields(request)
    reason = form.get("reason", "").strip()
    try:
        minutes = int(form.get("minutes", ""))
    except ValueError:
        minutes = 0
    if not reason or not 1 <= minutes <= MAX_OPEN_MIN:
        return await _show(request, user, status=400,
                           error=f"say why, and for how long (1 to {MAX_OPEN_MIN} minutes)")
    await run_in_threadpool(lambda: open_circuit(c.support, for_s=minutes * 60.0,
                                                 reason=reason, operator=user.name))
    return RedirectResponse("/circuit", status_code=303)


@page(Role.OPERATOR)
async def circuit_close(request: Request, user: User) -> Response:
    c = console_of(request)
    reason = (await form_fields(request)).get("reason", "").strip()
    if not reason:
        return await _show(request, user, status=400, error="say why it can close")
    await run_in_threadpool(lambda: close_circuit(c.support, reason=reason,
                                                  operator=user.name))
    return RedirectResponse("/circuit", status_code=303)

