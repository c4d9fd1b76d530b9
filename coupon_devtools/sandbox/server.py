"""The sandbox Capillary server: aiohttp over :class:`~coupon_devtools.sandbox.state.SandboxState`.

One process, one event loop, no access log and no per-request disk I/O, so a benchmark measures
the worker rather than the sandbox. Latency is injected with ``asyncio.sleep`` only.

Start it blocking with :func:`run`, or in a background thread of the current process with
:class:`BackgroundSandbox` (tests and the demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from aiohttp import web

from coupon_devtools.sandbox.config import SandboxOptions
from coupon_devtools.sandbox.faults import FaultRule
from coupon_devtools.sandbox.inputs import (
    BUSY_MESSAGE,
    CALL_STATUS_CONNECTION_RESET,
    Clock,
    JsonDict,
    Monotonic,
    PathClass,
    ReadbackApi,
    SandboxInputError,
)
from coupon_devtools.sandbox.records import (
    ApiAnswer,
    error_body,
    readback_error,
    readback_failure,
    readback_stale,
)
from coupon_devtools.sandbox.scenario import load_scenario
from coupon_devtools.sandbox.state import SandboxState

__all__ = [
    "REQUEST_ID_HEADER",
    "STATE_KEY",
    "BackgroundSandbox",
    "SandboxOptions",
    "create_app",
    "load_scenario",
    "run",
]

REQUEST_ID_HEADER: Final = "X-Cap-Requestid"
OAUTH_HEADER: Final = "X-CAP-API-OAUTH-TOKEN"
STATE_KEY: Final = web.AppKey("sandbox_state", SandboxState)
SHUTDOWN_TIMEOUT_S: Final = 1.0
"""Stalled handlers (stall_after faults) are cut short on shutdown rather than awaited."""

# A context variable rather than a request key: the middleware and the handler run in the same
# task, and this works on every aiohttp 3.x without request-key warnings.
_request_id: ContextVar[str] = ContextVar("sandbox_request_id")


@web.middleware
async def _request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request_id = uuid.uuid4().hex
    _request_id.set(request_id)
    try:
        response = await handler(request)
    except SandboxInputError as exc:
        response = _json_response(400, {"error": str(exc)})
    except web.HTTPException as exc:
        exc.headers[REQUEST_ID_HEADER] = request_id
        raise
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _json_response(
    status: int, body: JsonDict, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _abort_with_rst(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger on with a zero timeout turns close() into a RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# --- the Capillary call pipeline -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A call that passed validation: what faults match on, and the work to do."""

    series_ids: tuple[int, ...]
    customer_id: str | None
    execute: Callable[[str | None], ApiAnswer]
    principal: str | None = None


_Preparer = Callable[[web.Request, SandboxState], Awaitable["_Prepared | ApiAnswer"]]


class _Call:
    """Records and answers one Capillary call; every exit goes through here once."""

    def __init__(self, request: web.Request, state: SandboxState, path: PathClass) -> None:
        self.request = request
        self.state = state
        self.path: PathClass = path
        self.request_id = _request_id.get()
        self.principal: str | None = None
        self.series_ids: tuple[int, ...] = ()
        self.customer_id: str | None = None
        self.api: ReadbackApi = "v2_coupon"

    def _record(self, status: int) -> None:
        self.state.record_call(
            self.path,
            status,
            principal=self.principal,
            series_ids=self.series_ids,
            customer_id=self.customer_id,
            request_id=self.request_id,
        )

    def answer(self, answer: ApiAnswer) -> web.Response:
        self._record(answer.status)
        return _json_response(answer.status, answer.body, dict(answer.headers))

    def error(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        return self.answer(ApiAnswer(status, error_body(self.path, status, message), headers or {}))

    def empty(self, status: int) -> web.Response:
        self._record(status)
        return web.Response(status=status)

    def html(self, status: int) -> web.Response:
        """A page as a proxy or a misrouted request answers: HTML, not the API's JSON."""
        self._record(status)
        return web.Response(
            status=status, content_type="text/html",
            text=f"<html><head><title>{status}</title></head><body><center><h1>{status}"
                 "</h1></center><hr><center>gateway</center></body></html>")

    def reset(self) -> web.Response:
        self._record(CALL_STATUS_CONNECTION_RESET)
        _abort_with_rst(self.request)
        # aiohttp's write to the aborted transport fails with a ConnectionError it handles.
        return web.Response(status=500)


async def _capillary_call(
    request: web.Request, path: PathClass, prepare: _Preparer,
    api: ReadbackApi = "v2_coupon",
) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    call = _Call(request, state, path)
    call.api = api
    if state.config.latency_s > 0:
        await asyncio.sleep(state.config.latency_s)
    refused = None if path == "token" else _admit(call)
    if refused is not None:
        return refused
    prepared = await prepare(request, state)
    if isinstance(prepared, ApiAnswer):
        return call.answer(prepared)
    call.series_ids = prepared.series_ids
    call.customer_id = prepared.customer_id
    fault = state.take_fault(path, prepared.series_ids, prepared.customer_id)
    if fault is not None and fault.kind == "latency":
        await asyncio.sleep(fault.delay_s)
        fault = None
    before = _fault_before(call, fault)
    if before is not None:
        return before
    if fault is not None and fault.kind == "slow_original":
        # Shielded: the client gives up (its read timeout) and disconnects, and the original
        # request still lands afterwards, as a slow request behind a gateway does.
        answer = await asyncio.shield(_late(prepared, call.principal, fault.delay_s))
        return call.answer(answer)
    answer = prepared.execute(call.principal)
    if path == "token" and answer.status == 200:
        call.principal = prepared.principal
    return await _fault_after(call, fault, answer)


async def _late(prepared: _Prepared, principal: str | None, delay_s: float) -> ApiAnswer:
    await asyncio.sleep(delay_s)
    return prepared.execute(principal)


def _admit(call: _Call) -> web.Response | None:
    """Authenticate and rate-limit a call; a response means it was refused."""
    token = call.request.headers.get(OAUTH_HEADER)
    authorization = call.request.headers.get("Authorization")
    if token is not None:
        principal = call.state.principal_for_token(token)
        reason = "Invalid, expired or revoked OAuth token"
    elif authorization is not None:
        principal = call.state.authenticate_basic(authorization)
        reason = "Invalid username or password"
    else:
        principal = None
        reason = f"Missing credentials: send Authorization: Basic or {OAUTH_HEADER}"
    if principal is None:
        return call.error(401, reason)
    call.principal = principal
    retry_after_s = call.state.take_rate_slot(principal)
    if retry_after_s is None:
        return None
    return call.error(429, "Rate limit exceeded", {"Retry-After": str(retry_after_s)})


def _fault_before(call: _Call, fault: FaultRule | None) -> web.Response | None:
    """Answer a fault that strikes before any work is done; None lets the call proceed."""
    if fault is None:
        return None
    responders: dict[str, Callable[[FaultRule], web.Response]] = {
        "error_before": lambda f: call.error(f.status, f"Sandbox injected error {f.status}"),
        "empty_500_before": lambda _f: call.empty(500),
        "rate_limit": lambda f: call.error(
            429, "Rate limit exceeded", {"Retry-After": str(f.retry_after_s)}
        ),
        "busy_521": lambda _f: call.answer(
            ApiAnswer(521, {"errors": [{"code": 521, "message": BUSY_MESSAGE}]})
        ),
        "reset_before": lambda _f: call.reset(),
        "readback_unreadable": lambda _f: call.html(200),
        "readback_failure_status": lambda _f: call.answer(readback_failure(call.api)),
        "readback_stale": lambda _f: call.answer(
            readback_stale(call.api, call.customer_id or "")),
    }
    respond = responders.get(fault.kind)
    return None if respond is None else respond(fault)


async def _fault_after(call: _Call, fault: FaultRule | None, answer: ApiAnswer) -> web.Response:
    """Answer a call whose work is done, spoiling the answer if a fault says so."""
    if fault is None:
        return call.answer(answer)
    if fault.kind == "error_after":
        return call.empty(fault.status)
    if fault.kind == "reset_after":
        return call.reset()
    if fault.kind == "error_json_after":
        return call.answer(ApiAnswer(
            fault.status, {"errors": [{"code": fault.status, "message": "internal error"}]}))
    if fault.kind == "html_after":
        return call.html(fault.status)
    # stall_after: record first, so the call log shows the call while the client waits.
    response = call.answer(answer)
    await asyncio.sleep(fault.delay_s)
    return response


async def _prepare_bulk(request: web.Request, state: SandboxState) -> _Prepared | ApiAnswer:
    raw = await request.read()
    try:
        parsed = state.parse_bulk_request(raw, request.query.get("source"))
    except SandboxInputError as exc:
        return ApiAnswer(400, error_body("bulk", 400, str(exc)))
    request_id = _request_id.get()

    def execute(principal: str | None) -> ApiAnswer:
        assert principal is not None
        return state.issue_bulk(parsed, principal=principal, request_id=request_id)

    return _Prepared(parsed.series_ids, parsed.customer_id, execute)


def _readback_preparer(api: ReadbackApi) -> _Preparer:
    async def prepare(request: web.Request, state: SandboxState) -> _Prepared | ApiAnswer:
        try:
            query = state.parse_readback(api, request.query)
        except SandboxInputError as exc:
            return readback_error(api, str(exc))
        return _Prepared(
            query.series_ids,
            query.customer_ids[0],
            lambda _principal: state.answer_readback(query),
        )

    return prepare


async def _prepare_token(request: web.Request, state: SandboxState) -> _Prepared | ApiAnswer:
    try:
        body = await request.json()
    except ValueError:
        body = None
    key = body.get("key") if isinstance(body, dict) else None
    secret = body.get("secret") if isinstance(body, dict) else None
    if not isinstance(key, str) or not isinstance(secret, str):
        return ApiAnswer(
            400,
            error_body("token", 400, 'Body must be a JSON object {"key": str, "secret": str}'),
        )
    return _Prepared((), None, lambda _principal: state.generate_token(key, secret), key)


async def _bulk_issue(request: web.Request) -> web.StreamResponse:
    return await _capillary_call(request, "bulk", _prepare_bulk)


async def _token_generate(request: web.Request) -> web.StreamResponse:
    return await _capillary_call(request, "token", _prepare_token)


def _readback_handler(api: ReadbackApi) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    prepare = _readback_preparer(api)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _capillary_call(request, "readback", prepare, api)

    return handler


# --- the admin API -------------------------------------------------------------------------


async def _admin_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise SandboxInputError(f"Malformed JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise SandboxInputError("Body must be a JSON object")
    return body


def _path_int(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    try:
        return int(raw)
    except ValueError as exc:
        raise SandboxInputError(f"{name} must be an integer, got {raw!r}") from exc


async def _admin_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return _json_response(200, {"ok": True})


async def _admin_health(request: web.Request) -> web.Response:
    return _json_response(200, {"ok": True})


async def _admin_ledger(request: web.Request) -> web.Response:
    customer = request.query.get("customer") or None
    raw_series = request.query.get("series")
    try:
        series = int(raw_series) if raw_series else None
    except ValueError as exc:
        raise SandboxInputError(f"series must be an integer, got {raw_series!r}") from exc
    coupons = request.app[STATE_KEY].ledger(customer=customer, series=series)
    return _json_response(200, {"coupons": coupons})


async def _admin_get_config(request: web.Request) -> web.Response:
    return _json_response(200, {"config": request.app[STATE_KEY].config.to_json()})


async def _admin_put_config(request: web.Request) -> web.Response:
    config = request.app[STATE_KEY].configure(await _admin_body(request))
    return _json_response(200, {"config": config.to_json()})


async def _admin_put_series(request: web.Request) -> web.Response:
    series_id = _path_int(request, "series_id")
    settings = request.app[STATE_KEY].set_series(series_id, await _admin_body(request))
    return _json_response(200, {"series": settings.to_json(series_id)})


async def _admin_put_customer(request: web.Request) -> web.Response:
    customer_id = request.match_info["customer_id"]
    body = await _admin_body(request)
    exists = body.get("exists")
    if set(body) != {"exists"} or not isinstance(exists, bool):
        raise SandboxInputError('Body must be {"exists": true|false}')
    request.app[STATE_KEY].set_customer(customer_id, exists=exists)
    return _json_response(200, {"id": customer_id, "exists": exists})


async def _admin_add_fault(request: web.Request) -> web.Response:
    fault_id = request.app[STATE_KEY].add_fault(await _admin_body(request))
    return _json_response(200, {"id": fault_id})


async def _admin_clear_faults(request: web.Request) -> web.Response:
    return _json_response(200, {"cleared": request.app[STATE_KEY].clear_faults()})


async def _admin_list_faults(request: web.Request) -> web.Response:
    return _json_response(200, {"faults": request.app[STATE_KEY].faults()})


async def _admin_revoke_tokens(request: web.Request) -> web.Response:
    return _json_response(200, {"revoked": request.app[STATE_KEY].revoke_tokens()})


async def _admin_calls(request: web.Request) -> web.Response:
    raw_since = request.query.get("since")
    try:
        since = float(raw_since) if raw_since else None
    except ValueError as exc:
        raise SandboxInputError(f"since must be epoch seconds, got {raw_since!r}") from exc
    return _json_response(200, {"calls": request.app[STATE_KEY].calls(since)})


async def _admin_stats(request: web.Request) -> web.Response:
    return _json_response(200, request.app[STATE_KEY].stats())


# --- app factory and runners ---------------------------------------------------------------


def create_app(
    options: SandboxOptions,
    *,
    clock: Clock | None = None,
    monotonic: Monotonic | None = None,
) -> web.Application:
    """Build the sandbox application; ``clock`` and ``monotonic`` let tests control time.

    Raises :class:`~coupon_devtools.sandbox.inputs.SandboxInputError` when the options'
    scenario is invalid.
    """
    app = web.Application(middlewares=[_request_id_middleware])
    app[STATE_KEY] = SandboxState(options, clock=clock, monotonic=monotonic)
    app.router.add_post("/v2/coupon/bulk/issue", _bulk_issue)
    app.router.add_post("/v3/oauth/token/generate", _token_generate)
    app.router.add_get("/v2/coupon", _readback_handler("v2_coupon"))
    app.router.add_get("/v1.1/customer/coupons", _readback_handler("v11_customer_coupons"))
    app.router.add_get("/v2/customers/coupons", _readback_handler("v2_customers_coupons"))
    app.router.add_post("/sandbox/reset", _admin_reset)
    app.router.add_get("/sandbox/health", _admin_health)
    app.router.add_get("/sandbox/ledger", _admin_ledger)
    app.router.add_get("/sandbox/config", _admin_get_config)
    app.router.add_put("/sandbox/config", _admin_put_config)
    app.router.add_put("/sandbox/series/{series_id}", _admin_put_series)
    app.router.add_put("/sandbox/customers/{customer_id}", _admin_put_customer)
    app.router.add_post("/sandbox/faults", _admin_add_fault)
    app.router.add_delete("/sandbox/faults", _admin_clear_faults)
    app.router.add_get("/sandbox/faults", _admin_list_faults)
    app.router.add_post("/sandbox/tokens/revoke", _admin_revoke_tokens)
    app.router.add_get("/sandbox/calls", _admin_calls)
    app.router.add_get("/sandbox/stats", _admin_stats)
    return app


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def _serving(app: web.Application, host: str, port: int) -> AsyncIterator[str]:
    """Serve ``app`` until the block exits; yields the base URL with the bound port."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield _url(host, int(bound_port))
    finally:
        await runner.cleanup()


def run(host: str, port: int, options: SandboxOptions) -> None:
    """Serve until SIGINT or SIGTERM (blocking).

    Prints ``sandbox listening on http://HOST:PORT`` once connections are accepted; with
    ``port=0`` the printed port is the one the OS chose.
    """
    asyncio.run(_run_until_signalled(host, port, options))


async def _run_until_signalled(host: str, port: int, options: SandboxOptions) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with _serving(create_app(options), host, port) as url:
            print(f"sandbox listening on {url}", flush=True)
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


class BackgroundSandbox:
    """A sandbox on its own event loop in a daemon thread of this process.

    Use as a context manager; :attr:`url` is the base URL (``port=0`` picks a free port)::

        with BackgroundSandbox(SandboxOptions()) as sandbox:
            SandboxAdmin(sandbox.url).reset()
    """

    def __init__(
        self,
        options: SandboxOptions | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        monotonic: Monotonic | None = None,
    ) -> None:
        self._app = create_app(
            options if options is not None else SandboxOptions(), clock=clock, monotonic=monotonic
        )
        self._host = host
        self._port = port
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._url: str | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``; only valid once started."""
        if self._url is None:
            raise RuntimeError("sandbox is not running")
        return self._url

    def start(self, timeout_s: float = 10.0) -> str:
        """Start serving and wait until connections are accepted; returns the base URL."""
        if self._thread is not None:
            raise RuntimeError("sandbox already started")
        self._thread = threading.Thread(target=self._thread_main, name="sandbox", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"sandbox did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError("sandbox failed to start") from self._error
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and join the thread (in-flight stalled calls are cut short)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"sandbox did not stop within {timeout_s} s")
        self._thread = None
        self._url = None

    def __enter__(self) -> BackgroundSandbox:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except OSError as exc:
            # Typically the port is taken; start() re-raises it in the caller's thread.
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with _serving(self._app, self._host, self._port) as url:
            self._url = url
            self._ready.set()
            await self._stop.wait()
