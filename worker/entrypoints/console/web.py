"""What every page shares: who is asking, rendering, the login / role / CSRF guard, reading
query and form values (a value that cannot be read is a 400, never dropped), the audit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from worker.adapters.postgres.support import Selection
from worker.adapters.rabbitmq.names import split_worker
from worker.domain.errors import SelectionRefused
from worker.domain.model import describe_error
from worker.domain.text import mask_code
from worker.entrypoints.console import csrf
from worker.entrypoints.console.auth import Role, User
from worker.entrypoints.console.state import Console, console_of
from worker.entrypoints.console.timestamps import moment
from worker.usecases.issue import utcnow

Handler = Callable[[Request, User], Awaitable[Response]]


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def current_user(request: Request) -> User | None:
    """The logged-in user (session) or the trusted proxy's (header), with today's role."""
    c = console_of(request)
    header = c.console.proxy_user_header
    if header and client_of(request) in c.console.proxies():
        name = request.headers.get(header)
        if name:
            known = c.users.get(name)
            return known or User(name, Role.parse(c.console.proxy_default_role))
    name = request.session.get("user")
    if not isinstance(name, str):
        return None
    # The users file decides the role on every request: a removed user is logged out.
    return c.users.get(name)


def origin(user: User) -> dict[str, str]:
    """Where an action came from, kept in its audit row's details."""
    return {"via": "console", "role": user.role.name.lower()}


def task_id_of(worker: str | None) -> str | None:
    """The Celery task id a ledger ``worker`` column carries (``host:pid/task:<id>``)."""
    return split_worker(worker)[1] if worker else None


def render(request: Request, template: str, user: User | None, status: int = 200,
           **context: Any) -> Response:
    c = console_of(request)
    return c.templates.TemplateResponse(
        request, template,
        {"user": user, "csrf_token": csrf.token(request.session),
         "flower_url": c.console.flower_url, "task_id_of": task_id_of,
         "describe_error": describe_error,
         "when": partial(moment, now=c.support.clock(), zone=c.console.zone()),
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


def not_found(request: Request, user: User | None, why: str) -> Response:
    return render(request, "error.html", user, status=404, title="Not found", message=why)


class BadInput(ValueError):
    """A query or form value that cannot be read: the request answers 400 with why."""


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
            except (BadInput, SelectionRefused) as exc:
                # A value that cannot be read is refused, never dropped: a dropped filter
                # would widen what a page lists, or what an action touches.
                return render(request, "error.html", user, status=400, title="Bad request",
                              message=str(exc))

        endpoint.__name__ = handler.__name__
        return endpoint

    return wrap


async def form_fields(request: Request) -> dict[str, str]:
    """The request's form, text fields only (the last value of a repeated name)."""
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def parse_when(value: str | None, name: str = "date") -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadInput(f"{name}: {value[:60]!r} is not a date and time (ISO-8601, e.g. "
                       "2026-12-07T10:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=utcnow().tzinfo)


def parse_number(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"{name}: {value[:60]!r} is not a whole number") from None


def selection_from(params: Any) -> Selection:
    """A selection from query or form fields: one entity, a group, a customer or an event."""
    entity_id = params.get("entity_id")
    if entity_id:
        return Selection(entity_ids=(parse_number(entity_id, "entity_id"),))
    series = params.get("series")
    return Selection(error_code=params.get("code") or None,
                     series_id=parse_number(series, "series") if series else None,
                     error_message=params.get("message"),
                     customer=params.get("customer") or None,
                     event_id=params.get("event") or None,
                     since=parse_when(params.get("since"), "since"),
                     until=parse_when(params.get("until"), "until"))


def audit(c: Console, user: User, action: str, outcome: str, reason: str = "",
          **details: Any) -> None:
    """One audit row for an action taken in the console by ``user``."""
    with c.support.uow() as uow:
        uow.ledger.audit(action=action, operator=user.name, reason=reason, outcome=outcome,
                         now=c.support.clock(), details={**origin(user), **details})
        uow.commit()
