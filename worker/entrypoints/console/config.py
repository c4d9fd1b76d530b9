"""The console's own settings (``COUPONS_CONSOLE_*``), beside the worker's ``Settings``."""

from __future__ import annotations

import math
from collections import Counter
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.domain.errors import ConfigurationError


class ConsoleSettings(BaseSettings):
    """Who may log in, how sessions are signed, where Flower is. Frozen."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    #: Signs the session cookie; required, at least 32 characters (e.g. ``openssl rand -hex 32``).
    secret: SecretStr = Field(validation_alias="COUPONS_CONSOLE_SECRET", min_length=32,
                              repr=False)
    #: The users: a JSON or TOML file's path, or the JSON itself (a container's environment):
    #: ``{"users": [{"name": …, "role": "viewer|operator|admin", "password_hash": …}]}``.
    users: str | None = Field(None, validation_alias="COUPONS_CONSOLE_USERS", repr=False)
    #: When set, a request from a trusted proxy carrying this header is that user (SSO).
    proxy_user_header: str | None = Field(None, validation_alias="COUPONS_CONSOLE_PROXY_HEADER")
    #: The role of a proxy-authenticated user the users file does not list.
    proxy_default_role: str = Field("viewer", validation_alias="COUPONS_CONSOLE_PROXY_ROLE")
    #: Comma-separated addresses whose identity header is believed.
    trusted_proxies: str = Field("127.0.0.1,::1",
                                 validation_alias="COUPONS_CONSOLE_TRUSTED_PROXIES")
    flower_url: str | None = Field(None, validation_alias="COUPONS_CONSOLE_FLOWER_URL")
    #: Send the session cookie over HTTPS only (set it behind TLS).
    secure_cookies: bool = Field(False, validation_alias="COUPONS_CONSOLE_SECURE_COOKIES")
    session_max_age_s: int = Field(8 * 3600, ge=60,
                                   validation_alias="COUPONS_CONSOLE_SESSION_SECONDS")
    login_max_failures: int = Field(5, ge=1, validation_alias="COUPONS_CONSOLE_LOGIN_MAX_FAILURES")
    login_window_s: float = Field(300.0, gt=0,
                                  validation_alias="COUPONS_CONSOLE_LOGIN_WINDOW_SECONDS")
    #: The replay velocity offered by default, in calls per minute.
    default_velocity_per_min: int = Field(
        60, ge=1, validation_alias="COUPONS_CONSOLE_DEFAULT_VELOCITY")

    #: The time zone dates are shown in past a day (the hover always gives UTC too), e.g.
    #: ``Europe/Berlin``; an IANA name.
    timezone: str = Field("UTC", validation_alias="COUPONS_CONSOLE_TIMEZONE")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"COUPONS_CONSOLE_TIMEZONE: unknown time zone {value!r} (an IANA "
                             "name such as UTC or Europe/Berlin)") from None
        return value

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @field_validator("secret")
    @classmethod
    def _strong(cls, value: SecretStr) -> SecretStr:
        problem = weakness(value.get_secret_value())
        if problem:
            raise ValueError(f"COUPONS_CONSOLE_SECRET is too weak: {problem}; make one with "
                             "`openssl rand -hex 32`")
        return value

    def proxies(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.trusted_proxies.split(",") if p.strip())


#: A secret that signs sessions must not be guessable: at least this many distinct characters
#: and this much Shannon entropy per character (``openssl rand -hex 32`` has 16 and about 4).
SECRET_MIN_DISTINCT = 10
SECRET_MIN_BITS_PER_CHAR = 3.0


def weakness(secret: str) -> str | None:
    """Why ``secret`` is too weak to sign sessions, or None."""
    counts = Counter(secret)
    bits = -sum(n / len(secret) * math.log2(n / len(secret)) for n in counts.values()) \
        if secret else 0.0
    if len(counts) < SECRET_MIN_DISTINCT:
        return f"{len(counts)} distinct characters, at least {SECRET_MIN_DISTINCT} needed"
    if bits < SECRET_MIN_BITS_PER_CHAR:
        return (f"{bits:.1f} bits of entropy per character, at least "
                f"{SECRET_MIN_BITS_PER_CHAR:g} needed")
    return None


def load_console_settings(**overrides: object) -> ConsoleSettings:
    try:
        return ConsoleSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigurationError(f"console configuration: {exc}") from exc
