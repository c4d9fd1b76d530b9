"""The admin API under ``/sandbox/``: reset, config, series, customers, users' passwords,
faults, the ledger, the call log and stats."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coupon_devtools.sandbox.inputs import (
    SandboxInputError,
)
from coupon_devtools.sandbox.wire import HOLDS_KEY, STATE_KEY, json_response


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


async def admin_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    request.app[HOLDS_KEY].release()
    return json_response(200, {"ok": True})


async def admin_holds(request: web.Request) -> web.Response:
    return json_response(200, {"held": request.app[HOLDS_KEY].held()})


async def admin_release(request: web.Request) -> web.Response:
    return json_response(200, {"released": request.app[HOLDS_KEY].release()})


async def admin_health(request: web.Request) -> web.Response:
    return json_response(200, {"ok": True})


async def admin_ledger(request: web.Request) -> web.Response:
    customer = request.query.get("customer") or None
    raw_series = request.query.get("series")
    try:
        series = int(raw_series) if raw_series else None
    except ValueError as exc:
        raise SandboxInputError(f"series must be an integer, got {raw_series!r}") from exc
    coupons = request.app[STATE_KEY].ledger(customer=customer, series=series)
    return json_response(200, {"coupons": coupons})


async def admin_get_config(request: web.Request) -> web.Response:
    return json_response(200, {"config": request.app[STATE_KEY].config.to_json()})


async def admin_put_config(request: web.Request) -> web.Response:
    config = request.app[STATE_KEY].configure(await _admin_body(request))
    return json_response(200, {"config": config.to_json()})


async def admin_put_series(request: web.Request) -> web.Response:
    series_id = _path_int(request, "series_id")
    settings = request.app[STATE_KEY].set_series(series_id, await _admin_body(request))
    return json_response(200, {"series": settings.to_json(series_id)})


async def admin_put_customer(request: web.Request) -> web.Response:
    customer_id = request.match_info["customer_id"]
    body = await _admin_body(request)
    exists = body.get("exists")
    if set(body) != {"exists"} or not isinstance(exists, bool):
        raise SandboxInputError('Body must be {"exists": true|false}')
    request.app[STATE_KEY].set_customer(customer_id, exists=exists)
    return json_response(200, {"id": customer_id, "exists": exists})


async def admin_put_user(request: web.Request) -> web.Response:
    username = request.match_info["username"]
    body = await _admin_body(request)
    password = body.get("password")
    if set(body) != {"password"} or not isinstance(password, str):
        raise SandboxInputError('Body must be {"password": "..."}')
    request.app[STATE_KEY].set_password(username, password)
    return json_response(200, {"username": username})


async def admin_add_fault(request: web.Request) -> web.Response:
    fault_id = request.app[STATE_KEY].add_fault(await _admin_body(request))
    return json_response(200, {"id": fault_id})


async def admin_clear_faults(request: web.Request) -> web.Response:
    return json_response(200, {"cleared": request.app[STATE_KEY].clear_faults()})


async def admin_list_faults(request: web.Request) -> web.Response:
    return json_response(200, {"faults": request.app[STATE_KEY].faults()})


async def admin_revoke_tokens(request: web.Request) -> web.Response:
    return json_response(200, {"revoked": request.app[STATE_KEY].revoke_tokens()})


async def admin_calls(request: web.Request) -> web.Response:
    raw_since = request.query.get("since")
    try:
        since = float(raw_since) if raw_since else None
    except ValueError as exc:
        raise SandboxInputError(f"since must be epoch seconds, got {raw_since!r}") from exc
    return json_response(200, {"calls": request.app[STATE_KEY].calls(since)})


async def admin_stats(request: web.Request) -> web.Response:
    return json_response(200, request.app[STATE_KEY].stats())
