"""Signed session cookies whose secret follows its file (``COUPONS_CONSOLE_SECRET_FILE``).

A rotated secret signs and checks from the next request on: sessions signed with the old one
no longer verify, so everyone logs in again (the point of rotating a secret that may have
leaked). A new secret too weak to sign sessions is refused, and the old one kept, with an error
in the log.
"""

from __future__ import annotations

import logging
from typing import Any

import itsdangerous
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from worker.entrypoints.console.config import weakness
from worker.secret_files import Secret

log = logging.getLogger(__name__)


class RotatingSessions(SessionMiddleware):
    """Starlette's session middleware, with its signer rebuilt when the secret changes."""

    def __init__(self, app: ASGIApp, /, *, secret: Secret, **kwargs: Any) -> None:
        super().__init__(app, secret_key=secret.get(), **kwargs)
        self._secret = secret
        self._version = secret.version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        version = self._secret.refresh()
        if version != self._version:
            self._version = version
            value = self._secret.get()
            problem = weakness(value)
            if problem:
                log.error("console.secret_refused", extra={"error": problem})
            else:
                self.signer = itsdangerous.TimestampSigner(value)
                log.warning("console.secret_rotated", extra={"version": version})
        await super().__call__(scope, receive, send)
