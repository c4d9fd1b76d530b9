"""Server-side sessions: the cookie holds a random id, the session lives in PostgreSQL.

- **Logout ends it**: the row is deleted, so a cookie copied before logout is refused after.
- **The users file decides**: a session keeps a fingerprint of its user's entry (role, password
  hash); when the entry changes or goes (the file is re-read without a restart), the session
  is refused and deleted on its next request.
- **Timeouts**: idle (``COUPONS_CONSOLE_SESSION_IDLE_SECONDS``) and absolute
  (``COUPONS_CONSOLE_SESSION_SECONDS``), checked by the database's own statement on each
  request; expired rows are pruned at each login.
- **No fixation**: a login always gets a new id; the visitor's pre-login state (the login
  form's CSRF token) sits in a separate signed cookie that is never a session id, and any
  session the browser held before is ended.
- **CSRF bound to the session**: the token is created at login and kept in the session's row.

Pages keep using ``request.session`` (a dict): this middleware fills it from the row (or, before
login, from the signed cookie) and writes back what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from base64 import b64decode, b64encode
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from itsdangerous import BadSignature, TimestampSigner
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.adapters.postgres.console_sessions import SessionStore, StoredSession
from worker.domain.text import printable
from worker.entrypoints.console.auth import User, UserDirectory

log = logging.getLogger("worker.console")

SESSION_COOKIE = "coupon_console"
#: Before login: the login form's CSRF token (and, for a user the single sign-on proxy names
#: on every request, the pages' token), signed, for as long as a session may last.
PRE_LOGIN_COOKIE = "coupon_console_pre"
_SCOPE_KEY = "coupon_console.session"


def digest(session_id: str) -> str:
    """What the table stores for a session id."""
    return hashlib.sha256(session_id.encode("ascii", "replace")).hexdigest()


class SessionManager:
    """The policy: who a session id is, for how long, and when it ends."""

    def __init__(self, store: SessionStore, users: UserDirectory, *, idle_s: float,
                 absolute_s: float, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.users = users
        self.idle_s = idle_s
        self.absolute_s = absolute_s
        self.clock = clock

    def begin(self, user: User, *, client: str, user_agent: str) -> tuple[str, dict[str, Any]]:
        """A new session for ``user``: its id (for the cookie) and its data."""
        session_id = secrets.token_urlsafe(32)
        data = {"csrf": secrets.token_urlsafe(32)}
        now = self.clock()
        self.store.create(id_hash=digest(session_id), user_name=user.name,
                          role=user.role.name.lower(),
                          fingerprint=self.users.fingerprint(user.name) or "",
                          client=client, user_agent=printable(user_agent, limit=300),
                          data=data, now=now)
        pruned = self.store.prune(now=now, idle_s=self.idle_s, absolute_s=self.absolute_s)
        if pruned:
            log.info("console.sessions_pruned", extra={"sessions": pruned})
        return session_id, data

    def resume(self, session_id: str) -> StoredSession | None:
        """The live session behind ``session_id``, or None (unknown, expired, or its user's
        entry changed: then it is deleted)."""
        found = self.store.resume(digest(session_id), now=self.clock(), idle_s=self.idle_s,
                                  absolute_s=self.absolute_s)
        if found is None:
            return None
        if self.users.fingerprint(found.user_name) != found.fingerprint:
            self.store.end(found.id_hash)
            log.warning("console.session_ended", extra={
                "user": found.user_name, "why": "the user's entry changed or was removed"})
            return None
        return found

    def live(self, user_name: str | None = None) -> list[StoredSession]:
        return self.store.live(now=self.clock(), idle_s=self.idle_s,
                               absolute_s=self.absolute_s, user_name=user_name)

    def revoke_user(self, user_name: str) -> int:
        """End every session of ``user_name``; how many."""
        return self.store.end_user(user_name)

    def revoke_users(self, user_names: set[str]) -> None:
        """The users file changed these users' entries: end their sessions now."""
        for name in sorted(user_names):
            ended = self.store.end_user(name)
            if ended:
                log.warning("console.session_ended", extra={
                    "user": name, "sessions": ended,
                    "why": "the user's entry changed or was removed"})


@dataclass
class _Current:
    """This request's session: its stored id digest (None before login), what the pages got."""

    id_hash: str | None
    initial: dict[str, Any]
    new_id: str | None = None
    ended: bool = False
    stale_cookie: bool = False


async def log_in(request: Request, manager: SessionManager, user: User, client: str) -> None:
    """Start a new session for ``user`` (a fresh id: the one before, if any, ends)."""
    current: _Current = request.scope[_SCOPE_KEY]
    if current.id_hash is not None:
        await run_in_threadpool(manager.store.end, current.id_hash)
    session_id, data = await run_in_threadpool(
        lambda: manager.begin(user, client=client,
                              user_agent=request.headers.get("user-agent", "")))
    current.new_id, current.id_hash = session_id, None
    request.session.clear()
    request.session.update(data, user=user.name)


async def log_out(request: Request, manager: SessionManager) -> None:
    """End this request's session, server-side."""
    current: _Current = request.scope[_SCOPE_KEY]
    if current.id_hash is not None:
        await run_in_threadpool(manager.store.end, current.id_hash)
    current.ended = True
    request.session.clear()


class ServerSessions:
    """ASGI middleware: ``scope["session"]`` from the session's row, or before login from a
    signed cookie that only ever holds the login form's CSRF token."""

    def __init__(self, app: ASGIApp, manager: SessionManager, secret: str,
                 https_only: bool) -> None:
        self.app = app
        self.manager = manager
        self.signer = TimestampSigner(secret, salt="coupon-console-pre-login")
        self.https_only = https_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cookies = HTTPConnection(scope).cookies
        session_id = cookies.get(SESSION_COOKIE)
        found = await run_in_threadpool(self.manager.resume, session_id) if session_id \
            else None
        if found is not None:
            session: dict[str, Any] = {**found.data, "user": found.user_name}
            current = _Current(found.id_hash, dict(session))
        else:
            session = self._pre_login(cookies.get(PRE_LOGIN_COOKIE))
            current = _Current(None, dict(session), stale_cookie=bool(session_id))
        scope["session"] = session
        scope[_SCOPE_KEY] = current

        async def send_with_cookies(message: Message) -> None:
            if message["type"] == "http.response.start":
                await self._finish(current, session, MutableHeaders(scope=message))
            await send(message)

        await self.app(scope, receive, send_with_cookies)

    async def _finish(self, current: _Current, session: dict[str, Any],
                      headers: MutableHeaders) -> None:
        cookies = Response()
        if current.new_id is not None:
            self._set(cookies, SESSION_COOKIE, current.new_id, self.manager.absolute_s)
            cookies.delete_cookie(PRE_LOGIN_COOKIE, httponly=True, samesite="strict")
        elif current.ended or current.stale_cookie:
            cookies.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict",
                                  secure=self.https_only)
        elif current.id_hash is not None and session != current.initial:
            data = {k: v for k, v in session.items() if k != "user"}
            await run_in_threadpool(self.manager.store.save_data, current.id_hash, data)
        if current.id_hash is None and current.new_id is None and not current.ended \
                and session != current.initial:
            # Before login: only the form's token, never a user.
            kept = {k: v for k, v in session.items() if k != "user"}
            signed = self.signer.sign(b64encode(json.dumps(kept).encode())).decode()
            self._set(cookies, PRE_LOGIN_COOKIE, signed, self.manager.absolute_s)
        for name, value in cookies.raw_headers:
            if name == b"set-cookie":
                headers.append("set-cookie", value.decode("latin-1"))

    def _set(self, response: Response, name: str, value: str, max_age_s: float) -> None:
        response.set_cookie(name, value, max_age=int(max_age_s), path="/", httponly=True,
                            samesite="strict", secure=self.https_only)

    def _pre_login(self, signed: str | None) -> dict[str, Any]:
        if not signed:
            return {}
        try:
            data = json.loads(b64decode(self.signer.unsign(
                signed.encode(), max_age=int(self.manager.absolute_s))))
        except (BadSignature, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        data.pop("user", None)
        return data
