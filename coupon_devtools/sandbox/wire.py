"""What every sandbox response shares: the request id, JSON bodies, the state's app key, and
the connection reset that some faults end with."""

from __future__ import annotations

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


def abort_with_rst(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger on with a zero timeout turns close() into a RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
