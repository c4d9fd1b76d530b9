"""Logging in and out, and the style sheet the login page needs before anyone is logged in."""

from __future__ import annotations

import math
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from worker.domain.text import printable
from worker.entrypoints.console import csrf, sessions
from worker.entrypoints.console.proxies import client_address
from worker.entrypoints.console.state import Console, console_of
from worker.entrypoints.console.web import form_fields, render


async def login(request: Request) -> Response:
    c = console_of(request)
    nxt = request.query_params.get("next", "/")
    if not nxt.startswith("/") or nxt.startswith("//"):
        nxt = "/"
    if request.method == "GET":
        return render(request, "login.html", None, next=nxt, error=None)
    form = await form_fields(request)
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
    form = await form_fields(request)
    if csrf.valid(request.session, form.get(csrf.FIELD)):
        await sessions.log_out(request, console_of(request).sessions)
    return RedirectResponse("/login", status_code=303)


_STYLE_SHEET = Path(__file__).parent.parent / "static" / "console.css"


async def style_sheet(request: Request) -> Response:
    """The console's style sheet: public (the login page uses it), cached for an hour."""
    return Response(_STYLE_SHEET.read_bytes(), media_type="text/css",
                    headers={"cache-control": "public, max-age=3600"})
