"""Settings from the environment (and an optional ``.env``), validated once at start.

Every variable is a field of :class:`worker.config_fields.SettingsFields`, with its default
and description; docs/reference/configuration.md is generated from them
(``make docs-reference``). The names are shared with other tools, so they are part of the
public surface. Nothing here opens a connection: ``load_settings()`` only reads the
environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import UTC, timedelta, timezone, tzinfo
from functools import cached_property
from typing import ClassVar, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from worker.config_fields import (
    AUDIT_FLOOR_DAYS,
    DEFAULT_BROKER_URL,
    DEFAULT_CAPILLARY_BASE_URL,
    DEFAULT_DATABASE_URL,
    DEFAULT_HEARTBEAT_DIR,
    DEFAULT_PREFETCH_MULTIPLIER,
    DEFAULT_SANDBOX_PORT,
    SettingsFields,
)
from worker.domain.errors import ConfigurationError
from worker.secret_files import ReadsSecretFiles, Secret

# Re-exported: the defaults are imported from here by the dev tools and the tests.
__all__ = [
    "AUDIT_FLOOR_DAYS", "DEFAULT_BROKER_URL", "DEFAULT_CAPILLARY_BASE_URL", "DEFAULT_DATABASE_URL",
    "DEFAULT_HEARTBEAT_DIR", "DEFAULT_PREFETCH_MULTIPLIER", "DEFAULT_SANDBOX_PORT", "AuthScheme",
    "Settings", "is_loopback", "load_settings", "org_timezone",
]

AuthScheme = Literal["basic", "oauth"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    return _is_loopback(host)


def org_timezone(name: str) -> tzinfo:
    """The zone a ``CAPILLARY_TIMEZONE`` value names: ``UTC``, an offset (``+05:30``) or an
    IANA name (``Asia/Kolkata``); ValueError for anything else."""
    text = name.strip()
    if text.upper() in ("UTC", "Z", ""):
        return UTC
    match = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", text)
    if match:
        sign = -1 if match.group(1) == "-" else 1
        offset = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        if offset >= timedelta(hours=24):
            raise ValueError(f"offset out of range: {name!r}")
        return timezone(sign * offset)
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}: use UTC, an offset such as +05:30, or "
                         "a zone name such as Asia/Kolkata") from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(SettingsFields, ReadsSecretFiles):
    """The worker's whole configuration. Frozen: build a new one to change anything."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    #: Settings also read from the file ``<NAME>_FILE`` names (docs/secrets.md).
    secret_file_fields: ClassVar[tuple[str, ...]] = (
        "database_url", "database_password", "retention_database_url", "broker_url",
        "capillary_username", "capillary_password", "capillary_oauth_key",
        "capillary_oauth_secret")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("capillary_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        org_timezone(value)
        return value

    @field_validator("capillary_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "must be an http(s) URL with a host, e.g. https://eu.api.capillarytech.com")
        return value.rstrip("/")

    @field_validator("broker_url")
    @classmethod
    def _broker_list(cls, value: str) -> str:
        """One URL, or a failover list of a cluster's nodes (``amqp://a//;amqp://b//``)."""
        urls = [url.strip() for url in value.split(";") if url.strip()]
        if not urls:
            raise ValueError("must be a broker URL, e.g. amqp://user:password@host:5672/vhost")
        schemes = {urlsplit(url).scheme for url in urls}
        if len(urls) > 1 and not schemes <= {"amqp", "amqps", "pyamqp"}:
            raise ValueError("a list of broker URLs (separated by ';') is for the nodes of a "
                             "RabbitMQ cluster: amqp:// URLs only")
        if len(schemes) > 1:
            raise ValueError("every broker URL of the list must use the same scheme")
        return ";".join(urls)

    @field_validator("database_url", "retention_database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("postgresql", "postgres://")):
            raise ValueError("must be a PostgreSQL URL, e.g. postgresql+psycopg://user@host/db")
        if value.startswith("postgres://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgres://")
        elif value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @model_validator(mode="after")
    def _https_unless_loopback(self) -> Settings:
        parts = urlsplit(self.capillary_base_url)
        if parts.scheme == "http" and not _is_loopback(parts.hostname or "") \
                and not self.capillary_allow_insecure_http:
            raise ValueError(
                "CAPILLARY_BASE_URL: plain http:// is refused for a non-loopback host, since "
                "credentials would travel in clear text; use https:// (a sandbox on a private "
                "network may set CAPILLARY_ALLOW_INSECURE_HTTP=true)"
            )
        return self

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        has_basic = self.capillary_username is not None or self.capillary_password is not None
        has_oauth = self.capillary_oauth_key is not None or self.capillary_oauth_secret is not None
        if has_basic and has_oauth:
            raise ValueError(
                "set either CAPILLARY_USERNAME + CAPILLARY_PASSWORD (Basic) or "
                "CAPILLARY_OAUTH_KEY + CAPILLARY_OAUTH_SECRET (OAuth), not both"
            )
        if has_basic and (self.capillary_username is None or self.capillary_password is None):
            raise ValueError("Basic auth needs both CAPILLARY_USERNAME and CAPILLARY_PASSWORD")
        if has_oauth and (self.capillary_oauth_key is None or self.capillary_oauth_secret is None):
            raise ValueError("OAuth needs both CAPILLARY_OAUTH_KEY and CAPILLARY_OAUTH_SECRET")
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("COUPONS_RETRY_MAX_SECONDS must be >= COUPONS_RETRY_BASE_SECONDS")
        one_call_s = self.http_connect_timeout_s + self.http_timeout_s
        minimum_lease_s = 3 * one_call_s + self.rate_limit_max_wait_s
        if self.lease_s < minimum_lease_s:
            # A task may read back (reconcile) and then issue, each bounded by the timeouts,
            # after waiting for the rate limiter; its claim must outlive all of that, or a
            # live call could be mistaken for a crashed one and reconciled concurrently.
            raise ValueError(
                "COUPONS_LEASE_SECONDS must be at least 3 x (connect + read timeout) + "
                f"COUPONS_RATE_LIMIT_MAX_WAIT_SECONDS = {minimum_lease_s:g}"
            )
        if self.settle_window_s <= one_call_s:
            # An abandoned request can land at least until the client gave up on it; a
            # read-back that ends sooner cannot prove the coupon was not issued.
            raise ValueError(
                "COUPONS_SETTLE_WINDOW_SECONDS must exceed connect + read timeout "
                f"({one_call_s:g} s)"
            )
        if self.retention_days is not None and (
                self.retention_event_id_window_days < self.retention_days
                or self.retention_audit_days < self.retention_days):
            # An id must be recognised for as long as its event is kept, and the audit trail
            # outlives what it speaks of.
            raise ValueError("COUPONS_RETENTION_EVENT_ID_WINDOW_DAYS and "
                             "COUPONS_RETENTION_AUDIT_DAYS must be at least "
                             "COUPONS_RETENTION_DAYS")
        if self.db_lock_timeout_s > self.db_statement_timeout_s:
            # Waiting for a lock is part of a statement's time: a longer lock timeout never fires.
            raise ValueError("COUPONS_DB_LOCK_TIMEOUT_SECONDS must not exceed "
                             "COUPONS_DB_STATEMENT_TIMEOUT_SECONDS")
        if self.db_stall_limit_s >= self.task_hard_time_limit_s:
            # Past the hard time limit Celery kills the task wherever it is; a stalled database
            # must fail the statement first, so the task puts its message back on purpose.
            raise ValueError(
                "COUPONS_DB_CONNECT_TIMEOUT_SECONDS + the longer of "
                "COUPONS_DB_STATEMENT_TIMEOUT_SECONDS and the keepalive detection time "
                "(COUPONS_DB_KEEPALIVE_IDLE_SECONDS + COUPONS_DB_KEEPALIVE_INTERVAL_SECONDS x "
                f"COUPONS_DB_KEEPALIVE_COUNT) = {self.db_stall_limit_s:g} s must be below the "
                f"task hard time limit (COUPONS_LEASE_SECONDS - 5 = "
                f"{self.task_hard_time_limit_s:g} s)"
            )
        return self

    @model_validator(mode="after")
    def _broker_counts_after_us(self) -> Settings:
        if self.delivery_limit <= self.message_failure_limit:
            # The worker counts the failures it sees and keeps the message as a dead letter in
            # the ledger; the broker's limit is the net below that, for deliveries it never saw
            # end (a pool process killed, a connection lost).
            raise ValueError("COUPONS_DELIVERY_LIMIT must exceed COUPONS_MESSAGE_FAILURE_LIMIT")
        return self

    def broker_transport_options(self) -> dict[str, object]:
        """kombu transport options: publisher confirms on AMQP; folders for the file broker."""
        if self.broker_url.startswith(("amqp", "pyamqp")):
            return {"confirm_publish": True}
        if self.broker_url.startswith(("filesystem", "cwfile")):
            # The demo's no-server fallback: one folder shared by every process, polled often
            # (kombu's default of one second would pace the demo's small pipeline).
            root = self.broker_folder or ".coupon-broker"
            return {"data_folder_in": f"{root}/messages", "data_folder_out": f"{root}/messages",
                    "control_folder": f"{root}/control", "polling_interval": 0.1}
        return {}

    @property
    def broker_urls(self) -> list[str]:
        """The broker URLs: several for a cluster, tried in turn on connection loss."""
        return self.broker_url.split(";")

    @property
    def auth_scheme(self) -> AuthScheme | None:
        """Which Capillary auth the credentials select, or None when none are set."""
        if self.capillary_oauth_key is not None:
            return "oauth"
        if self.capillary_username is not None:
            return "basic"
        return None

    def require_capillary_credentials(self) -> AuthScheme:
        """The auth scheme, or a clear error for commands that must call Capillary."""
        scheme = self.auth_scheme
        if scheme is None:
            raise ConfigurationError(
                "no Capillary credentials: set CAPILLARY_USERNAME + CAPILLARY_PASSWORD (Basic) "
                "or CAPILLARY_OAUTH_KEY + CAPILLARY_OAUTH_SECRET (OAuth)"
            )
        return scheme

    @cached_property
    def task_hard_time_limit_s(self) -> float:
        """A task is killed before its claim expires, so an expired lease means a dead task."""
        return max(self.lease_s - 5.0, 1.0)

    def database_secret(self) -> Secret | None:
        """COUPONS_DATABASE_PASSWORD as a ``Secret`` (following its file when it is given as
        one), for an engine on ``database_url``; None when unset. One per engine."""
        return Secret.of(self, "database_password")

    def ledger_url(self) -> str:
        """``database_url`` with COUPONS_DATABASE_PASSWORD (read now) in it, for the commands
        that connect once (migrate, the schema check); the worker's engines ask for the
        password per connection instead (``database_secret``)."""
        secret = self.database_secret()
        if secret is None:
            return self.database_url
        from sqlalchemy.engine import make_url

        return make_url(self.database_url).set(password=secret.get()).render_as_string(
            hide_password=False)

    @property
    def retention_url(self) -> str:
        """Where the retention job connects: its own URL, else the ledger's."""
        return self.retention_database_url or self.database_url

    @property
    def claim_lease_s(self) -> float:
        """A claim's lease: three heartbeats, so two renewals may fail before it runs out;
        never longer than the claim deadline."""
        return min(3 * self.claim_heartbeat_s, self.lease_s)

    @property
    def db_dead_peer_s(self) -> int:
        """How long TCP keepalives take to declare a silent database server gone."""
        return self.db_keepalive_idle_s + self.db_keepalive_interval_s * self.db_keepalive_count

    @property
    def db_stall_limit_s(self) -> float:
        """The longest one ledger statement can hang before it fails: connecting, then either
        the server's statement timeout or, if the server went silent, the keepalives."""
        return self.db_connect_timeout_s + max(self.db_statement_timeout_s, self.db_dead_peer_s)

    def safe_summary(self) -> dict[str, object]:
        """What the settings say, with every password and secret hidden: safe to log."""
        from kombu.utils.url import maybe_sanitize_url
        from sqlalchemy.engine import make_url

        return {
            "database": make_url(self.database_url).render_as_string(hide_password=True),
            "broker": ";".join(maybe_sanitize_url(url) for url in self.broker_urls),
            "capillary": self.capillary_base_url,
            "auth": self.auth_scheme or "none",
            "queues": [self.events_queue, self.tasks_queue, self.retry_queue, self.dead_queue],
            "max_attempts": self.max_attempts,
            "rate_limit_per_minute": self.rate_limit_per_minute,
        }


def _env_name(field_name: str) -> str:
    """The environment variable behind a settings field (errors name what users set)."""
    field = Settings.model_fields.get(field_name)
    alias = field.validation_alias if field is not None else None
    return alias if isinstance(alias, str) else field_name


def dotenv_file() -> str | None:
    """The optional dotenv file every settings class reads: ``COUPONS_ENV_FILE`` (default
    ``.env``; empty for none)."""
    return os.environ.get("COUPONS_ENV_FILE", ".env") or None


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; a bad value raises ConfigurationError naming it.

    ``COUPONS_ENV_FILE`` names the optional dotenv file (default ``.env``; empty for none).
    """
    try:
        return Settings(_env_file=dotenv_file(), **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            names = [_env_name(str(part)) for part in error["loc"]]
            problems.append(f"{'.'.join(names)}: {message}" if names else message)
        raise ConfigurationError("invalid configuration:\n  " + "\n  ".join(problems)) from None
