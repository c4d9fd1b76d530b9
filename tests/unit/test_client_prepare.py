"""The bulk issue's request, copied from one prepared per thread, is the one requests builds."""

from __future__ import annotations

import math

import pytest
import requests
from pydantic import SecretStr

from worker.adapters.capillary.auth import BasicAuth, CapillaryAuth
from worker.adapters.capillary.client import BULK_ISSUE_PATH, CapillaryClient

BODY = {"seriesIds": [544770], "customer": {"id": "566881933"},
        "metadata": {"notes": "ünïcode [cw:abc]"}}


class _Counting(CapillaryAuth):
    """An auth hook whose header changes on every call, like a renewed token."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        self.calls += 1
        request.headers["X-CAP-API-OAUTH-TOKEN"] = f"token-{self.calls}"
        return request


def _client(auth: CapillaryAuth | None) -> CapillaryClient:
    return CapillaryClient("http://capillary.test/", auth=auth)


def _as_requests_builds(client: CapillaryClient, **kwargs: object) -> requests.PreparedRequest:
    session = client.session()
    return session.prepare_request(requests.Request(
        "POST", client.base_url + BULK_ISSUE_PATH, auth=client.auth, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("params", [None, {"source": "INSTORE"}])
def test_the_copied_request_is_what_requests_prepares(params: dict[str, str] | None) -> None:
    client = _client(BasicAuth("store.server", SecretStr("server123")))
    session = client.session()
    for _ in range(2):  # the first prepares the copy, the second uses it
        ours = client._prepare(session, "POST", BULK_ISSUE_PATH,
                               {"json": BODY, "params": params})
        theirs = _as_requests_builds(client, json=BODY, params=params)
        assert (ours.method, ours.url, ours.body) == (theirs.method, theirs.url, theirs.body)
        assert dict(ours.headers) == dict(theirs.headers)
    assert ours.url is not None and ours.url.endswith("?source=INSTORE") == bool(params)


def test_each_call_gets_its_own_body_and_a_fresh_auth_header() -> None:
    auth = _Counting()
    client = _client(auth)
    session = client.session()
    first = client._prepare(session, "POST", BULK_ISSUE_PATH, {"json": {"n": 1}})
    second = client._prepare(session, "POST", BULK_ISSUE_PATH, {"json": {"n": 22}})
    assert (first.body, second.body) == (b'{"n": 1}', b'{"n": 22}')
    assert (first.headers["Content-Length"], second.headers["Content-Length"]) == ("8", "9")
    assert (first.headers["X-CAP-API-OAUTH-TOKEN"],
            second.headers["X-CAP-API-OAUTH-TOKEN"]) == ("token-1", "token-2")


def test_a_session_holding_cookies_prepares_as_requests_does() -> None:
    """A gateway that sets a cookie (a sticky load balancer) gets it back on the next call."""
    client = _client(None)
    session = client.session()
    client._prepare(session, "POST", BULK_ISSUE_PATH, {"json": BODY})
    session.cookies.set("AWSALB", "node-7", domain="capillary.test", path="/")
    prepared = client._prepare(session, "POST", BULK_ISSUE_PATH, {"json": BODY})
    assert prepared.headers["Cookie"] == "AWSALB=node-7"


def test_a_body_json_cannot_write_fails_before_sending_as_in_requests() -> None:
    client = _client(None)
    with pytest.raises(requests.exceptions.InvalidJSONError) as ours:
        client._prepare(client.session(), "POST", BULK_ISSUE_PATH, {"json": {"x": math.nan}})
    with pytest.raises(requests.exceptions.InvalidJSONError):
        _as_requests_builds(client, json={"x": math.nan})
    assert isinstance(ours.value, OSError)  # the client's transport handling catches it
