"""A small typed client for the sandbox's admin API (``/sandbox/...``), for tests and the demo.

Field names may be given in the wire's camelCase (``latencySeconds``) or in snake_case
(``latency_seconds``); snake_case is converted before sending.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Final, cast

import requests

DEFAULT_TIMEOUT_S: Final = 10.0
_READY_POLL_S: Final = 0.05


class SandboxAdminError(RuntimeError):
    """The sandbox refused an admin command or could not be reached."""


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _camel_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {_camel(key): value for key, value in fields.items()}


class SandboxAdmin:
    """Drives one sandbox server's admin API over HTTP; close it (or use ``with``) when done."""

    def __init__(self, base_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 ca_file: str | None = None) -> None:
        """``ca_file``: the CA to trust when the sandbox serves HTTPS."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        # Per request: a session's own ``verify`` loses to REQUESTS_CA_BUNDLE in the environment.
        self._verify: str | bool = True if ca_file is None else ca_file

    def close(self) -> None:
        """Release pooled connections."""
        self._session.close()

    def __enter__(self) -> SandboxAdmin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        url = f"{self.base_url}/sandbox/{path}"
        try:
            response = self._session.request(
                method, url, json=json, params=params, timeout=self.timeout_s,
                verify=self._verify,
            )
        except requests.RequestException as exc:
            raise SandboxAdminError(f"{method} {url} failed: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not response.ok or not isinstance(body, dict):
            detail = body.get("error") if isinstance(body, dict) else response.text[:200]
            raise SandboxAdminError(f"{method} {url} -> {response.status_code}: {detail}")
        return cast(dict[str, Any], body)

    def reset(self) -> None:
        """Forget everything since start and re-apply the start options and scenario."""
        self._request("POST", "reset")

    def health(self) -> bool:
        """Whether the sandbox answers its health check."""
        return bool(self._request("GET", "health").get("ok"))

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the health check until it answers; raises TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health():
                    return
            except SandboxAdminError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sandbox at {self.base_url} not ready after {timeout_s} s")
            time.sleep(_READY_POLL_S)

    def config(self) -> dict[str, Any]:
        """The current runtime configuration (camelCase)."""
        return cast(dict[str, Any], self._request("GET", "config")["config"])

    def configure(self, **fields: Any) -> dict[str, Any]:
        """Partially update the config: latencySeconds, rateLimitPerMinute (None disables),
        tokenTtlSeconds, timezone, strictSeries, shuffleEntries, readbackLagSeconds,
        oneActionPerCustomer. Returns the new config."""
        body = self._request("PUT", "config", json=_camel_fields(fields))
        return cast(dict[str, Any], body["config"])

    def set_series(self, series_id: int, **fields: Any) -> dict[str, Any]:
        """Partially update a series: description, discountCode, discountType, discountValue,
        discountUpto, validDays, maxPerUser (or maxVouchersPerUser),
        isMultipleVouchersPerUserAllowed, warnings, behaviour (valid, invalid, expired,
        inactive, error), errorCode, errorMessage, issueOnError. Returns the series' full
        settings."""
        body = self._request("PUT", f"series/{series_id}", json=_camel_fields(fields))
        return cast(dict[str, Any], body["series"])

    def set_customer(self, customer_id: str, exists: bool) -> None:
        """Mark a resolved customer id as existing or not (unknown customers get 701)."""
        self._request("PUT", f"customers/{customer_id}", json={"exists": exists})

    def set_password(self, username: str, password: str) -> None:
        """Accept only ``password`` for ``username`` from now on (a key rotated on Capillary's
        side); ``reset`` restores the start options' users."""
        self._request("PUT", f"users/{username}", json={"password": password})

    def add_fault(self, **fields: Any) -> int:
        """Register a fault rule (kind, times, series, customer, path, delaySeconds, status,
        retryAfterSeconds, probability); returns its id."""
        return int(self._request("POST", "faults", json=_camel_fields(fields))["id"])

    def faults(self) -> list[dict[str, Any]]:
        """Every fault rule with its remaining ``times`` and ``applied`` count."""
        return cast(list[dict[str, Any]], self._request("GET", "faults")["faults"])

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        self._request("DELETE", "faults")

    def ledger(
        self, customer: str | None = None, series: int | None = None
    ) -> list[dict[str, Any]]:
        """Coupons really issued since the last reset, oldest first (the ground truth)."""
        params: dict[str, str] = {}
        if customer is not None:
            params["customer"] = customer
        if series is not None:
            params["series"] = str(series)
        return cast(list[dict[str, Any]], self._request("GET", "ledger", params=params)["coupons"])

    def calls(self, since: float | None = None) -> list[dict[str, Any]]:
        """The call log, optionally only calls at or after ``since`` (epoch seconds)."""
        params = {} if since is None else {"since": repr(since)}
        return cast(list[dict[str, Any]], self._request("GET", "calls", params=params)["calls"])

    def held(self) -> int:
        """How many calls ``hold`` faults keep waiting."""
        return int(self._request("GET", "holds")["held"])

    def release(self) -> int:
        """Let every held call go on; returns how many there were."""
        return int(self._request("POST", "release")["released"])

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: calls per path, statuses, issued, rateLimited."""
        return self._request("GET", "stats")

    def revoke_tokens(self) -> None:
        """Invalidate every outstanding OAuth token."""
        self._request("POST", "tokens/revoke")
