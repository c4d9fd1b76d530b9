"""In-memory state and rules of the sandbox Capillary server.

Nothing here speaks HTTP: :mod:`coupon_devtools.sandbox.server` is a thin aiohttp skin over
:class:`SandboxState`, so every rule (auth, validation, issuance, rate limits, faults, read-backs)
can be exercised directly with injected clocks. The ledger kept here is the ground truth of what
the sandbox really issued, which is what exactly-once tests compare the worker's ledger against.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from coupon_devtools.sandbox.bulk_requests import parse_customer, parse_metadata, parse_series_ids
from coupon_devtools.sandbox.config import SandboxConfig, SandboxOptions, SeriesSettings
from coupon_devtools.sandbox.faults import BEHAVIOUR_REFUSALS, DEFAULT_SERIES, FaultRule
from coupon_devtools.sandbox.inputs import (
    CALL_LOG_LIMIT,
    CODE_ALPHABET,
    COUPON_CODE_LENGTH,
    FIRST_COUPON_ID,
    FIRST_SYNTHETIC_CUSTOMER_ID,
    RATE_WINDOW_S,
    Clock,
    JsonDict,
    Monotonic,
    PathClass,
    SandboxInputError,
    md5_hex,
    render_time,
)
from coupon_devtools.sandbox.readbacks import ReadbackRules
from coupon_devtools.sandbox.records import (
    ApiAnswer,
    BulkRequest,
    CallRecord,
    IssuedCoupon,
    TokenGrant,
    entry_error,
)
from coupon_devtools.sandbox.scenario import Scenario


class SandboxState(ReadbackRules):
    """Everything the sandbox knows, and the rules that change it.

    Not thread-safe by design: the server mutates it only from its event loop, and every method
    is synchronous, so a request's decisions are atomic with respect to other requests.
    """

    def __init__(
        self,
        options: SandboxOptions | None = None,
        *,
        clock: Clock | None = None,
        monotonic: Monotonic | None = None,
        call_log_limit: int = CALL_LOG_LIMIT,
    ) -> None:
        self.options = options if options is not None else SandboxOptions()
        self._now: Clock = clock if clock is not None else (lambda: datetime.now(UTC))
        self._monotonic: Monotonic = monotonic if monotonic is not None else time.monotonic
        self._scenario = Scenario.from_json(self.options.scenario)
        self._base_config = SandboxConfig.from_options(self.options).updated(self._scenario.config)
        self._call_log_limit = call_log_limit
        self._random = random.Random(self.options.seed)
        self.reset()

    # --- lifecycle and admin ---------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything since start, then re-apply the start options and scenario."""
        self.config: SandboxConfig = self._base_config
        self._password_digests = {u: md5_hex(p) for u, p in self.options.users.items()}
        self._series: dict[int, SeriesSettings] = dict(self._scenario.series)
        self._unknown_customers: set[str] = set(self._scenario.unknown_customers)
        self._registry: dict[tuple[str, str], str] = {}
        self._next_synthetic_id = FIRST_SYNTHETIC_CUSTOMER_ID
        self._tokens: dict[str, TokenGrant] = {}
        self._faults: list[FaultRule] = []
        self._next_fault_id = 1
        # Apart from the codes' generator, so that faults repeat after a reset even though
        # the codes issued before it were drawn from the same seed.
        self._fault_random = random.Random(self.options.seed)
        self._ledger: list[IssuedCoupon] = []
        self._by_customer: dict[str, list[IssuedCoupon]] = {}
        self._held: dict[tuple[str, int], int] = {}
        self._codes: set[str] = set()
        self._next_coupon_id = FIRST_COUPON_ID
        self._calls: deque[CallRecord] = deque(maxlen=self._call_log_limit)
        self._windows: dict[str, deque[float]] = {}
        self._path_counts: dict[str, int] = {"bulk": 0, "readback": 0, "token": 0}
        self._status_counts: dict[str, int] = {}
        self._rate_limited = 0
        self._busy_customers: set[str] = set()

    def set_password(self, username: str, password: str) -> None:
        """Accept ``password`` for ``username`` from now on, and no other: Capillary's side of
        a rotated key (the worker still sending the old one is refused with 401). A reset
        restores the start options' users."""
        if not username or not password:
            raise SandboxInputError("username and password must not be empty")
        self._password_digests[username] = md5_hex(password)

    def configure(self, fields: Mapping[str, Any]) -> SandboxConfig:
        """Apply a partial config update (camelCase keys); returns the new config."""
        self.config = self.config.updated(fields)
        return self.config

    def set_series(self, series_id: int, fields: Mapping[str, Any]) -> SeriesSettings:
        """Partially update one series' settings; returns the new settings."""
        settings = self._series.get(series_id, SeriesSettings()).updated(fields)
        self._series[series_id] = settings
        return settings

    def series_settings(self, series_id: int) -> SeriesSettings | None:
        """The configured settings of a series, or None when it was never configured."""
        return self._series.get(series_id)

    def set_customer(self, customer_id: str, *, exists: bool) -> None:
        """Mark a (resolved) customer id as known or unknown to Capillary."""
        if exists:
            self._unknown_customers.discard(customer_id)
        else:
            self._unknown_customers.add(customer_id)

    def add_fault(self, fields: Mapping[str, Any]) -> int:
        """Register a fault rule (see :class:`FaultRule`); returns its id."""
        rule = FaultRule.from_json(self._next_fault_id, fields)
        self._next_fault_id += 1
        self._faults.append(rule)
        return rule.id

    def clear_faults(self) -> int:
        """Remove every fault rule; returns how many there were."""
        count = len(self._faults)
        self._faults.clear()
        return count

    def faults(self) -> list[JsonDict]:
        """Every fault rule, including spent ones, in registration order."""
        return [rule.to_json() for rule in self._faults]

    def take_fault(
        self, path: PathClass, series_ids: Iterable[int], customer_id: str | None
    ) -> FaultRule | None:
        """The first matching rule with uses left that strikes (see ``probability``), after
        consuming one use of it."""
        ids = tuple(series_ids)
        for rule in self._faults:
            if rule.matches(path, ids, customer_id):
                if rule.probability < 1.0 and self._fault_random.random() >= rule.probability:
                    continue
                if rule.remaining > 0:
                    rule.remaining -= 1
                rule.applied += 1
                return replace(rule)
        return None

    # --- authentication and rate limits ----------------------------------------------------

    def authenticate_basic(self, header_value: str) -> str | None:
        """The username of a valid ``Basic`` header (MD5-hashed password), else None."""
        scheme, _, encoded = header_value.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, digest = decoded.partition(":")
        expected = self._password_digests.get(username)
        if not sep or expected is None:
            return None
        return username if hmac.compare_digest(digest, expected) else None

    def generate_token(self, key: str, secret: str) -> ApiAnswer:
        """Answer ``POST /v3/oauth/token/generate`` for these credentials."""
        expected = self.options.oauth_clients.get(key)
        if expected is None or not hmac.compare_digest(secret, expected):
            return ApiAnswer(
                401, {"data": None, "errors": [entry_error(401, "Invalid key or secret")]}
            )
        now_mono = self._monotonic()
        self._tokens = {t: g for t, g in self._tokens.items() if g.expires_at > now_mono}
        ttl_s = self.config.token_ttl_s
        token = self._make_jwt(key, ttl_s)
        self._tokens[token] = TokenGrant(principal=key, expires_at=now_mono + ttl_s)
        return ApiAnswer(200, {"data": {"accessToken": token, "ttlSeconds": ttl_s}, "errors": None})

    def _make_jwt(self, key: str, ttl_s: int) -> str:
        def b64(raw: bytes) -> str:
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

        issued = int(self._now().timestamp())
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {"sub": key, "iat": issued, "exp": issued + ttl_s, "jti": uuid.uuid4().hex}
        return ".".join(
            (
                b64(json.dumps(header).encode()),
                b64(json.dumps(claims).encode()),
                b64(secrets.token_bytes(32)),
            )
        )

    def principal_for_token(self, token: str) -> str | None:
        """The OAuth key a live token was issued to; None when unknown, revoked or expired."""
        grant = self._tokens.get(token)
        if grant is None:
            return None
        if self._monotonic() >= grant.expires_at:
            del self._tokens[token]
            return None
        return grant.principal

    def revoke_tokens(self) -> int:
        """Invalidate every outstanding OAuth token; returns how many there were."""
        count = len(self._tokens)
        self._tokens.clear()
        return count

    def take_rate_slot(self, principal: str) -> int | None:
        """Consume one call of the principal's rolling minute.

        Returns None when the call may proceed, else the whole seconds until a slot frees (>= 1);
        refused calls do not consume a slot.
        """
        limit = self.config.rate_limit_per_minute
        if limit is None:
            return None
        now = self._monotonic()
        window = self._windows.setdefault(principal, deque())
        while window and window[0] <= now - RATE_WINDOW_S:
            window.popleft()
        if len(window) < limit:
            window.append(now)
            return None
        return max(1, math.ceil(window[-limit] + RATE_WINDOW_S - now))

    # --- customers -------------------------------------------------------------------------

    def begin_action(self, customer_id: str) -> bool:
        """Start a bulk issue for the customer; False when one is already in progress and
        ``oneActionPerCustomer`` is on (the call is answered 521)."""
        if not self.config.one_action_per_customer:
            return True
        if customer_id in self._busy_customers:
            return False
        self._busy_customers.add(customer_id)
        return True

    def end_action(self, customer_id: str) -> None:
        """The customer's bulk issue is answered."""
        self._busy_customers.discard(customer_id)

    def resolve_identifier(self, kind: str, value: str) -> str:
        """The customer id for an identifier; mobile/email/externalId get stable synthetic ids."""
        if kind == "id":
            return value
        key = (kind, value)
        customer_id = self._registry.get(key)
        if customer_id is None:
            customer_id = str(self._next_synthetic_id)
            self._next_synthetic_id += 1
            self._registry[key] = customer_id
        return customer_id

    def is_unknown_customer(self, customer_id: str) -> bool:
        """Whether the customer was marked as not existing."""
        return customer_id in self._unknown_customers

    # --- bulk issue ------------------------------------------------------------------------

    def parse_bulk_request(self, raw: bytes | str, source: str | None) -> BulkRequest:
        """Validate a bulk-issue body; raises :class:`SandboxInputError` with the precise reason."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SandboxInputError(f"Malformed JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise SandboxInputError("Request body must be a JSON object")
        series_ids = parse_series_ids(body.get("seriesIds"))
        kind, value, customer = parse_customer(body.get("customer"))
        metadata = parse_metadata(body.get("metadata"))
        return BulkRequest(
            series_ids=series_ids,
            customer=customer,
            customer_id=self.resolve_identifier(kind, value),
            metadata=metadata,
            source=source,
        )

    def issue_bulk(self, request: BulkRequest, *, principal: str, request_id: str) -> ApiAnswer:
        """Process a validated bulk-issue request: one entry per series, ledger updated."""
        now = self._now()
        entries: list[JsonDict] = []
        failures = 0
        for series_id in request.series_ids:
            result, error = self._issue_one(
                series_id, request, now=now, principal=principal, request_id=request_id
            )
            if error is not None:
                failures += 1
            settings = self._series.get(series_id, DEFAULT_SERIES)
            entries.append(
                {
                    "entityId": series_id,
                    "result": result,
                    "errors": [] if error is None else [error],
                    "warnings": [{"message": w} for w in settings.warnings] if result else [],
                }
            )
        total = len(entries)
        if self.config.shuffle_entries:
            # Apart from the codes' generator: a shuffle must not change the codes issued.
            self._fault_random.shuffle(entries)
        # Doc (status codes): 200 all succeeded, 201 one or more failed, 500 all failed.
        status = 200 if failures == 0 else 500 if failures == total else 201
        return ApiAnswer(
            status, {"response": entries, "totalCount": total, "failureCount": failures}
        )

    def _issue_one(
        self,
        series_id: int,
        request: BulkRequest,
        *,
        now: datetime,
        principal: str,
        request_id: str,
    ) -> tuple[JsonDict | None, JsonDict | None]:
        settings, refusal = self._settings_or_refusal(series_id, request.customer_id)
        if refusal is not None:
            return None, refusal
        held = self._held.get((request.customer_id, series_id), 0)
        if held and not settings.multiple_per_user and settings.behaviour == "valid":
            # Doc (idempotency): isMultipleVouchersPerUserAllowed=false refuses a second coupon;
            # the message is the documented error entry's.
            return None, entry_error(709, "Coupon processing failed: user already has a coupon")
        at_cap = settings.max_per_user is not None and held >= settings.max_per_user
        coupon = None
        if not at_cap and (settings.behaviour == "valid" or settings.issue_on_error):
            coupon = self._issue(
                series_id,
                request,
                settings=settings,
                now=now,
                principal=principal,
                request_id=request_id,
            )
        if settings.behaviour == "error":
            # issueOnError simulates an ambiguous failure (748): issued, yet reported as failed.
            return None, entry_error(settings.error_code, settings.error_message)
        if coupon is None:
            return None, entry_error(5002, "Max coupons per user exceeded")
        return coupon, None

    def _settings_or_refusal(
        self, series_id: int, customer_id: str
    ) -> tuple[SeriesSettings, JsonDict | None]:
        if customer_id in self._unknown_customers:
            return DEFAULT_SERIES, entry_error(701, "Customer not found")
        settings = self._series.get(series_id)
        if settings is None:
            if self.config.strict_series:
                return DEFAULT_SERIES, entry_error(707, "Invalid series id")
            settings = DEFAULT_SERIES
        refusal = BEHAVIOUR_REFUSALS.get(settings.behaviour)
        return settings, None if refusal is None else entry_error(*refusal)

    def _issue(
        self,
        series_id: int,
        request: BulkRequest,
        *,
        settings: SeriesSettings,
        now: datetime,
        principal: str,
        request_id: str,
    ) -> JsonDict:
        tz = self.config.tz
        expiry = now.astimezone(tz).date() + timedelta(days=settings.valid_days)
        # Capillary stores the expiry date at UTC midnight and renders that instant in the
        # host's zone (the docs show 2026-06-11T05:30:00+05:30 for India), so validTill is
        # not local midnight; validTillDateTime is the real end of the day in the zone.
        valid_till = render_time(datetime(expiry.year, expiry.month, expiry.day, tzinfo=UTC), tz)
        valid_till_dt = render_time(
            datetime(expiry.year, expiry.month, expiry.day, 23, 59, 59, tzinfo=tz), tz
        )
        code = self._new_code()
        coupon_id = self._next_coupon_id
        self._next_coupon_id += 1
        record = IssuedCoupon(
            id=coupon_id,
            code=code,
            series_id=series_id,
            customer_id=request.customer_id,
            customer=request.customer,
            metadata=request.metadata,
            source=request.source,
            issued_at=now,
            request_id=request_id,
            principal=principal,
            valid_till=valid_till,
            valid_till_date_time=valid_till_dt,
        )
        self._ledger.append(record)
        self._by_customer.setdefault(request.customer_id, []).append(record)
        key = (request.customer_id, series_id)
        self._held[key] = self._held.get(key, 0) + 1
        return {
            "id": coupon_id,
            "code": code,
            "seriesId": series_id,
            "description": settings.description_for(series_id),
            "discountCode": settings.discount_code_for(series_id),
            "validTill": valid_till,
            "validTillDateTime": valid_till_dt,
            "discountType": settings.discount_type,
            "discountValue": settings.discount_value,
            "discountUpto": settings.discount_upto,
            "discountOn": "BILL",
            "detailedInfo": {},
            "redemptionCount": 0,
        }

    def _new_code(self) -> str:
        while True:
            code = "".join(self._random.choices(CODE_ALPHABET, k=COUPON_CODE_LENGTH))
            if code not in self._codes:
                self._codes.add(code)
                return code

    # --- ground truth, call log, stats -----------------------------------------------------

    def ledger(self, customer: str | None = None, series: int | None = None) -> list[JsonDict]:
        """Every coupon really issued since the last reset, oldest first, optionally filtered."""
        rows = self._by_customer.get(customer, []) if customer is not None else self._ledger
        return [r.to_json() for r in rows if series is None or r.series_id == series]

    @property
    def issued_count(self) -> int:
        """How many coupons were really issued since the last reset."""
        return len(self._ledger)

    def record_call(
        self,
        path: PathClass,
        status: int,
        *,
        principal: str | None,
        series_ids: tuple[int, ...],
        customer_id: str | None,
        request_id: str,
    ) -> None:
        """Append a Capillary call to the bounded call log and count it."""
        self._calls.append(
            CallRecord(
                t=self._now().timestamp(),
                path=path,
                status=status,
                principal=principal,
                series_ids=series_ids,
                customer_id=customer_id,
                request_id=request_id,
            )
        )
        self._path_counts[path] += 1
        key = str(status)
        self._status_counts[key] = self._status_counts.get(key, 0) + 1
        if status == 429:
            self._rate_limited += 1

    def calls(self, since: float | None = None) -> list[JsonDict]:
        """The call log (oldest first), optionally only calls at or after ``since`` (epoch s)."""
        return [c.to_json() for c in self._calls if since is None or c.t >= since]

    def stats(self) -> JsonDict:
        """Counters since the last reset (status 0 counts answers that were TCP resets)."""
        return {
            "calls": dict(self._path_counts),
            "statuses": dict(self._status_counts),
            "issued": len(self._ledger),
            "rateLimited": self._rate_limited,
        }
