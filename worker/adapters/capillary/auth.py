"""Capillary's two auth schemes, as ``requests`` auth hooks that never expose the secret.

Basic sends ``base64(username:md5_hex(password))``. OAuth exchanges key and secret for a token
at ``/v3/oauth/token/generate``, caches it, renews it before it expires, and renews it once more
when a call answers 401 (the caller asks for that through ``invalidate``).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
from pydantic import SecretStr

from worker.domain.errors import Outage, Retryable
from worker.secret_files import Secret, versions

TOKEN_PATH = "/v3/oauth/token/generate"  # noqa: S105 - a path, not a secret
# Renew when less than this share of a token's life is left, so a call never leaves with a
# token that expires in flight.
RENEW_AT_REMAINING_FRACTION = 0.2
MIN_RENEW_MARGIN_S = 5.0


def basic_auth_header(username: str, password: SecretStr) -> str:
    """The Authorization header value for Capillary Basic auth (password MD5-hashed first)."""
    digest = hashlib.md5(password.get_secret_value().encode("utf-8")).hexdigest()  # noqa: S324 - the API's scheme, not our choice
    token = base64.b64encode(f"{username}:{digest}".encode()).decode("ascii")
    return f"Basic {token}"


class CapillaryAuth(requests.auth.AuthBase):
    """Adds credentials to a request; ``invalidate`` is for a 401 answer."""

    renewable: bool = False

    def invalidate(self) -> None:
        """Forget any cached credential so the next request fetches a fresh one."""

    @property
    def versions(self) -> tuple[int, ...]:
        """Grows when the credentials behind the hook change (a rotated secret file)."""
        return ()


def _secret(value: str | SecretStr | Secret) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)


class BasicAuth(CapillaryAuth):
    """Capillary Basic auth; a username or password read from a file follows the file."""

    def __init__(self, username: str | Secret, password: SecretStr | Secret) -> None:
        self._username = _secret(username)
        self._password = _secret(password)
        self._lock = threading.Lock()
        self._built_for: tuple[int, ...] = ()
        self._header = ""

    @property
    def versions(self) -> tuple[int, ...]:
        """The credentials' versions (checking their files if due): a change means new ones."""
        return versions(self._username, self._password)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._current_header()
        return request

    def _current_header(self) -> str:
        with self._lock:
            seen = self.versions
            if seen != self._built_for or not self._header:
                self._header = basic_auth_header(self._username.get(),
                                                 SecretStr(self._password.get()))
                self._built_for = seen
            return self._header

    def __repr__(self) -> str:
        return "BasicAuth(***)"


@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float  # monotonic seconds


class OAuthTokens(CapillaryAuth):
    """Capillary OAuth: a cached token shared by the threads of one process."""

    renewable = True

    def __init__(
        self,
        base_url: str,
        key: str | Secret,
        secret: SecretStr | Secret,
        *,
        session_factory: Callable[[], requests.Session],
        timeout_s: tuple[float, float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = base_url + TOKEN_PATH
        self._key = _secret(key)
        self._secret = _secret(secret)
        self._session_factory = session_factory
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self._token_for: tuple[int, ...] = ()
        self.generated = 0

    def __repr__(self) -> str:
        return f"OAuthTokens(key={self._key.get()!r}, secret=***)"

    @property
    def versions(self) -> tuple[int, ...]:
        return versions(self._key, self._secret)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["X-CAP-API-OAUTH-TOKEN"] = self.token()
        return request

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def token(self) -> str:
        """A token valid for a while yet, generating one when needed."""
        with self._lock:
            # A rotated key or secret gets its own token at once: the old pair may be revoked.
            seen = self.versions
            if self._token is None or self._clock() >= self._token.renew_at \
                    or seen != self._token_for:
                self._token = self._generate()
                self._token_for = seen
            return self._token.value

    def _generate(self) -> _Token:
        body = {"key": self._key.get(), "secret": self._secret.get()}
        try:
            response = self._session_factory().post(self._url, json=body, timeout=self._timeout_s)
        except requests.RequestException as exc:
            # Generating a token issues nothing, so any transport failure is safe to retry.
            raise Retryable(f"token generation failed: {type(exc).__name__}") from None
        request_id = response.headers.get("X-Cap-Requestid")
        if response.status_code in (401, 403):
            raise Outage(
                "Capillary refused the OAuth key/secret (token generation answered "
                f"{response.status_code})",
                status=response.status_code,
                request_id=request_id,
            )
        if response.status_code != 200:
            raise Retryable(
                f"token generation answered {response.status_code}",
                status=response.status_code,
                request_id=request_id,
            )
        try:
            data = response.json()["data"]
            value = str(data["accessToken"])
            ttl_s = float(data.get("ttlSeconds") or 300)
        except (ValueError, KeyError, TypeError):
            raise Retryable(
                "token generation answered an unreadable body", request_id=request_id
            ) from None
        margin_s = max(ttl_s * RENEW_AT_REMAINING_FRACTION, MIN_RENEW_MARGIN_S)
        self.generated += 1
        return _Token(value=value, renew_at=self._clock() + max(ttl_s - margin_s, 0.0))
