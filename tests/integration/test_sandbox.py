"""The sandbox Capillary server, driven over real HTTP.

One sandbox runs in a background thread for the whole module with injected clocks, so token
expiry, rate-limit windows and validTill dates are tested without sleeping; every test starts
from ``POST /sandbox/reset``.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from coupon_devtools.sandbox import (
    BackgroundSandbox,
    SandboxAdmin,
    SandboxAdminError,
    SandboxInputError,
    SandboxOptions,
    SandboxState,
    basic_auth_header,
    load_scenario,
)

BASIC = "Basic c3RvcmUuc2VydmVyOjhhMTZhNmI3MDUwNWViMWYxZmY3Y2RjMGNkNTU1OWE3"
START = datetime(2026, 5, 12, 10, 0, tzinfo=UTC)
BULK = "/v2/coupon/bulk/issue"
TOKEN = "/v3/oauth/token/generate"
DEMO_KEY, DEMO_SECRET = "demo-key", "demo-secret"
REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """Wall and monotonic time that only move when a test says so."""

    def __init__(self) -> None:
        self.wall = START
        self.mono = 1_000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds

    def set_wall(self, moment: datetime) -> None:
        self.wall = moment


class Capillary:
    """A bare HTTP client for the sandbox's Capillary endpoints."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def bulk(
        self,
        series_ids: list[int],
        customer: dict[str, Any] | None = None,
        *,
        auth: str = BASIC,
        metadata: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 5.0,
        **params: str,
    ) -> requests.Response:
        body: dict[str, Any] = {"seriesIds": series_ids, "customer": customer or {"id": "c1"}}
        if metadata is not None:
            body["metadata"] = metadata
        all_headers = {"Authorization": auth} if auth else {}
        all_headers.update(headers or {})
        return self.session.post(
            self.base_url + BULK, json=body, headers=all_headers, params=params, timeout=timeout_s
        )

    def raw_bulk(self, data: bytes) -> requests.Response:
        return self.session.post(
            self.base_url + BULK,
            data=data,
            headers={"Authorization": BASIC, "Content-Type": "application/json"},
            timeout=5,
        )

    def token(self, key: str = DEMO_KEY, secret: str = DEMO_SECRET) -> requests.Response:
        return self.session.post(
            self.base_url + TOKEN, json={"key": key, "secret": secret}, timeout=5
        )

    def get(self, path: str, auth: str = BASIC, **params: str) -> requests.Response:
        headers = {"Authorization": auth} if auth else {}
        return self.session.get(self.base_url + path, params=params, headers=headers, timeout=5)


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def sandbox(clock: FakeClock) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(SandboxOptions(), clock=clock.now, monotonic=clock.monotonic) as sb:
        yield sb


@pytest.fixture
def admin(sandbox: BackgroundSandbox, clock: FakeClock) -> Iterator[SandboxAdmin]:
    clock.wall, clock.mono = START, 1_000.0
    with SandboxAdmin(sandbox.url) as client:
        client.reset()
        yield client


@pytest.fixture
def api(sandbox: BackgroundSandbox, admin: SandboxAdmin) -> Iterator[Capillary]:
    client = Capillary(sandbox.url)
    yield client
    client.close()


def entry_errors(response: requests.Response) -> list[tuple[int, int]]:
    """(series id, error code) for every failed entry of a bulk answer."""
    return [
        (e["entityId"], err["code"]) for e in response.json()["response"] for err in e["errors"]
    ]


# --- authentication ------------------------------------------------------------------------


def test_basic_auth_uses_the_documented_md5_test_vector(
    api: Capillary, admin: SandboxAdmin
) -> None:
    # Given the documented credentials, hashed the Capillary way
    assert basic_auth_header("store.server", "server123") == BASIC

    # When a call is made with exactly that header
    response = api.bulk([101], auth=BASIC)

    # Then it is accepted and the coupon is attributed to the username
    assert response.status_code == 200
    assert [c["principal"] for c in admin.ledger()] == ["store.server"]


@pytest.mark.parametrize(
    "auth",
    [
        "",
        "Basic " + base64.b64encode(b"store.server:server123").decode(),
        "Basic " + base64.b64encode(b"store.server:8A16A6B70505EB1F1FF7CDC0CD5559A7").decode(),
        basic_auth_header("store.server", "wrong"),
        basic_auth_header("nobody", "server123"),
        "Basic !!!not-base64",
        "Bearer " + BASIC[6:],
    ],
    ids=["missing", "unhashed", "upper-hex", "wrong-password", "unknown-user", "garbage", "bearer"],
)
def test_bad_basic_credentials_get_401_and_issue_nothing(
    api: Capillary, admin: SandboxAdmin, auth: str
) -> None:
    response = api.bulk([101], auth=auth)

    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == 401
    assert response.headers["X-Cap-Requestid"]
    assert admin.ledger() == []
    assert admin.calls()[-1]["status"] == 401
    assert admin.calls()[-1]["principal"] is None


def test_a_password_changed_by_the_admin_api_refuses_the_old_one_until_reset(
    api: Capillary, admin: SandboxAdmin
) -> None:
    # Given Capillary's side rotated the user's password
    admin.set_password("store.server", "rotated-1")
    # Then the old credentials get 401, the new ones are accepted
    assert api.bulk([101], auth=BASIC).status_code == 401
    assert api.bulk([101], auth=basic_auth_header("store.server", "rotated-1")).status_code == 200
    # And a reset restores the start options' users
    admin.reset()
    assert api.bulk([101], auth=BASIC).status_code == 200
    with pytest.raises(SandboxAdminError):
        admin.set_password("store.server", "")


def test_oauth_token_authorises_calls_as_the_key(api: Capillary, admin: SandboxAdmin) -> None:
    # Given a token generated without any other auth
    generated = api.token()
    assert generated.status_code == 200
    body = generated.json()
    token = body["data"]["accessToken"]
    assert body["errors"] is None
    assert body["data"]["ttlSeconds"] == 300
    assert len(token.split(".")) == 3

    # When it is used in place of Basic auth
    response = api.bulk([101], auth="", headers={"X-CAP-API-OAUTH-TOKEN": token})

    # Then the call succeeds and the key is the principal everywhere
    assert response.status_code == 200
    assert admin.ledger()[0]["principal"] == "demo-key"
    assert [(c["path"], c["principal"]) for c in admin.calls()] == [
        ("token", "demo-key"),
        ("bulk", "demo-key"),
    ]


def test_oauth_bad_secret_gets_401_error_body(api: Capillary) -> None:
    response = api.token(secret="nope")

    assert response.status_code == 401
    body = response.json()
    assert body["data"] is None
    assert body["errors"][0]["code"] == 401
    assert body["errors"][0]["message"]


def test_oauth_token_expires_after_its_ttl(
    api: Capillary, admin: SandboxAdmin, clock: FakeClock
) -> None:
    # Given a token with a 60 s lifetime
    admin.configure(tokenTtlSeconds=60)
    token = api.token().json()["data"]["accessToken"]
    oauth = {"X-CAP-API-OAUTH-TOKEN": token}
    clock.advance(59)
    assert api.bulk([101], auth="", headers=oauth).status_code == 200

    # When its lifetime has passed
    clock.advance(1)
    response = api.bulk([101], auth="", headers=oauth)

    # Then it is refused with a JSON error and nothing more is issued
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == 401
    assert len(admin.ledger()) == 1


def test_revoked_and_unknown_tokens_get_401(api: Capillary, admin: SandboxAdmin) -> None:
    token = api.token().json()["data"]["accessToken"]

    admin.revoke_tokens()

    revoked = api.bulk([101], auth="", headers={"X-CAP-API-OAUTH-TOKEN": token})
    unknown = api.bulk([101], auth="", headers={"X-CAP-API-OAUTH-TOKEN": "a.b.c"})
    assert (revoked.status_code, unknown.status_code) == (401, 401)
    assert api.token().status_code == 200


def test_every_response_carries_a_unique_request_id(
    api: Capillary, admin: SandboxAdmin, sandbox: BackgroundSandbox
) -> None:
    admin.configure(rateLimitPerMinute=2)
    responses = [
        api.bulk([101]),
        api.raw_bulk(b"{"),
        api.bulk([101]),
        api.bulk([101], auth="Basic eDp5"),
        api.token(),
        api.get("/sandbox/stats", auth=""),
        api.get("/nowhere", auth=""),
    ]

    assert [r.status_code for r in responses] == [200, 400, 429, 401, 200, 200, 404]
    ids = [r.headers["X-Cap-Requestid"] for r in responses]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert admin.ledger()[0]["requestId"] == ids[0]


# --- bulk issue ----------------------------------------------------------------------------


def test_bulk_issue_returns_documented_coupon_and_records_ground_truth(
    api: Capillary, admin: SandboxAdmin
) -> None:
    metadata = {"sourceType": "Journeys", "sourceId": "evt-1", "sourceActivity": "Tier upgrade"}

    response = api.bulk([544770], {"id": "566881933"}, metadata=metadata, source="INSTORE")

    assert response.status_code == 200
    body = response.json()
    assert (body["totalCount"], body["failureCount"]) == (1, 0)
    entry = body["response"][0]
    assert (entry["entityId"], entry["errors"], entry["warnings"]) == (544770, [], [])
    coupon = entry["result"]
    assert re.fullmatch(r"[A-Z0-9]{10}", coupon["code"])
    assert coupon == {
        "id": coupon["id"],
        "code": coupon["code"],
        "seriesId": 544770,
        "description": "Sandbox series 544770",
        "discountCode": "TIER544770",
        "validTill": "2026-06-11T00:00:00Z",
        "validTillDateTime": "2026-06-11T23:59:59Z",
        "discountType": "ABS",
        "discountValue": 100.0,
        "discountUpto": 0.0,
        "discountOn": "BILL",
        "detailedInfo": {},
        "redemptionCount": 0,
    }
    assert admin.ledger() == [
        {
            "id": coupon["id"],
            "code": coupon["code"],
            "seriesId": 544770,
            "customerId": "566881933",
            "customer": {"id": "566881933"},
            "metadata": metadata,
            "source": "INSTORE",
            "issuedAt": "2026-05-12T10:00:00.000Z",
            "requestId": response.headers["X-Cap-Requestid"],
            "principal": "store.server",
            "validTill": "2026-06-11T00:00:00Z",
            "validTillDateTime": "2026-06-11T23:59:59Z",
        }
    ]


def test_coupon_ids_increase_and_codes_differ(api: Capillary) -> None:
    first = api.bulk([1, 2]).json()["response"]
    second = api.bulk([1]).json()["response"]

    coupons = [e["result"] for e in first + second]
    assert [c["id"] for c in coupons] == sorted({c["id"] for c in coupons})
    assert len({c["code"] for c in coupons}) == 3


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "Malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"customer": {"id": "1"}}', "seriesIds is required"),
        (b'{"seriesIds": [], "customer": {"id": "1"}}', "non-empty"),
        (b'{"seriesIds": 5, "customer": {"id": "1"}}', "non-empty"),
        (b'{"seriesIds": [1, "2"], "customer": {"id": "1"}}', "seriesIds[1]"),
        (b'{"seriesIds": [1.5], "customer": {"id": "1"}}', "seriesIds[0]"),
        (b'{"seriesIds": [true], "customer": {"id": "1"}}', "seriesIds[0]"),
        (b'{"seriesIds": [1]}', "customer is required"),
        (b'{"seriesIds": [1], "customer": {"name": "x"}}', "one of"),
        (
            b'{"seriesIds": [1], "customer": {"id": "1"}, "metadata": {"sourceActivity": "'
            + b"a" * 51
            + b'"}}',
            "metadata.sourceActivity exceeds 50",
        ),
        (
            b'{"seriesIds": [1], "customer": {"id": "1"}, "metadata": {"reason": "'
            + b"r" * 251
            + b'"}}',
            "metadata.reason exceeds 250",
        ),
        (b'{"seriesIds": [1], "customer": {"id": "1"}, "metadata": "x"}', "metadata must"),
    ],
)
def test_invalid_bulk_requests_get_400_with_precise_reason(
    api: Capillary, admin: SandboxAdmin, raw: bytes, reason: str
) -> None:
    response = api.raw_bulk(raw)

    assert response.status_code == 400
    body = response.json()
    assert body["response"] == []
    error = body["errors"][0]
    assert (error["status"], error["code"]) == (False, 400)
    assert reason in error["message"]
    assert admin.ledger() == []


def test_metadata_at_the_limits_is_accepted(api: Capillary) -> None:
    metadata = {"sourceActivity": "a" * 50, "notes": "n" * 250, "reason": "r" * 250}

    assert api.bulk([1], metadata=metadata).status_code == 200


def test_non_id_identifiers_map_to_stable_synthetic_ids(
    api: Capillary, admin: SandboxAdmin
) -> None:
    api.bulk([1], {"mobile": "919999999999"})
    api.bulk([1], {"email": "a@example.com"})
    api.bulk([1], {"mobile": "919999999999"})
    api.bulk([1], {"externalId": "ext-7"})
    api.bulk([1], {"id": "42", "mobile": "919999999999"})

    assert [c["customerId"] for c in admin.ledger()] == [
        "900000001",
        "900000002",
        "900000001",
        "900000003",
        "42",
    ]
    assert admin.ledger()[0]["customer"] == {"mobile": "919999999999"}


def test_unknown_customer_fails_every_entry_with_701(api: Capillary, admin: SandboxAdmin) -> None:
    admin.set_customer("c404", exists=False)

    response = api.bulk([1, 2], {"id": "c404"})

    assert response.status_code == 500
    assert response.json()["failureCount"] == 2
    assert entry_errors(response) == [(1, 701), (2, 701)]
    assert admin.ledger() == []

    admin.set_customer("c404", exists=True)
    assert api.bulk([1], {"id": "c404"}).status_code == 200


def test_series_behaviours_give_partial_success_201(api: Capillary, admin: SandboxAdmin) -> None:
    admin.set_series(2, behaviour="invalid")
    admin.set_series(3, behaviour="expired")
    admin.set_series(4, behaviour="error", errorCode=5005, errorMessage="Series code queue empty")

    response = api.bulk([1, 2, 3, 4])

    assert response.status_code == 201
    body = response.json()
    assert (body["totalCount"], body["failureCount"]) == (4, 3)
    assert entry_errors(response) == [(2, 707), (3, 712), (4, 5005)]
    failed = body["response"][3]
    assert failed["result"] is None
    assert failed["errors"] == [
        {"status": False, "code": 5005, "message": "Series code queue empty"}
    ]
    assert [c["seriesId"] for c in admin.ledger()] == [1]


def test_strict_series_refuses_unconfigured_series(api: Capillary, admin: SandboxAdmin) -> None:
    admin.configure(strictSeries=True)
    admin.set_series(1, description="Gold")

    response = api.bulk([1, 2])

    assert response.status_code == 201
    assert entry_errors(response) == [(2, 707)]


def test_max_per_user_refuses_with_5002(api: Capillary, admin: SandboxAdmin) -> None:
    admin.set_series(1, maxPerUser=1)

    first = api.bulk([1], {"id": "a"})
    second = api.bulk([1], {"id": "a"})
    other = api.bulk([1], {"id": "b"})

    assert (first.status_code, second.status_code, other.status_code) == (200, 500, 200)
    assert entry_errors(second) == [(1, 5002)]
    assert len(admin.ledger(customer="a")) == 1


def test_duplicate_series_ids_are_processed_once(api: Capillary, admin: SandboxAdmin) -> None:
    response = api.bulk([7, 8, 7])

    assert [e["entityId"] for e in response.json()["response"]] == [7, 8]
    assert response.json()["totalCount"] == 2
    assert [c["seriesId"] for c in admin.ledger()] == [7, 8]


def test_issue_on_error_issues_but_reports_748(api: Capillary, admin: SandboxAdmin) -> None:
    # Given a series whose coupon service "times out" after issuing
    admin.set_series(
        9,
        behaviour="error",
        errorCode=748,
        errorMessage="coupon service timed out",
        issueOnError=True,
    )

    # When a coupon is requested
    response = api.bulk([9])

    # Then the caller sees a failure but the coupon exists
    assert response.status_code == 500
    assert response.json()["response"][0]["result"] is None
    assert entry_errors(response) == [(9, 748)]
    assert len(admin.ledger(series=9)) == 1


def test_series_settings_shape_the_coupon(api: Capillary, admin: SandboxAdmin) -> None:
    admin.set_series(
        5,
        description="Gold 10%",
        discount_code="GOLD10",
        discount_type="PERC",
        discount_value=10,
        discount_upto=500,
        valid_days=1,
    )

    coupon = api.bulk([5]).json()["response"][0]["result"]

    assert (
        coupon["description"],
        coupon["discountCode"],
        coupon["discountType"],
        coupon["discountValue"],
        coupon["discountUpto"],
        coupon["validTill"],
    ) == ("Gold 10%", "GOLD10", "PERC", 10.0, 500.0, "2026-05-13T00:00:00Z")


@pytest.mark.parametrize(
    "case",
    [
        ("+00:00", START, "2026-06-11T00:00:00Z", "2026-06-11T23:59:59Z"),
        ("+05:30", START, "2026-06-11T05:30:00+05:30", "2026-06-11T23:59:59+05:30"),
        # 20:00 UTC is already the next day in India.
        (
            "+05:30",
            START.replace(hour=20),
            "2026-06-12T05:30:00+05:30",
            "2026-06-12T23:59:59+05:30",
        ),
        ("-03:00", START, "2026-06-10T21:00:00-03:00", "2026-06-11T23:59:59-03:00"),
    ],
    ids=["utc", "india", "india-next-day", "minus-three"],
)
def test_valid_till_follows_the_configured_time_zone(
    api: Capillary, admin: SandboxAdmin, clock: FakeClock, case: tuple[str, datetime, str, str]
) -> None:
    # validTill is the expiry date's UTC midnight shown in the zone, as the docs' India
    # example (05:30+05:30) shows; validTillDateTime is the end of that day in the zone.
    offset, wall, valid_till, valid_till_date_time = case
    admin.configure(timezone=offset)
    clock.set_wall(wall)

    coupon = api.bulk([1]).json()["response"][0]["result"]

    assert (coupon["validTill"], coupon["validTillDateTime"]) == (valid_till, valid_till_date_time)


# --- read-backs ----------------------------------------------------------------------------


def test_v2_coupon_readback_reflects_the_ledger(api: Capillary) -> None:
    metadata = {"sourceType": "Journeys", "sourceId": "evt-1", "notes": "n"}
    issued = api.bulk([1, 2], {"id": "c1"}, metadata=metadata).json()["response"]
    api.bulk([1], {"id": "other"})

    full = api.get("/v2/coupon", issuedToIds="c1", includeIssualDetails="true")
    bare = api.get("/v2/coupon", issuedToIds="c1")
    filtered = api.get("/v2/coupon", issuedToIds="c1", seriesId="2")

    assert full.status_code == 200
    data = full.json()["data"]
    assert full.json()["errors"] is None
    assert [(d["id"], d["code"], d["seriesId"]) for d in data] == [
        (e["result"]["id"], e["result"]["code"], e["entityId"]) for e in issued
    ]
    assert data[0]["issuedTo"] == "c1"
    assert data[0]["issuedDate"] == "2026-05-12T10:00:00Z"
    assert data[0]["validTill"] == issued[0]["result"]["validTill"]
    assert data[0]["validTillDateTime"] == issued[0]["result"]["validTillDateTime"]
    assert data[0]["couponIssualDetails"] == {
        "sourceType": "Journeys",
        "sourceId": "evt-1",
        "sourceActivity": None,
        "notes": "n",
        "reason": None,
    }
    assert "couponIssualDetails" not in bare.json()["data"][0]
    assert [d["seriesId"] for d in filtered.json()["data"]] == [2]


def test_v11_customer_coupons_readback(api: Capillary, clock: FakeClock) -> None:
    api.bulk([1], {"mobile": "911"})
    clock.advance(86_400)
    api.bulk([1, 2], {"mobile": "911"})

    by_mobile = api.get("/v1.1/customer/coupons", mobile="911", order_by="created_date")
    by_id = api.get(
        "/v1.1/customer/coupons",
        id="900000001",
        series_id="1",
        start_date="2026-05-13",
        order_by="created_date",
    )

    body = by_mobile.json()["response"]
    assert body["status"] == {"success": True, "code": 200, "message": "SUCCESS"}
    customer = body["customers"]["customer"][0]
    assert customer["id"] == "900000001"
    coupons = customer["coupons"]["coupon"]
    assert [(c["series_id"], c["created_date"]) for c in coupons] == [
        (1, "2026-05-12T10:00:00Z"),
        (1, "2026-05-13T10:00:00Z"),
        (2, "2026-05-13T10:00:00Z"),
    ]
    assert set(coupons[0]) == {"id", "code", "series_id", "created_date", "valid_till"}
    narrowed = by_id.json()["response"]["customers"]["customer"][0]["coupons"]["coupon"]
    assert [c["code"] for c in narrowed] == [coupons[1]["code"]]


def test_v2_customers_coupons_readback_paginates(api: Capillary) -> None:
    codes = [e["result"]["code"] for e in api.bulk([1, 2, 3], {"id": "c9"}).json()["response"]]

    page = api.get("/v2/customers/coupons", id="c9", limit="2", offset="1")

    customer = page.json()["customers"][0]
    assert customer["id"] == "c9"
    assert [c["code"] for c in customer["coupons"]] == codes[1:3]
    assert set(customer["coupons"][0]) == {
        "code",
        "seriesId",
        "createdDate",
        "validTill",
        "validTillDateTime",
    }


@pytest.mark.parametrize("path", ["/v2/coupon", "/v1.1/customer/coupons", "/v2/customers/coupons"])
def test_readbacks_need_auth_and_valid_queries(
    api: Capillary, admin: SandboxAdmin, path: str
) -> None:
    assert api.get(path, auth="", id="c1", issuedToIds="c1").status_code == 401
    assert api.get(path).status_code == 400
    assert admin.stats()["calls"]["readback"] == 2


# --- rate limit ----------------------------------------------------------------------------


def test_rate_limit_is_per_principal_per_rolling_minute(
    api: Capillary, admin: SandboxAdmin, clock: FakeClock
) -> None:
    # Given two calls a minute for each principal
    admin.configure(rateLimitPerMinute=2)
    assert api.bulk([1]).status_code == 200
    clock.advance(10)
    assert api.get("/v2/coupon", issuedToIds="c1").status_code == 200
    tokens = [api.token().json()["data"]["accessToken"] for _ in range(3)]  # not rate-limited

    # When the same principal calls a third time within the minute
    clock.advance(5)
    refused = api.bulk([1])

    # Then it is refused until the oldest call leaves the window, and nothing is issued
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "45"
    assert refused.json()["errors"][0]["code"] == 429
    assert len(admin.ledger()) == 1
    # ... while another principal still has its own budget
    oauth = {"X-CAP-API-OAUTH-TOKEN": tokens[-1]}
    assert [api.bulk([1], auth="", headers=oauth).status_code for _ in range(3)] == [200, 200, 429]
    clock.advance(45)
    assert api.bulk([1]).status_code == 200
    assert api.bulk([1]).status_code == 429
    assert admin.stats()["rateLimited"] == 3
    admin.configure(rate_limit_per_minute=None)
    assert api.bulk([1]).status_code == 200


def test_rate_limit_from_start_options() -> None:
    clock = FakeClock()
    state = SandboxState(
        SandboxOptions(rate_limit_per_minute=1), clock=clock.now, monotonic=clock.monotonic
    )

    assert state.take_rate_slot("k") is None
    clock.advance(59.5)
    assert state.take_rate_slot("k") == 1
    clock.advance(0.5)
    assert state.take_rate_slot("k") is None


# --- faults --------------------------------------------------------------------------------


def test_latency_fault_delays_then_answers(api: Capillary, admin: SandboxAdmin) -> None:
    admin.add_fault(kind="latency", delay_seconds=0.3)

    started = time.perf_counter()
    slow = api.bulk([1])
    slow_s = time.perf_counter() - started
    started = time.perf_counter()
    api.bulk([1])
    fast_s = time.perf_counter() - started

    assert slow.status_code == 200
    assert slow_s >= 0.3 > fast_s
    assert len(admin.ledger()) == 2


def test_a_held_call_does_nothing_until_released(api: Capillary, admin: SandboxAdmin) -> None:
    import threading

    admin.add_fault(kind="hold")
    answers: list[requests.Response] = []
    caller = threading.Thread(target=lambda: answers.append(api.bulk([1])))
    caller.start()
    deadline = time.monotonic() + 5
    while admin.held() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    # Held: nothing issued, nothing answered
    assert admin.held() == 1 and admin.ledger() == [] and not answers
    assert admin.release() == 1
    caller.join(5)
    assert answers[0].status_code == 200 and len(admin.ledger()) == 1
    assert admin.held() == 0 and admin.release() == 0


def test_a_held_call_goes_on_after_its_delay(api: Capillary, admin: SandboxAdmin) -> None:
    admin.add_fault(kind="hold", delay_seconds=0.2)
    assert api.bulk([1]).status_code == 200 and admin.held() == 0


def test_global_latency_applies_to_every_call(api: Capillary, admin: SandboxAdmin) -> None:
    admin.configure(latencySeconds=0.2)

    started = time.perf_counter()
    api.get("/v2/coupon", issuedToIds="c1")
    api.token()
    elapsed_s = time.perf_counter() - started

    assert elapsed_s >= 0.4


def test_error_before_answers_status_and_issues_nothing(
    api: Capillary, admin: SandboxAdmin
) -> None:
    admin.add_fault(kind="error_before", status=503)

    response = api.bulk([1])

    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == 503
    assert admin.ledger() == []
    assert api.bulk([1]).status_code == 200


def test_error_after_issues_then_answers_empty_500(api: Capillary, admin: SandboxAdmin) -> None:
    admin.add_fault(kind="error_after")

    response = api.bulk([1])

    assert response.status_code == 500
    assert response.content == b""
    assert len(admin.ledger()) == 1


def test_empty_500_before_issues_nothing(api: Capillary, admin: SandboxAdmin) -> None:
    admin.add_fault(kind="empty_500_before")

    response = api.bulk([1])

    assert (response.status_code, response.content) == (500, b"")
    assert admin.ledger() == []


def test_stall_after_issues_then_outlasts_the_client_timeout(
    api: Capillary, admin: SandboxAdmin
) -> None:
    admin.add_fault(kind="stall_after", delay_seconds=1.0)

    with pytest.raises(requests.ReadTimeout):
        api.bulk([1], timeout_s=0.3)

    assert len(admin.ledger()) == 1
    assert admin.calls()[-1]["status"] == 200


def test_rate_limit_fault_answers_429_with_retry_after(api: Capillary, admin: SandboxAdmin) -> None:
    admin.add_fault(kind="rate_limit", retry_after_seconds=7)

    response = api.bulk([1])

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert admin.ledger() == []
    assert admin.stats()["rateLimited"] == 1


def test_busy_521_fault(api: Capillary, admin: SandboxAdmin) -> None:
    admin.add_fault(kind="busy_521")

    response = api.bulk([1])

    assert response.status_code == 521
    assert response.json()["errors"][0] == {
        "code": 521,
        "message": "Multiple actions are running for the same customer, try later",
    }
    assert admin.ledger() == []


def _raw_bulk_over_socket(base_url: str) -> bytes:
    """Send one bulk call on a raw socket; returns what came back before EOF."""
    parts = urlsplit(base_url)
    body = json.dumps({"seriesIds": [1], "customer": {"id": "c1"}}).encode()
    head = (
        f"POST {BULK} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: {BASIC}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize(("kind", "issued"), [("reset_before", 0), ("reset_after", 1)])
def test_reset_faults_abort_the_connection_with_rst(
    admin: SandboxAdmin, sandbox: BackgroundSandbox, kind: str, issued: int
) -> None:
    admin.add_fault(kind=kind)

    # A RST (not a FIN) surfaces as ECONNRESET rather than a clean end of stream.
    with pytest.raises(ConnectionResetError):
        _raw_bulk_over_socket(sandbox.url)

    assert len(admin.ledger()) == issued
    assert admin.calls()[-1]["status"] == 0


def test_reset_fault_surfaces_as_connection_error_to_requests(
    api: Capillary, admin: SandboxAdmin
) -> None:
    admin.add_fault(kind="reset_after")

    with pytest.raises(requests.ConnectionError):
        api.bulk([1])

    assert len(admin.ledger()) == 1


def test_fault_matching_by_series_customer_path_and_times(
    api: Capillary, admin: SandboxAdmin
) -> None:
    # Given rules narrowed by series, by customer, by path, and one that fires twice
    admin.add_fault(kind="error_before", status=502, series=2)
    admin.add_fault(kind="error_before", status=503, customer="vip")
    admin.add_fault(kind="error_before", status=504, path="readback")
    admin.add_fault(kind="busy_521", path="token", times=2)

    # Then each fires only on matching calls, once per use
    assert api.bulk([1], {"id": "x"}).status_code == 200
    assert api.bulk([1], {"id": "vip"}).status_code == 503
    assert api.bulk([1], {"id": "vip"}).status_code == 200
    assert api.bulk([3, 2], {"id": "x"}).status_code == 502
    assert api.get("/v2/coupon", issuedToIds="x").status_code == 504
    assert [api.token().status_code for _ in range(3)] == [521, 521, 200]
    assert [f["times"] for f in admin.faults()] == [0, 0, 0, 0]
    assert [f["applied"] for f in admin.faults()] == [1, 1, 1, 2]


def test_forever_fault_until_cleared_and_any_path(api: Capillary, admin: SandboxAdmin) -> None:
    admin.add_fault(kind="empty_500_before", path="any", times=-1)

    statuses = [api.bulk([1]).status_code, api.token().status_code, api.bulk([1]).status_code]
    admin.clear_faults()

    assert statuses == [500, 500, 500]
    assert api.bulk([1]).status_code == 200
    assert admin.faults() == []


def test_a_fault_with_a_probability_strikes_some_calls_and_spares_the_rest(
    api: Capillary, admin: SandboxAdmin
) -> None:
    # Given a forever rule that strikes 30% of calls, then one that strikes every call
    admin.add_fault(kind="error_before", status=503, times=-1, probability=0.3)
    admin.add_fault(kind="error_before", status=502, times=-1)

    # When 200 calls are made
    statuses = [api.bulk([1]).status_code for _ in range(200)]

    # Then the first rule struck about 30% of them (the bounds are 5 standard deviations
    # wide) and every call it spared went on to the next rule, not through
    struck = statuses.count(503)
    assert 28 <= struck <= 92, struck
    assert statuses.count(502) == 200 - struck
    first, second = admin.faults()
    assert (first["applied"], first["probability"]) == (struck, 0.3)
    assert (second["applied"], second["probability"]) == (200 - struck, 1.0)
    assert admin.ledger() == []


def test_seeded_sandboxes_strike_the_same_calls_again_after_a_reset() -> None:
    def pattern(state: SandboxState) -> list[bool]:
        state.add_fault({"kind": "reset_after", "times": -1, "probability": 0.5})
        return [state.take_fault("bulk", (1,), "c1") is not None for _ in range(64)]

    seeded = SandboxState(SandboxOptions(seed=7))
    first = pattern(seeded)
    seeded.reset()

    assert pattern(seeded) == first
    assert pattern(SandboxState(SandboxOptions(seed=7))) == first
    assert pattern(SandboxState(SandboxOptions(seed=8))) != first
    assert 10 < sum(first) < 54


@pytest.mark.parametrize("probability", [0, -0.5, 1.5, "often", True])
def test_a_probability_outside_0_to_1_is_refused(admin: SandboxAdmin, probability: object) -> None:
    with pytest.raises(SandboxAdminError, match="probability"):
        admin.add_fault(kind="error_before", probability=probability)
    assert admin.faults() == []


def test_resolved_customer_id_matches_customer_faults(api: Capillary, admin: SandboxAdmin) -> None:
    api.bulk([1], {"mobile": "911"})
    admin.add_fault(kind="error_before", customer="900000001")

    assert api.bulk([1], {"mobile": "911"}).status_code == 500


# --- admin API -----------------------------------------------------------------------------


def test_admin_refuses_bad_commands(admin: SandboxAdmin) -> None:
    with pytest.raises(SandboxAdminError, match="unknown config"):
        admin.configure(latencySecs=1)
    with pytest.raises(SandboxAdminError, match="behaviour"):
        admin.set_series(1, behaviour="sometimes")
    with pytest.raises(SandboxAdminError, match="kind"):
        admin.add_fault(kind="meteor")
    with pytest.raises(SandboxAdminError, match="a redirect's status is a 3xx"):
        admin.add_fault(kind="redirect_after", status=500)
    with pytest.raises(SandboxAdminError, match="timezone"):
        admin.configure(timezone="IST")


def test_reset_forgets_everything_since_start(
    api: Capillary, admin: SandboxAdmin, clock: FakeClock
) -> None:
    # Given a sandbox that has been used and reconfigured
    token = api.token().json()["data"]["accessToken"]
    api.bulk([1], {"mobile": "911"})
    admin.configure(rateLimitPerMinute=5, timezone="+05:30")
    admin.set_series(1, behaviour="expired")
    admin.set_customer("c1", exists=False)
    admin.add_fault(kind="busy_521", times=-1)

    # When it is reset
    admin.reset()

    # Then ledger, calls, faults, tokens, registry and settings are back to the start
    assert admin.ledger() == []
    assert admin.calls() == []
    assert admin.faults() == []
    assert admin.config() == {
        "latencySeconds": 0.0,
        "rateLimitPerMinute": None,
        "tokenTtlSeconds": 300,
        "timezone": "+00:00",
        "strictSeries": False,
        "shuffleEntries": False,
        "readbackLagSeconds": 0.0,
        "oneActionPerCustomer": False,
    }
    assert api.bulk([1], auth="", headers={"X-CAP-API-OAUTH-TOKEN": token}).status_code == 401
    assert api.bulk([1], {"id": "c1"}).status_code == 200
    api.bulk([1], {"email": "e@x"})
    assert admin.ledger()[-1]["customerId"] == "900000001"


def test_calls_log_and_stats(api: Capillary, admin: SandboxAdmin, clock: FakeClock) -> None:
    api.bulk([1, 2], {"id": "c1"})
    clock.advance(5)
    since = clock.now().timestamp()
    api.bulk([3], {"id": "c2"}, auth="Basic eDp5")
    api.get("/v2/coupon", issuedToIds="c1")
    api.token()

    later = admin.calls(since=since)

    assert [(c["path"], c["status"], c["principal"]) for c in later] == [
        ("bulk", 401, None),
        ("readback", 200, "store.server"),
        ("token", 200, "demo-key"),
    ]
    assert admin.calls()[0]["seriesIds"] == [1, 2]
    assert admin.calls()[0]["customerId"] == "c1"
    assert later[0]["t"] == since
    assert admin.stats() == {
        "calls": {"bulk": 2, "readback": 1, "token": 1},
        "statuses": {"200": 3, "401": 1},
        "issued": 2,
        "rateLimited": 0,
    }


def test_call_log_is_bounded() -> None:
    state = SandboxState(call_log_limit=3)

    for n in range(5):
        state.record_call(
            "token", 200, principal=None, series_ids=(), customer_id=None, request_id=str(n)
        )

    assert [c["requestId"] for c in state.calls()] == ["2", "3", "4"]
    assert state.stats()["calls"]["token"] == 5


def test_scenario_applies_at_start_and_after_reset(tmp_path: Path) -> None:
    # Given a scenario file
    path = tmp_path / "scenario.json"
    path.write_text(
        json.dumps(
            {
                "series": {"544770": {"behaviour": "expired"}, "553379": {"maxPerUser": 1}},
                "unknownCustomers": ["ghost"],
                "config": {"timezone": "+05:30"},
            }
        )
    )
    options = SandboxOptions(scenario=load_scenario(path))

    # When a sandbox starts with it
    with BackgroundSandbox(options) as sandbox, SandboxAdmin(sandbox.url) as admin:
        api = Capillary(sandbox.url)
        try:
            for _ in range(2):
                # Then its series, customers and config are in force, also after a reset
                first = api.bulk([544770, 553379])
                second = api.bulk([553379])
                ghost = api.bulk([1], {"id": "ghost"})
                admin.reset()
                assert entry_errors(first) == [(544770, 712)]
                assert entry_errors(second) == [(553379, 5002)]
                assert entry_errors(ghost) == [(1, 701)]
                assert first.json()["response"][1]["result"]["validTill"].endswith("+05:30")
        finally:
            api.close()


def test_invalid_scenarios_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"series": {"abc": {}}}')

    with pytest.raises(SandboxInputError, match="series id"):
        load_scenario(path)
    with pytest.raises(SandboxInputError, match="unknown series"):
        SandboxState(SandboxOptions(scenario={"series": {"1": {"colour": "red"}}}))


def test_run_serves_until_sigterm() -> None:
    # Given the blocking entry point in a child process on a free port
    code = (
        "from coupon_devtools.sandbox.server import run; "
        "from coupon_devtools.sandbox.config import SandboxOptions; "
        "run('127.0.0.1', 0, SandboxOptions())"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()

            # Then it announces itself once ready, and serves
            match = re.fullmatch(r"sandbox listening on (http://127\.0\.0\.1:\d+)", line)
            assert match is not None, line
            with SandboxAdmin(match.group(1)) as admin:
                admin.wait_ready(timeout_s=5)
                assert admin.health()

            # When it is sent SIGTERM, it exits cleanly
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_sandbox_command_serves_https_with_a_ca_of_its_own(tmp_path: Path) -> None:
    # Given `coupon-worker sandbox --tls-dir DIR` on a free port
    command = Path(sys.executable).with_name("coupon-worker")
    with subprocess.Popen(
        [str(command), "sandbox", "--port", "0", "--tls-dir", str(tmp_path / "tls")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ca_line, listening = proc.stdout.readline().strip(), proc.stdout.readline().strip()
            # Then it tells where its CA's certificate is, and serves HTTPS with it
            ca_file = tmp_path / "tls" / "sandbox-ca.pem"
            assert str(ca_file) in ca_line and ca_file.exists(), ca_line
            match = re.fullmatch(r"sandbox listening on (https://127\.0\.0\.1:\d+)", listening)
            assert match is not None, listening
            with SandboxAdmin(match.group(1), ca_file=str(ca_file)) as admin:
                admin.wait_ready(timeout_s=5)
                assert admin.health()
            # And a client that does not trust that CA is refused
            with pytest.raises(requests.exceptions.SSLError):
                requests.get(match.group(1) + "/sandbox/health", timeout=5,
                             verify=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
