"""The Capillary client against the sandbox over real HTTP: auth, parsing, classification."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from coupon_devtools.sandbox import BackgroundSandbox, SandboxAdmin
from worker.adapters.capillary.auth import BasicAuth, OAuthTokens, basic_auth_header
from worker.adapters.capillary.client import CapillaryClient
from worker.config import Settings
from worker.domain.errors import Ambiguous, CapillaryError, Outage
from worker.domain.model import Verdict

CUSTOMER = {"id": "566881933"}
META = {"sourceType": "Journeys", "notes": "[cw:abc]"}


def test_basic_auth_header_matches_the_documented_test_vector() -> None:
    header = basic_auth_header("store.server", SecretStr("server123"))
    assert header == "Basic c3RvcmUuc2VydmVyOjhhMTZhNmI3MDUwNWViMWYxZmY3Y2RjMGNkNTU1OWE3"


def test_credentials_never_show_in_reprs() -> None:
    assert "server123" not in repr(BasicAuth("store.server", SecretStr("server123")))


@pytest.fixture
def client(settings: Settings, sandbox: SandboxAdmin) -> CapillaryClient:
    return CapillaryClient.from_settings(settings)


@pytest.fixture
def oauth_client(settings_factory: Callable[..., Settings],
                 sandbox: SandboxAdmin) -> CapillaryClient:
    settings = settings_factory(capillary_username=None, capillary_password=None,
                                capillary_oauth_key="demo-key",
                                capillary_oauth_secret="demo-secret")
    return CapillaryClient.from_settings(settings)


def test_basic_auth_issues_and_parses_coupons(client: CapillaryClient,
                                              sandbox: SandboxAdmin) -> None:
    sandbox.configure(timezone="+05:30")
    result = client.bulk_issue(CUSTOMER, [544770, 553379], META)
    assert result.call.status == 200 and result.call.request_id
    coupon = result.entries[544770].coupon
    assert coupon is not None and result.entries[544770].verdict is Verdict.ISSUED
    assert coupon.valid_till is not None and coupon.valid_till.utcoffset() == timedelta(hours=5.5)
    assert coupon.valid_till_date_time is not None
    assert coupon.valid_till_date_time.tzinfo is not None
    assert coupon.discount_type == "ABS" and coupon.discount_value is not None
    assert {c["code"] for c in sandbox.ledger()} == {
        e.coupon.code for e in result.entries.values() if e.coupon}


def test_wrong_basic_credentials_are_an_outage(settings_factory: Callable[..., Settings],
                                               sandbox: SandboxAdmin) -> None:
    client = CapillaryClient.from_settings(settings_factory(capillary_password="wrong"))
    result = client.bulk_issue(CUSTOMER, [1], META)
    assert result.call.status == 401 and result.entries[1].verdict is Verdict.OUTAGE
    assert sandbox.ledger() == []


def test_oauth_generates_caches_and_renews_on_401(oauth_client: CapillaryClient,
                                                  sandbox: SandboxAdmin) -> None:
    auth = oauth_client.auth
    assert isinstance(auth, OAuthTokens)
    assert oauth_client.bulk_issue(CUSTOMER, [1], META).entries[1].verdict is Verdict.ISSUED
    assert oauth_client.bulk_issue(CUSTOMER, [2], META).entries[2].verdict is Verdict.ISSUED
    assert auth.generated == 1, "the token is cached"
    sandbox.revoke_tokens()
    assert oauth_client.bulk_issue(CUSTOMER, [3], META).entries[3].verdict is Verdict.ISSUED
    assert auth.generated == 2, "a 401 renews the token once and the call goes through"
    assert len(sandbox.ledger()) == 3


def test_oauth_renews_before_expiry(sandbox: SandboxAdmin, settings: Settings) -> None:
    now = [0.0]
    client = CapillaryClient(settings.capillary_base_url)
    auth = OAuthTokens(settings.capillary_base_url, "demo-key", SecretStr("demo-secret"),
                       session_factory=client.session, timeout_s=(1, 2), clock=lambda: now[0])
    client.auth = auth
    sandbox.configure(token_ttl_seconds=100)
    first = auth.token()
    now[0] = 70.0  # 30 s of life left: still more than the 20% margin
    assert auth.token() == first
    now[0] = 85.0  # inside the last 20%: renewed before it expires
    assert auth.token() != first and auth.generated == 2


def test_bad_oauth_secret_is_an_outage(settings_factory: Callable[..., Settings],
                                       sandbox: SandboxAdmin) -> None:
    client = CapillaryClient.from_settings(settings_factory(
        capillary_username=None, capillary_password=None, capillary_oauth_key="demo-key",
        capillary_oauth_secret="nope"))
    result = client.bulk_issue(CUSTOMER, [1], META)
    assert result.entries[1].verdict is Verdict.OUTAGE
    assert "OAuth" in (result.call.error_message or "")


@pytest.mark.parametrize(
    ("series", "behaviour", "code", "verdict"),
    [
        (707, {"behaviour": "invalid"}, "707", Verdict.PERMANENT),
        (712, {"behaviour": "expired"}, "712", Verdict.PERMANENT),
        (730, {"behaviour": "error", "error_code": 730}, "730", Verdict.RETRYABLE),
        (777, {"behaviour": "error", "error_code": 777}, "777", Verdict.OUTAGE),
        (748, {"behaviour": "error", "error_code": 748}, "748", Verdict.AMBIGUOUS),
    ],
)
def test_partial_answers_are_read_entry_by_entry(
    client: CapillaryClient, sandbox: SandboxAdmin, series: int, behaviour: dict[str, object],
    code: str, verdict: Verdict,
) -> None:
    sandbox.set_series(series, **behaviour)
    result = client.bulk_issue(CUSTOMER, [544770, series], META)
    assert result.call.status == 201
    assert result.entries[544770].verdict is Verdict.ISSUED
    failed = result.entries[series]
    assert failed.verdict is verdict and failed.error is not None and failed.error.code == code


def test_unknown_customer_and_limit_per_user(client: CapillaryClient,
                                             sandbox: SandboxAdmin) -> None:
    sandbox.set_customer("404", exists=False)
    result = client.bulk_issue({"id": "404"}, [1, 2], META)
    assert result.call.status == 500
    assert {e.error.code for e in result.entries.values() if e.error} == {"701"}
    sandbox.set_series(9, max_per_user=1)
    assert client.bulk_issue(CUSTOMER, [9], META).entries[9].verdict is Verdict.ISSUED
    second = client.bulk_issue(CUSTOMER, [9], META).entries[9]
    assert second.verdict is Verdict.PERMANENT and second.error and second.error.code == "5002"


@pytest.mark.parametrize(
    ("fault", "verdict", "code", "issued"),
    [
        # Any 5xx is unknown, whether the server issued or not, whatever its body says.
        ({"kind": "error_before", "status": 500}, Verdict.AMBIGUOUS, "http_500", 0),
        ({"kind": "empty_500_before"}, Verdict.AMBIGUOUS, "http_500", 0),
        ({"kind": "error_after"}, Verdict.AMBIGUOUS, "http_500", 1),
        ({"kind": "error_json_after"}, Verdict.AMBIGUOUS, "http_500", 1),
        ({"kind": "error_json_after", "status": 503}, Verdict.AMBIGUOUS, "http_503", 1),
        ({"kind": "html_after", "status": 502}, Verdict.AMBIGUOUS, "http_502", 1),
        ({"kind": "stall_after", "delay_seconds": 4}, Verdict.AMBIGUOUS, "read_timeout", 1),
        ({"kind": "busy_521"}, Verdict.AMBIGUOUS, "http_521", 0),
        # A 4xx refuses the request itself: provably not issued.
        ({"kind": "error_before", "status": 400}, Verdict.PERMANENT, "http_400", 0),
        # From a gateway or proxy on the way: its own refusals are not the request's fault.
        ({"kind": "error_before", "status": 407}, Verdict.OUTAGE, "http_407", 0),
        ({"kind": "error_before", "status": 421}, Verdict.RETRYABLE, "http_421", 0),
        ({"kind": "error_before", "status": 408}, Verdict.AMBIGUOUS, "http_408", 0),
        ({"kind": "rate_limit", "retry_after_seconds": 7}, Verdict.RETRYABLE, "http_429", 0),
        ({"kind": "reset_before"}, Verdict.AMBIGUOUS, "connection_reset", 0),
        ({"kind": "reset_after"}, Verdict.AMBIGUOUS, "connection_reset", 1),
        # Bytes that are no answer, from a middlebox: the HTTP parser gives up after sending.
        ({"kind": "garbled_after"}, Verdict.AMBIGUOUS, "connection_reset", 1),
        # A redirect is an answer, not an order to send the same issue call again.
        ({"kind": "redirect_after"}, Verdict.AMBIGUOUS, "http_307", 1),
        ({"kind": "redirect_after", "status": 308}, Verdict.AMBIGUOUS, "http_308", 1),
    ],
)
def test_faults_are_classified_by_whether_the_request_can_have_issued(
    client: CapillaryClient, sandbox: SandboxAdmin, fault: dict[str, object],
    verdict: Verdict, code: str, issued: int,
) -> None:
    sandbox.add_fault(**fault)
    result = client.bulk_issue(CUSTOMER, [544770], META)
    entry = result.entries[544770]
    assert entry.verdict is verdict
    assert entry.error is not None and entry.error.code == code
    assert result.call_level_failure
    assert len(sandbox.ledger()) == issued
    assert len([c for c in sandbox.calls() if c["path"] == "bulk"]) == 1, "sent once"
    if fault["kind"] == "rate_limit":
        assert result.retry_after_s == 7


def tls_client(settings_factory: Callable[..., Settings], server: BackgroundSandbox,
               monkeypatch: pytest.MonkeyPatch, *, trusted: bool = True) -> CapillaryClient:
    if trusted:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca_file))
    else:
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    return CapillaryClient.from_settings(settings_factory(capillary_base_url=server.url))


def test_a_tls_stream_broken_after_sending_is_unknown_not_unsent(
    settings_factory: Callable[..., Settings], tls_sandbox_server: BackgroundSandbox,
    tls_sandbox: SandboxAdmin, monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = tls_client(settings_factory, tls_sandbox_server, monkeypatch)
    assert client.bulk_issue(CUSTOMER, [553379], META).entries[553379].verdict is Verdict.ISSUED
    # Given a middlebox that mangles the TLS stream once the server has issued
    tls_sandbox.add_fault(kind="garbled_after")
    entry = client.bulk_issue(CUSTOMER, [544770], META).entries[544770]
    # Then the call is unknown (read back before any retry), not "never sent"
    assert entry.verdict is Verdict.AMBIGUOUS
    assert entry.error is not None and entry.error.code == "tls_dropped"
    assert len(tls_sandbox.ledger()) == 2


def test_a_refused_certificate_is_retryable_as_nothing_was_sent(
    settings_factory: Callable[..., Settings], tls_sandbox_server: BackgroundSandbox,
    tls_sandbox: SandboxAdmin, monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = tls_client(settings_factory, tls_sandbox_server, monkeypatch, trusted=False)
    entry = client.bulk_issue(CUSTOMER, [544770], META).entries[544770]
    assert entry.verdict is Verdict.RETRYABLE
    assert entry.error is not None and entry.error.code == "tls_error"
    assert tls_sandbox.calls() == [] and tls_sandbox.ledger() == []


def test_a_ca_bundle_that_cannot_be_read_is_an_outage_and_sends_nothing(
    settings_factory: Callable[..., Settings], tls_sandbox_server: BackgroundSandbox,
    tls_sandbox: SandboxAdmin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # Given an operator's REQUESTS_CA_BUNDLE that names no file (requests raises a bare OSError)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing-ca.pem"))
    client = CapillaryClient.from_settings(
        settings_factory(capillary_base_url=tls_sandbox_server.url))
    result = client.bulk_issue(CUSTOMER, [544770], META)
    entry = result.entries[544770]
    # Then the call is an outage (the circuit pauses issuance), not an error of the event
    assert entry.verdict is Verdict.OUTAGE and result.call_level_failure
    assert entry.error is not None and entry.error.code == "client_config"
    assert "missing-ca.pem" in entry.error.message
    assert tls_sandbox.calls() == []


def test_connection_refused_is_retryable() -> None:
    client = CapillaryClient("http://127.0.0.1:9", auth=None, connect_timeout_s=1)
    entry = client.bulk_issue(CUSTOMER, [1], META).entries[1]
    assert entry.verdict is Verdict.RETRYABLE and entry.error and \
        entry.error.code == "connection_refused"


def test_a_call_and_its_entries_carry_the_one_error_shape(client: CapillaryClient,
                                                         sandbox: SandboxAdmin) -> None:
    # Given a call that fails before an answer, and one Capillary refuses per entry
    unsent = CapillaryClient("http://127.0.0.1:9", auth=None, connect_timeout_s=1)
    failed = unsent.bulk_issue(CUSTOMER, [1, 2], META)
    sandbox.set_series(707, behaviour="invalid")
    refused = client.bulk_issue(CUSTOMER, [707], META)

    # Then the call's error is the entries' error, code and message and verdict alike: what
    # api_calls and entities store, and what the command line and the console describe
    for result in (failed, refused):
        entry = next(iter(result.entries.values()))
        assert result.call.error is not None and result.call.error == entry.error
        assert (result.call.error_code, result.call.error_message) \
            == (entry.error.code, entry.error.message)


def test_read_back_finds_our_coupon_by_reference(client: CapillaryClient) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    issued = client.bulk_issue(CUSTOMER, [544770], {"notes": "Gold [cw:0123456789abcdef]"})
    code = issued.entries[544770].coupon.code  # type: ignore[union-attr]
    found = client.find_coupons(CUSTOMER, 544770, since)
    assert [f.coupon.code for f in found.coupons] == [code]
    assert "[cw:0123456789abcdef]" in found.coupons[0].issual_details["notes"]
    assert client.find_coupons(CUSTOMER, 553379, since).coupons == ()
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert client.find_coupons(CUSTOMER, 544770, later).coupons == ()


def test_read_back_by_mobile_resolves_the_customer(client: CapillaryClient) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    customer = {"mobile": "919876543210"}
    client.bulk_issue(customer, [544770], {"notes": "[cw:feedfacefeedface]"})
    found = client.find_coupons(customer, 544770, since)
    assert len(found.coupons) == 1


def test_a_slow_original_lands_after_the_client_gave_up(client: CapillaryClient,
                                                        sandbox: SandboxAdmin) -> None:
    sandbox.add_fault(kind="slow_original", delay_seconds=3)
    result = client.bulk_issue(CUSTOMER, [544770], META)
    assert result.entries[544770].verdict is Verdict.AMBIGUOUS
    assert sandbox.ledger() == [], "not yet: the client's read timeout came first"
    deadline = time.monotonic() + 5
    while not sandbox.ledger() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(sandbox.ledger()) == 1, "the abandoned request still issued"


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "readback_unreadable", "path": "readback"},
        {"kind": "readback_failure_status", "path": "readback"},
        {"kind": "error_before", "status": 500, "path": "readback"},
        {"kind": "error_before", "status": 404, "path": "readback"},
        {"kind": "empty_500_before", "path": "readback"},
        {"kind": "reset_before", "path": "readback"},
    ],
)
def test_a_read_back_that_proves_nothing_fails_closed(
    client: CapillaryClient, sandbox: SandboxAdmin, fault: dict[str, object],
) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    client.bulk_issue(CUSTOMER, [544770], {"notes": "[cw:0123456789abcdef]"})
    sandbox.add_fault(**fault)
    with pytest.raises(CapillaryError) as caught:
        client.find_coupons(CUSTOMER, 544770, since)
    assert not isinstance(caught.value, Outage)


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "readback_failure_status", "path": "readback"},
        {"kind": "readback_stale", "path": "readback", "times": 2},
        {"kind": "readback_unreadable", "path": "readback"},
    ],
)
def test_a_customer_that_cannot_be_resolved_fails_closed(
    client: CapillaryClient, sandbox: SandboxAdmin, fault: dict[str, object],
) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    customer = {"mobile": "919876543210"}
    client.bulk_issue(customer, [544770], {"notes": "[cw:feedfacefeedface]"})
    sandbox.add_fault(**fault)
    if fault["kind"] == "readback_stale":
        # A replica that knows the customer but not the coupon: the customer resolves, and
        # the read-back is what the settle window is there for.
        assert client.find_coupons(customer, 544770, since).coupons == ()
        return
    with pytest.raises(Ambiguous):
        client.find_coupons(customer, 544770, since)


def test_the_read_back_reads_every_page(client: CapillaryClient, sandbox: SandboxAdmin) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    for _ in range(130):
        client.bulk_issue(CUSTOMER, [544770], {"notes": "someone else's"})
    ours = client.bulk_issue(CUSTOMER, [544770], {"notes": "[cw:0123456789abcdef.0a0b0c]"})
    found = client.find_coupons(CUSTOMER, 544770, since)
    assert len(found.coupons) == 131, "the sandbox serves 50 a page: three pages and an end"
    assert ours.entries[544770].coupon is not None
    assert ours.entries[544770].coupon.code in {f.coupon.code for f in found.coupons}


def test_the_proxy_environment_is_read_once_when_the_session_is_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a proxy in the environment when the client's session is made
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    session = CapillaryClient("https://eu.api.capillarytech.com").session()
    # Then the session keeps it, and no longer reads the environment on each call
    assert session.proxies["https"] == "http://proxy.example:3128"
    assert session.trust_env is False
    # And a host named in NO_PROXY gets none
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert "http" not in CapillaryClient("http://127.0.0.1:9").session().proxies
