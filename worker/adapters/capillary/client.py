"""The real Capillary client: pooled HTTP, timeouts, auth, and answers turned into verdicts.

Every call is measured and returns a ``CallInfo`` with Capillary's ``X-Cap-Requestid`` so the
ledger can store it. Transport failures are classified by whether the request can have reached
the server: a refused connection is retryable, a read timeout or a reset is ambiguous. A
redirect is an answer, never followed: following a 307 or 308 would send the same bulk issue a
second time, on the HTTP library's say-so.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import requests
from urllib3.exceptions import NewConnectionError
from urllib3.util.ssl_match_hostname import CertificateError

from worker import tracing
from worker.adapters.capillary.answers import (
    call_level_message,
    int_or_none,
    parse_bulk_answer,
    parse_coupon,
    parse_timestamp,
)
from worker.adapters.capillary.api import (
    BulkIssueResult,
    CallInfo,
    EntryOutcome,
    FoundCoupon,
    ReadBack,
)
from worker.adapters.capillary.auth import BasicAuth, CapillaryAuth, OAuthTokens
from worker.adapters.capillary.transport import CallDeadlines, DeadlineAdapter
from worker.config import Settings, org_timezone
from worker.domain.errors import Ambiguous, CapillaryError, Outage, Retryable
from worker.domain.model import EntryError, Verdict
from worker.domain.text import storable, storable_json
from worker.domain.verdicts import CLIENT_CONFIG, classify_transport
from worker.secret_files import Secret

log = logging.getLogger(__name__)

BULK_ISSUE_PATH = "/v2/coupon/bulk/issue"
COUPON_READ_PATH = "/v2/coupon"
CUSTOMER_COUPONS_V11_PATH = "/v1.1/customer/coupons"
REQUEST_ID_HEADER = "X-Cap-Requestid"
MAX_RETRY_AFTER_S = 3600.0
#: Read-back page size, and how many pages a read-back may take before it gives up (unknown):
#: a customer with more coupons than that in one series since the first attempt is not normal.
READ_BACK_PAGE_SIZE = 100
READ_BACK_MAX_PAGES = 20
_CUSTOMER_V11_PARAMS = {"mobile": "mobile", "email": "email", "externalId": "external_id"}


def decode_answer(response: requests.Response) -> object:
    """An answer's JSON (ValueError if it is not), as the ledger can store it.

    Capillary's text (a campaign's description, an error message) may hold a NUL or a lone
    surrogate, written as ``\\u0000`` or ``\\ud800`` escapes: PostgreSQL stores neither, so
    the outcome of a coupon that exists could not be recorded, and the read-back that finds it
    again would fail the same way, lease after lease. Both are escaped here, on the way in;
    numbers beyond the ledger's columns are left out of them by the parsers below.
    """
    # A number JSON cannot write back (NaN, Infinity, 1e400) is kept as its text: jsonb
    # refuses the float Python would make of it.
    payload = response.json(parse_constant=str, parse_float=_finite_float)
    content = response.content
    if b"\\u0000" in content or b"\\ud" in content or b"\\uD" in content:
        return storable_json(payload)
    return payload


def _finite_float(text: str) -> float | str:
    number = float(text)
    return number if math.isfinite(number) else text


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(delta, 0.0), MAX_RETRY_AFTER_S)


def _transport_failure(exc: OSError) -> tuple[Verdict, str, str]:
    """Verdict, error code and message for a call that got no HTTP answer."""
    if isinstance(exc, requests.RequestException):
        code, message = _transport_kind(exc)
    else:
        # Not the network: requests raises a bare OSError, before sending, for a setting it
        # cannot use (a CA bundle that REQUESTS_CA_BUNDLE names but cannot be read). Every
        # call would fail alike: pause issuance rather than reject the event.
        code, message = CLIENT_CONFIG, f"client configuration: {exc}; request not sent"
    return classify_transport(code), code, message


def _transport_kind(exc: requests.RequestException) -> tuple[str, str]:
    if isinstance(exc, requests.ConnectTimeout):
        return "connect_timeout", "connect timed out; request not sent"
    if isinstance(exc, requests.ReadTimeout):
        return "read_timeout", "no answer within the read timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        return _tls_kind(exc)
    if isinstance(exc, requests.ConnectionError):
        reason = exc.args[0] if exc.args else None
        inner = getattr(reason, "reason", None)
        if isinstance(reason, NewConnectionError) or isinstance(inner, NewConnectionError):
            return "connection_refused", "could not connect; request not sent"
        return "connection_reset", "connection dropped after sending"
    return "transport_error", f"{type(exc).__name__} after sending"


def _tls_kind(exc: requests.exceptions.SSLError) -> tuple[str, str]:
    # requests raises the same SSLError for a handshake that failed and for a TLS stream
    # broken once the request was written (a middlebox mangling a record, a peer dying
    # mid-record). Only a refused certificate proves the handshake never finished.
    if any(isinstance(e, (ssl.SSLCertVerificationError, CertificateError))
           for e in _causes(exc)):
        return "tls_error", "certificate refused in the TLS handshake; request not sent"
    return "tls_dropped", "TLS failed on the connection; the request may have been sent"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: causes, contexts, urllib3's ``reason`` and
    exceptions passed as arguments (requests wraps urllib3's errors that way)."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = (getattr(current, "reason", None), current.__cause__, current.__context__,
                  *current.args)
        pending.extend(e for e in linked if isinstance(e, BaseException))


def build_auth(
    settings: Settings, session_factory: Callable[[], requests.Session]
) -> CapillaryAuth:
    """The auth hook chosen by the settings."""
    scheme = settings.require_capillary_credentials()
    if scheme == "oauth":
        key, secret = Secret.of(settings, "capillary_oauth_key"), \
            Secret.of(settings, "capillary_oauth_secret")
        assert key is not None
        assert secret is not None
        return OAuthTokens(
            settings.capillary_base_url, key, secret,
            session_factory=session_factory,
            timeout_s=(settings.http_connect_timeout_s, settings.http_timeout_s),
        )
    username, password = Secret.of(settings, "capillary_username"), \
        Secret.of(settings, "capillary_password")
    assert username is not None
    assert password is not None
    return BasicAuth(username, password)


#: What a call still running at its total deadline is recorded as (unknown: it was sent).
CALL_DEADLINE = "call_deadline"


class CapillaryClient:
    """The ``CouponApi`` over HTTP. One per process; safe to share between threads: their
    sessions share one pool of ``pool_size`` connections, and every call ends within
    ``deadline_s`` (connect + read timeout unless given; ``...capillary.transport``)."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: CapillaryAuth | None = None,
        connect_timeout_s: float = 3.05,
        read_timeout_s: float = 10.0,
        pool_size: int = 10,
        deadline_s: float | None = None,
        source: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        timezone: tzinfo = UTC,
    ) -> None:
        """``timezone``: the organisation's zone, for dates and times an answer gives without
        an offset."""
        self.base_url = base_url.rstrip("/")
        self._timeout_s = (connect_timeout_s, read_timeout_s)
        self.deadline_s = deadline_s or connect_timeout_s + read_timeout_s
        self.pool_size = pool_size
        self._deadlines = CallDeadlines()
        self._adapter = DeadlineAdapter(self._deadlines, pool_maxsize=pool_size)
        self._source = source
        self._clock = clock
        self._timezone = timezone
        self._local = threading.local()
        #: Every thread's session, for ``close`` (a thread-local cannot be walked).
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self.auth: CapillaryAuth | None = auth

    @classmethod
    def from_settings(cls, settings: Settings, *, threads: int = 1) -> CapillaryClient:
        """The client for ``settings``, for a process whose ``threads`` call at once."""
        client = cls(
            settings.capillary_base_url,
            connect_timeout_s=settings.http_connect_timeout_s,
            read_timeout_s=settings.http_timeout_s,
            pool_size=max(settings.http_pool_size, threads),
            source=settings.capillary_source,
            timezone=org_timezone(settings.capillary_timezone),
        )
        client.auth = build_auth(settings, client.session)
        return client

    def credential_versions(self) -> tuple[int, ...]:
        """Grows when credentials read from files change (``worker.secret_files``)."""
        return self.auth.versions if self.auth is not None else ()

    def session(self) -> requests.Session:
        """This thread's session, on the process's one connection pool (a requests session
        is not shared across threads; urllib3's pool is)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("http://", self._adapter)
            session.mount("https://", self._adapter)
            session.headers["User-Agent"] = "coupon-worker"
            # The environment (proxies, no_proxy, CA bundle) is read once, here: requests
            # otherwise walks the whole of os.environ twice on every call, a tenth of an
            # event's CPU in a profile of the pool.
            env = session.merge_environment_settings(self.base_url, {}, None, None, None)
            session.proxies.update(env["proxies"])
            session.verify, session.cert = env["verify"], env["cert"]
            session.trust_env = False
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close every thread's session and the process's connections, which they share (at
        shutdown; a call made afterwards opens a new one)."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._adapter.close()
        self._local = threading.local()

    @property
    def open_sessions(self) -> int:
        """How many sessions (one per thread that called) are open."""
        with self._sessions_lock:
            return len(self._sessions)

    # -- the raw call --------------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, operation: str, **kwargs: Any
    ) -> tuple[requests.Response | None, CallInfo]:
        """One HTTP call, renewing an OAuth token once on 401. Never raises for transport.
        Traced (``worker.tracing``) with Capillary's request id."""
        with tracing.span(f"capillary.{operation}", {tracing.OPERATION: operation},
                          kind="client") as span:
            response, call = self._exchange(method, path, operation=operation, **kwargs)
            span.set(tracing.REQUEST_ID, call.request_id)
            span.set(tracing.STATUS, call.status)
            span.set(tracing.OUTCOME, call.outcome)
            span.set(tracing.ERROR_CODE, call.error_code)
            return response, call

    def _prepare(self, session: requests.Session, method: str, path: str,
                 kwargs: dict[str, Any]) -> requests.PreparedRequest:
        """The request ``Session.request`` would send, for ``Session.send``.

        A JSON POST (the bulk issue) copies a request prepared once per thread and path, and
        only its body and auth are new: preparing from scratch merges the session's settings
        (runtime protocol checks in requests) and parses the URL again, a third of the CPU
        the call took in the pool processes' profile. Anything else, and a session holding
        cookies a server set, is prepared the usual way.
        """
        body = kwargs.get("json")
        if method != "POST" or body is None or kwargs.keys() - {"json", "params"} \
                or session.cookies:
            return session.prepare_request(
                requests.Request(method, self.base_url + path, auth=self.auth, **kwargs))
        params = kwargs.get("params") or {}
        key = (path, tuple(sorted(params.items())))
        templates: dict[tuple[str, tuple[tuple[str, str], ...]], requests.PreparedRequest] = \
            self._local.__dict__.setdefault("templates", {})
        template = templates.get(key)
        if template is None:
            template = templates[key] = session.prepare_request(requests.Request(
                method, self.base_url + path, params=params,
                headers={"Content-Type": "application/json"}))
        prepared = template.copy()
        try:
            data = json.dumps(body, allow_nan=False).encode("utf-8")
        except ValueError as exc:  # as requests says it: before anything is sent
            raise requests.exceptions.InvalidJSONError(exc, request=prepared) from exc
        prepared.body = data
        prepared.headers["Content-Length"] = str(len(data))
        return self.auth(prepared) if self.auth is not None else prepared

    def _exchange(
        self, method: str, path: str, *, operation: str, **kwargs: Any
    ) -> tuple[requests.Response | None, CallInfo]:
        started = self._clock()
        t0 = time.perf_counter()
        renewed = False
        while True:
            try:
                with self._deadlines.within(self.deadline_s) as watch:
                    try:
                        session = self.session()
                        response = session.send(
                            self._prepare(session, method, path, kwargs),
                            timeout=self._timeout_s, allow_redirects=False, stream=False,
                            verify=session.verify, cert=session.cert, proxies=session.proxies,
                        )
                    except OSError:
                        if not watch.expired:
                            raise
                        # The watchdog ended it: what the transport saw is only the effect.
                        verdict = classify_transport(CALL_DEADLINE)
                        return None, CallInfo(
                            operation, started, (time.perf_counter() - t0) * 1000, None,
                            None, verdict.value, EntryError(
                                CALL_DEADLINE, f"no complete answer within the call's "
                                f"deadline ({self.deadline_s:g} s); the request may have "
                                "been sent", verdict),
                        )
            except CapillaryError as exc:  # from the token hook
                verdict = Verdict.OUTAGE if isinstance(exc, Outage) else Verdict.RETRYABLE
                return None, CallInfo(
                    operation, started, (time.perf_counter() - t0) * 1000, exc.status,
                    exc.request_id, verdict.value, EntryError("auth_token", exc.message, verdict),
                )
            except OSError as exc:  # requests' errors, and the bare OSError of a bad setting
                verdict, code, message = _transport_failure(exc)
                return None, CallInfo(
                    operation, started, (time.perf_counter() - t0) * 1000, None, None,
                    verdict.value, EntryError(code, message, verdict),
                )
            if response.status_code == 401 and self.auth is not None and self.auth.renewable \
                    and not renewed:
                log.warning("capillary.auth_renew", extra={"request_id": response.headers.get(
                    REQUEST_ID_HEADER), "operation": operation})
                self.auth.invalidate()
                renewed = True
                continue
            latency_ms = (time.perf_counter() - t0) * 1000
            request_id = response.headers.get(REQUEST_ID_HEADER)
            return response, CallInfo(
                operation, started, latency_ms, response.status_code,
                storable(request_id) if request_id is not None else None, "answered",
            )

    # -- bulk issue ----------------------------------------------------------------------

    def bulk_issue(
        self, customer: dict[str, str], series_ids: list[int], metadata: dict[str, str]
    ) -> BulkIssueResult:
        body = {"seriesIds": series_ids, "customer": customer, "metadata": metadata}
        params = {"source": self._source} if self._source else None
        response, call = self._send(
            "POST", BULK_ISSUE_PATH, operation="bulk_issue", json=body, params=params
        )
        if response is None:
            verdict = Verdict(call.outcome)
            error = call.error or EntryError("transport_error", "", verdict)
            return BulkIssueResult(
                call=call,
                entries={s: EntryOutcome(s, verdict, error=error) for s in series_ids},
                call_level_failure=True,
            )
        payload: object = None
        if response.content:
            try:
                payload = decode_answer(response)
            except ValueError:
                payload = None
        status = response.status_code
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
        # One reading whatever the status: entries speak per series in every status that
        # carries them; the status decides only when none can be read.
        parsed = parse_bulk_answer(series_ids, status, payload, self._timezone)
        entries = parsed.entries
        outcome = _summarise(entries)
        first_error = next((e.error for e in entries.values() if e.error), None)
        call = CallInfo(
            call.operation, call.started_at, call.latency_ms, status, call.request_id, outcome,
            first_error,
        )
        if parsed.outage is not None or any(e.warnings for e in entries.values()):
            log.warning("capillary.answer_remarks", extra={
                "request_id": call.request_id, "status": status,
                "outage": f"{parsed.outage.code} {parsed.outage.message}"
                if parsed.outage else None,
                "warnings": {s: list(e.warnings) for s, e in entries.items() if e.warnings}})
        return BulkIssueResult(
            call=call, entries=entries, retry_after_s=retry_after_s,
            call_level_failure=parsed.unreadable, outage=parsed.outage,
        )

    # -- read-back -----------------------------------------------------------------------

    def find_coupons(
        self, customer: dict[str, str], series_id: int, since: datetime
    ) -> ReadBack:
        """Every coupon of ``series_id`` the customer got since ``since``, reading every page.

        Fails closed: anything short of a complete, well-formed answer raises, because "could
        not read" must never be taken for "absent".
        """
        customer_id = customer.get("id") or self._resolve_customer_id(customer, series_id, since)
        found: dict[str, FoundCoupon] = {}
        seen: set[str] = set()
        call: CallInfo | None = None
        offset = 0
        for _page in range(READ_BACK_MAX_PAGES):
            response, call = self._send(
                "GET", COUPON_READ_PATH, operation="read_back",
                params={"issuedToIds": customer_id, "includeIssualDetails": "true",
                        "seriesId": str(series_id), "limit": str(READ_BACK_PAGE_SIZE),
                        "offset": str(offset)},
            )
            data = self._json_or_raise(response, call)
            rows = data.get("data") if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise Ambiguous("read-back answer has no data list", status=call.status,
                                request_id=call.request_id)
            if data.get("errors"):
                raise Ambiguous(f"read-back answered errors: {call_level_message(data) or '?'}",
                                status=call.status, request_id=call.request_id)
            fresh = 0
            for row in rows:
                if not isinstance(row, dict):
                    raise Ambiguous("read-back row is not an object", request_id=call.request_id)
                key = str(row.get("code") or "")
                fresh += key not in seen
                seen.add(key)
                coupon = self._found_coupon(row, series_id, call)
                if coupon is not None:
                    found.setdefault(coupon.coupon.code, coupon)
            # Only an empty page ends the list: a server may serve fewer rows than asked for,
            # and one that ignores the offset repeats itself (nothing new) instead.
            if not rows or fresh == 0:
                ours = tuple(c for c in found.values()
                             if c.created_at is None or c.created_at >= since)
                return ReadBack(call=call, coupons=ours)
            offset += len(rows)
        raise Ambiguous(f"read-back has more than {READ_BACK_MAX_PAGES} pages",
                        request_id=call.request_id if call else None)

    def _found_coupon(self, row: dict[str, Any], series_id: int,
                      call: CallInfo) -> FoundCoupon | None:
        if int_or_none(row.get("seriesId")) != series_id:
            return None
        if not row.get("code"):
            raise Ambiguous("read-back row has no coupon code", request_id=call.request_id)
        details = row.get("couponIssualDetails")
        return FoundCoupon(
            coupon=parse_coupon(row, series_id, self._timezone),
            # A date alone is taken as its day's last second: the read-back keeps coupons
            # issued since the first attempt, and one issued that day must not be missed.
            created_at=parse_timestamp(row.get("issuedDate") or row.get("createdDate"),
                                       self._timezone, end_of_day=True),
            issual_details=details if isinstance(details, dict) else {},
        )

    def _resolve_customer_id(
        self, customer: dict[str, str], series_id: int, since: datetime
    ) -> str:
        """The customer's id from the v1.1 read-back, for events naming mobile/email/externalId.

        Raises when it cannot be resolved: an unknown customer proves nothing about a coupon.
        """
        params = {
            _CUSTOMER_V11_PARAMS[name]: value
            for name, value in customer.items() if name in _CUSTOMER_V11_PARAMS
        }
        params.update({"series_id": str(series_id), "order_by": "created_date",
                       "start_date": (since - timedelta(days=1)).date().isoformat()})
        response, call = self._send(
            "GET", CUSTOMER_COUPONS_V11_PATH, operation="read_back", params=params
        )
        data = self._json_or_raise(response, call)
        try:
            body = data["response"]
            success = body["status"]["success"]
            customers = body["customers"]["customer"]
        except (KeyError, TypeError):
            raise Ambiguous("customer look-up answered an unexpected shape",
                            status=call.status, request_id=call.request_id) from None
        if success is not True and str(success).lower() != "true":
            raise Ambiguous("customer look-up answered a failure status",
                            status=call.status, request_id=call.request_id)
        for row in customers if isinstance(customers, list) else []:
            if isinstance(row, dict) and row.get("id"):
                return str(row["id"])
        raise Ambiguous("customer could not be resolved to an id", status=call.status,
                        request_id=call.request_id)

    @staticmethod
    def _json_or_raise(response: requests.Response | None, call: CallInfo) -> Any:
        if response is None:
            verdict = Verdict(call.outcome)
            error_cls: type[CapillaryError] = Ambiguous
            if verdict is Verdict.RETRYABLE:
                error_cls = Retryable
            elif verdict is Verdict.OUTAGE:
                error_cls = Outage
            raise error_cls(call.error_message or "read-back failed", request_id=call.request_id)
        if response.status_code in (401, 403):
            raise Outage(f"read-back answered {response.status_code}",
                         status=response.status_code, request_id=call.request_id)
        if response.status_code == 429:
            raise Retryable("read-back rate limited", status=429, request_id=call.request_id,
                            retry_after_s=parse_retry_after(response.headers.get("Retry-After")))
        if not 200 <= response.status_code < 300:
            raise Ambiguous(f"read-back answered {response.status_code}",
                            status=response.status_code, request_id=call.request_id)
        try:
            return decode_answer(response)
        except ValueError:
            raise Ambiguous("read-back answered an unreadable body",
                            status=response.status_code, request_id=call.request_id) from None


def _summarise(entries: dict[int, EntryOutcome]) -> str:
    verdicts = {e.verdict for e in entries.values()}
    if verdicts == {Verdict.ISSUED}:
        return "issued"
    if Verdict.ISSUED in verdicts:
        return "partial"
    return "+".join(sorted(v.value for v in verdicts))
