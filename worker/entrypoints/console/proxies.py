"""Headers a reverse proxy sets, believed only from the proxies the settings name.

A request whose peer is in ``COUPONS_CONSOLE_TRUSTED_PROXIES`` may say who the user is (the
single sign-on header), who the client is (``X-Forwarded-For``) and that it came over HTTPS
(``X-Forwarded-Proto``). From any other peer those headers are removed before any page sees
them: a client talking to the console directly cannot name itself a user, pick the address its
failed logins are counted under, or claim HTTPS.

The peer itself stays the request's ``client`` (the pages check the identity header's sender
against the trusted proxies); the client's address is kept beside it (``client_address``).
"""

from __future__ import annotations

from ipaddress import ip_address

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from worker.entrypoints.console.config import TrustedProxies

#: Where the client's address is kept in the ASGI scope.
CLIENT_KEY = "coupon_console.client"
FORWARDED_FOR = b"x-forwarded-for"
FORWARDED_PROTO = b"x-forwarded-proto"
#: RFC 7239's header: never read, so never believed; removed with the others.
FORWARDED = b"forwarded"


def client_address(connection: HTTPConnection) -> str:
    """The client's address: the peer's, or the one a trusted proxy forwarded."""
    found = connection.scope.get(CLIENT_KEY)
    if isinstance(found, str):
        return found
    return connection.client.host if connection.client else "unknown"


def forwarded_client(values: list[str], proxies: TrustedProxies, peer: str) -> str:
    """The client in ``X-Forwarded-For`` (each proxy appends the address it got the request
    from): the rightmost hop that is not a trusted proxy. Hops left of it are whatever the
    client chose to send, so they are never believed; a hop that is not an address ends the
    walk at the last one believed."""
    hops = [hop.strip() for value in values for hop in value.split(",") if hop.strip()]
    believed = peer
    for hop in reversed(hops):
        try:
            ip_address(hop)
        except ValueError:
            return believed
        believed = hop
        if hop not in proxies:
            return hop
    return believed


class TrustedProxyHeaders:
    """ASGI middleware: the identity and forwarding headers from trusted proxies only."""

    def __init__(self, app: ASGIApp, proxies: TrustedProxies,
                 identity_header: str | None) -> None:
        self.app = app
        self.proxies = proxies
        self.guarded = {FORWARDED_FOR, FORWARDED_PROTO, FORWARDED}
        if identity_header:
            self.guarded.add(identity_header.lower().encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        peer = scope["client"][0] if scope.get("client") else "unknown"
        scope = dict(scope)
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
        if peer in self.proxies:
            forwarded = [v.decode("latin-1") for k, v in headers if k == FORWARDED_FOR]
            scope[CLIENT_KEY] = forwarded_client(forwarded, self.proxies, peer)
            protos = [v.decode("latin-1").split(",")[-1].strip().lower()
                      for k, v in headers if k == FORWARDED_PROTO]
            if protos and protos[-1] in ("http", "https"):
                scope["scheme"] = protos[-1] if scope["type"] == "http" else \
                    {"http": "ws", "https": "wss"}[protos[-1]]
        else:
            scope[CLIENT_KEY] = peer
            scope["headers"] = [(k, v) for k, v in headers if k.lower() not in self.guarded]
        await self.app(scope, receive, send)
