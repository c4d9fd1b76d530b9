"""What every sandbox response shares: the request id, JSON bodies, the state's app key, and
the connection reset and the garbled stream that some faults end with."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Final

from aiohttp import web

from coupon_devtools.sandbox.inputs import (
    JsonDict,
    SandboxInputError,
)
from coupon_devtools.sandbox.state import SandboxState

REQUEST_ID_HEADER: Final = "X-Cap-Requestid"
OAUTH_HEADER: Final = "X-CAP-API-OAUTH-TOKEN"
STATE_KEY: Final = web.AppKey("sandbox_state", SandboxState)
SHUTDOWN_TIMEOUT_S: Final = 1.0
"""Stalled handlers (stall_after faults) are cut short on shutdown rather than awaited."""

# A context variable rather than a request key: the middleware and the handler run in the same
# task, and this works on every aiohttp 3.x without request-key warnings.
current_request_id: ContextVar[str] = ContextVar("sandbox_request_id")


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request_id = uuid.uuid4().hex
    current_request_id.set(request_id)
    try:
        response = await handler(request)
    except SandboxInputError as exc:
        response = json_response(400, {"error": str(exc)})
    except web.HTTPException as exc:
        exc.headers[REQUEST_ID_HEADER] = request_id
        raise
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


def json_response(
    status: int, body: JsonDict, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _abort(request: web.Request, before: Callable[[socket.socket], None]) -> None:
    """Close the request's connection at once, after ``before`` had the socket itself."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        before(sock)
    transport.abort()


def abort_with_rst(request: web.Request) -> None:
    # Linger on with a zero timeout turns close() into a RST instead of a FIN.
    _abort(request, lambda sock: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                 struct.pack("ii", 1, 0)))


#: A TLS application-data record no key decrypts; over plain HTTP, no status line either.
GARBLED_BYTES: Final = b"\x17\x03\x03\x00\x20" + bytes(32)


def _write_garbled(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        os.write(sock.fileno(), GARBLED_BYTES)


def garble_and_close(request: web.Request) -> None:
    """Write :data:`GARBLED_BYTES` on the socket itself, under any TLS layer, then close."""
    _abort(request, _write_garbled)


class Holds:
    """Calls that ``hold`` faults keep waiting until they are released: a test stops a
    service while a call is in flight, then lets Capillary act, whatever the machine's pace."""

    def __init__(self) -> None:
        self._waiting: list[asyncio.Event] = []

    async def wait(self, limit_s: float) -> None:
        """Wait until released, or ``limit_s`` at most."""
        released = asyncio.Event()
        self._waiting.append(released)
        try:
            await asyncio.wait_for(released.wait(), limit_s)
        except TimeoutError:
            pass
        finally:
            if released in self._waiting:
                self._waiting.remove(released)

    def held(self) -> int:
        return len(self._waiting)

    def release(self) -> int:
        """Let every held call go on; returns how many there were."""
        waiting, self._waiting = self._waiting, []
        for released in waiting:
            released.set()
        return len(waiting)


HOLDS_KEY: Final = web.AppKey("sandbox_holds", Holds)
