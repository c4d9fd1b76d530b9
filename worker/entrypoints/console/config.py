"""The console's own settings (``COUPONS_CONSOLE_*``), beside the worker's ``Settings``."""

from __future__ import annotations

import math
from collections import Counter
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from worker.domain.errors import ConfigurationError
from worker.secret_files import ReadsSecretFiles


class ConsoleSettings(ReadsSecretFiles):
    """Who may log in, how sessions are signed, where Flower is. Frozen."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    #: Settings also read from the file ``<NAME>_FILE`` names (docs/secrets.md); the secret
    #: is read again when its file changes (``worker.entrypoints.console.sessions``).
    secret_file_fields: ClassVar[tuple[str, ...]] = ("secret", "users")

    secret: SecretStr = Field(
        validation_alias="COUPONS_CONSOLE_SECRET", min_length=32, repr=False,
        description="Signs the pre-login cookie (the login form's CSRF token; sessions "
                    "themselves are kept in PostgreSQL); required, at least 32 characters, 10 "
                    "distinct ones and 3 bits of entropy per character (`openssl rand -hex 32`).")
    users: str | None = Field(
        None, validation_alias="COUPONS_CONSOLE_USERS", repr=False,
        description="The users: a JSON or TOML file's path, or the JSON itself (a container's "
                    "environment): `{\"users\": [{\"name\": ..., \"role\": "
                    "\"viewer|operator|admin\", \"password_hash\": ...}]}`, hashes from "
                    "`coupon-worker console hash-password`. A file is re-read when it changes "
                    "(`COUPONS_CONSOLE_USERS_CHECK_SECONDS`).")
    proxy_user_header: str | None = Field(
        None, validation_alias="COUPONS_CONSOLE_PROXY_HEADER",
        description="When set (e.g. `X-Forwarded-User`), a request from a trusted proxy "
                    "(`COUPONS_CONSOLE_TRUSTED_PROXIES`) carrying this header is that user "
                    "(single sign-on through a reverse proxy); the header is removed from every "
                    "other request. The console refuses to start when this is set and no proxy "
                    "is trusted.")
    proxy_default_role: str = Field(
        "viewer", validation_alias="COUPONS_CONSOLE_PROXY_ROLE",
        description="The role of a proxy-authenticated user the users file does not list.")
    trusted_proxies: str = Field(
        "", validation_alias="COUPONS_CONSOLE_TRUSTED_PROXIES",
        description="Comma-separated addresses or networks (`10.0.0.5`, `10.0.0.0/24`) of the "
                    "reverse proxies in front of the console. Only from these peers are the "
                    "identity header (`COUPONS_CONSOLE_PROXY_HEADER`), `X-Forwarded-For` (the "
                    "client's address, for the login limits and the audit) and "
                    "`X-Forwarded-Proto` (HTTPS, for HSTS) believed. Empty by default: no "
                    "proxy is trusted, not even loopback.")
    flower_url: str | None = Field(
        None, validation_alias="COUPONS_CONSOLE_FLOWER_URL",
        description="Flower's address: the console links each Capillary call to its task "
                    "there (`<url>/task/<id>`).")
    secure_cookies: bool = Field(
        False, validation_alias="COUPONS_CONSOLE_SECURE_COOKIES",
        description="Send the console's cookies over HTTPS only (set it behind TLS).")
    session_max_age_s: int = Field(
        8 * 3600, ge=60, validation_alias="COUPONS_CONSOLE_SESSION_SECONDS",
        description="Absolute session timeout, in seconds: a session ends this long after its "
                    "login, however busy (8 hours).")
    session_idle_s: int = Field(
        30 * 60, ge=60, validation_alias="COUPONS_CONSOLE_SESSION_IDLE_SECONDS",
        description="Idle session timeout, in seconds: a session without a request for this "
                    "long ends (30 minutes).")
    login_max_failures: int = Field(
        5, ge=1, validation_alias="COUPONS_CONSOLE_LOGIN_MAX_FAILURES",
        description="Failed logins allowed per user name and per client address before each "
                    "further attempt waits (`COUPONS_CONSOLE_LOGIN_BACKOFF_SECONDS`); counted "
                    "in PostgreSQL, shared by every console process.")
    login_window_s: float = Field(
        300.0, gt=0, validation_alias="COUPONS_CONSOLE_LOGIN_WINDOW_SECONDS",
        description="Seconds after the last wait ends before a name's or an address's failed "
                    "logins are forgotten.")
    login_backoff_s: float = Field(
        1.0, gt=0, validation_alias="COUPONS_CONSOLE_LOGIN_BACKOFF_SECONDS",
        description="The first wait, in seconds, once `COUPONS_CONSOLE_LOGIN_MAX_FAILURES` is "
                    "reached; each further failure doubles it. Attempts during a wait are "
                    "answered 429 and not counted.")
    login_backoff_max_s: float = Field(
        900.0, gt=0, validation_alias="COUPONS_CONSOLE_LOGIN_BACKOFF_MAX_SECONDS",
        description="The longest wait between two login attempts under one name or address, "
                    "in seconds (a delay, never a lockout).")
    users_check_s: float = Field(
        5.0, ge=0, validation_alias="COUPONS_CONSOLE_USERS_CHECK_SECONDS",
        description="How often, at most, in seconds, the users file is checked for changes; "
                    "a change applies without a restart and ends the sessions of every user "
                    "whose entry changed or went. An unreadable file keeps the last good list "
                    "(logged as `console.users_unreadable`).")
    default_velocity_per_min: int = Field(
        60, ge=1, validation_alias="COUPONS_CONSOLE_DEFAULT_VELOCITY",
        description="The replay velocity the console offers by default, in calls per minute.")
    timezone: str = Field(
        "UTC", validation_alias="COUPONS_CONSOLE_TIMEZONE",
        description="The time zone the console shows dates in (an IANA name such as `UTC` or "
                    "`Europe/Berlin`): moments older than a day read as a date and time in it; "
                    "hovering over any moment shows it exactly, in this zone and in UTC. An "
                    "unknown name stops the console at start.")

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
        """The console's time zone (``COUPONS_CONSOLE_TIMEZONE``)."""
        return ZoneInfo(self.timezone)

    @field_validator("secret")
    @classmethod
    def _strong(cls, value: SecretStr) -> SecretStr:
        problem = weakness(value.get_secret_value())
        if problem:
            raise ValueError(f"COUPONS_CONSOLE_SECRET is too weak: {problem}; make one with "
                             "`openssl rand -hex 32`")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses(cls, value: str) -> str:
        TrustedProxies.parse(value)
        return value

    @model_validator(mode="after")
    def _proxy_header_needs_proxies(self) -> ConsoleSettings:
        if self.proxy_user_header and not self.proxies():
            raise ValueError(
                f"COUPONS_CONSOLE_PROXY_HEADER is set ({self.proxy_user_header}) but "
                "COUPONS_CONSOLE_TRUSTED_PROXIES is empty: say which proxy addresses may send "
                "it, or anyone could log in by sending the header")
        return self

    def proxies(self) -> TrustedProxies:
        """The trusted proxies; ``address in proxies()`` tells whether to believe a peer."""
        return TrustedProxies.parse(self.trusted_proxies)


class TrustedProxies:
    """Addresses and networks of the reverse proxies in front of the console."""

    def __init__(self, networks: tuple[IPv4Network | IPv6Network, ...]) -> None:
        self.networks = networks

    @classmethod
    def parse(cls, value: str) -> TrustedProxies:
        networks = []
        for item in (p.strip() for p in value.split(",")):
            if not item:
                continue
            try:
                networks.append(ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"COUPONS_CONSOLE_TRUSTED_PROXIES: {item!r} is not an IP "
                                 "address or network") from None
        return cls(tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        try:
            ip = ip_address(address)
        except ValueError:
            return False  # a peer without an IP address (a socket path) is never a proxy
        return any(ip in network for network in self.networks)


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
    """The console's settings, from the environment and the same dotenv file as the worker's
    (``COUPONS_ENV_FILE``), as the configuration reference says."""
    from worker.config import dotenv_file

    try:
        return ConsoleSettings(_env_file=dotenv_file(), **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigurationError(f"console configuration: {exc}") from exc
