"""The Capillary call pipeline: admission (auth, rate limit), faults before and after, and
the handlers of bulk issue, token generation and the three read-backs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from coupon_devtools.sandbox.faults import FaultRule
from coupon_devtools.sandbox.inputs import (
    BUSY_MESSAGE,
    CALL_STATUS_CONNECTION_RESET,
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
from coupon_devtools.sandbox.state import SandboxState
from coupon_devtools.sandbox.wire import (
    HOLDS_KEY,
    OAUTH_HEADER,
    STATE_KEY,
    abort_with_rst,
    current_request_id,
    garble_and_close,
    json_response,
)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A call that passed validation: what faults match on, and the work to do."""

    series_ids: tuple[int, ...]
    customer_id: str | None
    execute: Callable[[str | None], ApiAnswer]
    principal: str | None = None


_Preparer = Callable[[web.Request, SandboxState], Awaitable["_Prepared | ApiAnswer"]]


_ODD_NUMBERS: Final = {"id": "92233720368547758070", "seriesId": "21474836470",
                       "discountValue": "1e400", "discountUpto": "NaN"}


class _Call:
    """Records and answers one Capillary call; every exit goes through here once."""

    def __init__(self, request: web.Request, state: SandboxState, path: PathClass) -> None:
        self.request = request
        self.state = state
        self.path: PathClass = path
        self.request_id = current_request_id.get()
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
        return json_response(answer.status, answer.body, dict(answer.headers))

    def error(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        return self.answer(ApiAnswer(status, error_body(self.path, status, message), headers or {}))

    def empty(self, status: int) -> web.Response:
        self._record(status)
        return web.Response(status=status)

    def odd_numbers(self, answer: ApiAnswer) -> web.Response:
        """The answer with each coupon's numbers beyond what the worker's ledger stores:
        an id past 2^63, a series id past 2^31, a value of 1e400 and NaN (JSON text that
        Python reads as infinite and as not-a-number)."""
        self._record(answer.status)
        text = json.dumps(answer.body)
        for row in answer.body.get("response") or []:
            result = row.get("result") if isinstance(row, dict) else None
            if isinstance(result, dict) and result.get("code"):
                for key, odd in _ODD_NUMBERS.items():
                    if key in result:
                        text = text.replace(f'"{key}": {json.dumps(result[key])}',
                                            f'"{key}": {odd}', 1)
        return web.Response(status=answer.status, text=text, content_type="application/json",
                            headers=dict(answer.headers))

    def html(self, status: int) -> web.Response:
        """A page as a proxy or a misrouted request answers: HTML, not the API's JSON."""
        self._record(status)
        return web.Response(
            status=status, content_type="text/html",
            text=f"<html><head><title>{status}</title></head><body><center><h1>{status}"
                 "</h1></center><hr><center>gateway</center></body></html>")

    def garble(self) -> web.Response:
        """No answer the client can read: a mangled stream, then the connection closed."""
        self._record(CALL_STATUS_CONNECTION_RESET)
        garble_and_close(self.request)
        return web.Response(status=500)

    def redirect(self, status: int) -> web.Response:
        """A gateway sending the client to the same URL again (as a 307 or 308 keeps the
        method and the body, a client that follows it sends the call twice)."""
        self._record(status)
        return web.Response(status=status, headers={"Location": str(self.request.rel_url)})

    def reset(self) -> web.Response:
        self._record(CALL_STATUS_CONNECTION_RESET)
        abort_with_rst(self.request)
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
    customer = prepared.customer_id if path == "bulk" else None
    if customer is not None and not state.begin_action(customer):
        return call.answer(busy_answer())
    try:
        return await _proceed(call, state, path, prepared)
    finally:
        if customer is not None:
            state.end_action(customer)


def busy_answer() -> ApiAnswer:
    """Doc (status codes): 521, multiple actions running for the same customer."""
    return ApiAnswer(521, {"errors": [{"code": 521, "message": BUSY_MESSAGE}]})


async def _proceed(call: _Call, state: SandboxState, path: PathClass,
                   prepared: _Prepared) -> web.StreamResponse:
    request = call.request
    fault = state.take_fault(path, prepared.series_ids, prepared.customer_id)
    if fault is not None and fault.kind == "latency":
        await asyncio.sleep(fault.delay_s)
        fault = None
    elif fault is not None and fault.kind == "hold":
        await request.app[HOLDS_KEY].wait(fault.delay_s)
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
        "busy_521": lambda _f: call.answer(busy_answer()),
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
    spoilers: dict[str, Callable[[FaultRule], web.Response]] = {
        "error_after": lambda f: call.empty(f.status),
        "reset_after": lambda _f: call.reset(),
        "error_json_after": lambda f: call.answer(ApiAnswer(
            f.status, {"errors": [{"code": f.status, "message": "internal error"}]})),
        "html_after": lambda f: call.html(f.status),
        "garbled_after": lambda _f: call.garble(),
        "redirect_after": lambda f: call.redirect(f.status),
        "odd_numbers_after": lambda _f: call.odd_numbers(answer),
        "status_after": lambda f: call.answer(ApiAnswer(f.status, answer.body,
                                                        answer.headers)),
    }
    spoil = spoilers.get(fault.kind)
    if spoil is not None:
        return spoil(fault)
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
    request_id = current_request_id.get()

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


async def bulk_issue(request: web.Request) -> web.StreamResponse:
    return await _capillary_call(request, "bulk", _prepare_bulk)


async def token_generate(request: web.Request) -> web.StreamResponse:
    return await _capillary_call(request, "token", _prepare_token)


def readback_handler(api: ReadbackApi) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    prepare = _readback_preparer(api)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _capillary_call(request, "readback", prepare, api)

    return handler
