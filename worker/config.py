"""Settings from the environment (and an optional ``.env``), validated once at start.

Every variable, its default and meaning is listed in the README's configuration table; the
names are shared with other tools, so they are part of the public surface. Nothing here opens a
connection: ``load_settings()`` only reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from datetime import UTC, timedelta, timezone, tzinfo
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from worker.domain.errors import ConfigurationError
from worker.secret_files import Secret, SecretFilesSource
from worker.tracing import TraceMode

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/coupon_worker"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_SANDBOX_PORT = 8750
DEFAULT_CAPILLARY_BASE_URL = f"http://127.0.0.1:{DEFAULT_SANDBOX_PORT}"
DEFAULT_PREFETCH_MULTIPLIER = 2
# Per host, not per deployment: `coupon-worker health` reads the heartbeats of the workers
# running beside it.
DEFAULT_HEARTBEAT_DIR = str(Path(tempfile.gettempdir()) / "coupon-worker")

AuthScheme = Literal["basic", "oauth"]
#: The youngest audit row the database lets the retention job delete, in days (the trigger of
#: migration 0009 holds the same number): COUPONS_RETENTION_AUDIT_DAYS cannot go below it.
AUDIT_FLOOR_DAYS = 90


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


class Settings(BaseSettings):
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

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, SecretFilesSource(settings_cls, env_settings, dotenv_settings),
                env_settings, dotenv_settings, file_secret_settings)

    # URLs may carry passwords: kept out of repr(); safe_summary() shows them redacted.
    database_url: str = Field(
        DEFAULT_DATABASE_URL, validation_alias="COUPONS_DATABASE_URL", repr=False)
    # The retention job's own connection (its role may delete; the worker's may not): the
    # scheduled prune and `coupon-worker prune` use it when set (docs/security.md).
    database_password: SecretStr | None = Field(
        None, validation_alias="COUPONS_DATABASE_PASSWORD", repr=False,
        description="The ledger's password, instead of one in COUPONS_DATABASE_URL. Given as "
                    "COUPONS_DATABASE_PASSWORD_FILE, it is read again when the file changes: "
                    "new connections use the new password, no restart (docs/secrets.md).")
    retention_database_url: str | None = Field(
        None, validation_alias="COUPONS_RETENTION_DATABASE_URL", repr=False)
    broker_url: str = Field(DEFAULT_BROKER_URL, validation_alias="COUPONS_BROKER_URL", repr=False)
    broker_folder: str | None = Field(None, validation_alias="COUPONS_BROKER_FOLDER")

    capillary_base_url: str = Field(
        DEFAULT_CAPILLARY_BASE_URL, validation_alias="CAPILLARY_BASE_URL"
    )
    capillary_username: str | None = Field(None, validation_alias="CAPILLARY_USERNAME")
    capillary_password: SecretStr | None = Field(None, validation_alias="CAPILLARY_PASSWORD")
    capillary_oauth_key: str | None = Field(None, validation_alias="CAPILLARY_OAUTH_KEY")
    capillary_oauth_secret: SecretStr | None = Field(
        None, validation_alias="CAPILLARY_OAUTH_SECRET"
    )
    capillary_source: str | None = Field(None, validation_alias="CAPILLARY_SOURCE")
    #: The organisation's time zone in Capillary (an offset such as +05:30, or a zone name):
    #: a date or a time without offset in an answer (a date-only validTill) is read in it.
    capillary_timezone: str = Field("UTC", validation_alias="CAPILLARY_TIMEZONE")
    #: Series per bulk-issue call: an event with more is issued in several calls.
    capillary_max_series_per_call: int = Field(
        100, ge=1, le=1000, validation_alias="CAPILLARY_MAX_SERIES_PER_CALL")
    capillary_allow_insecure_http: bool = Field(
        False, validation_alias="CAPILLARY_ALLOW_INSECURE_HTTP")

    http_timeout_s: float = Field(10.0, gt=0, validation_alias="COUPONS_HTTP_TIMEOUT_SECONDS")
    http_connect_timeout_s: float = Field(
        3.05, gt=0, validation_alias="COUPONS_HTTP_CONNECT_TIMEOUT_SECONDS"
    )
    http_pool_size: int = Field(10, ge=1, validation_alias="COUPONS_HTTP_POOL_SIZE")

    events_queue: str = Field(
        "coupons.events", min_length=1, validation_alias="COUPONS_EVENTS_QUEUE")
    tasks_queue: str = Field("coupons.tasks", min_length=1, validation_alias="COUPONS_TASKS_QUEUE")
    retry_queue: str = Field("coupons.retry", min_length=1, validation_alias="COUPONS_RETRY_QUEUE")
    dead_queue: str = Field("coupons.dead", min_length=1, validation_alias="COUPONS_DEAD_QUEUE")
    queue_type: Literal["classic", "quorum"] = Field(
        "classic", validation_alias="COUPONS_QUEUE_TYPE")
    #: Where RabbitMQ dead-letters a message delivered more than ``delivery_limit`` times
    #: (quorum queues, through the policy ``coupon-worker broker setup`` sets).
    parked_queue: str = Field(
        "coupons.parked", min_length=1, validation_alias="COUPONS_PARKED_QUEUE")
    delivery_limit: int = Field(50, ge=2, validation_alias="COUPONS_DELIVERY_LIMIT")
    dead_queue_max_length: int = Field(
        100_000, ge=1, validation_alias="COUPONS_DEAD_QUEUE_MAX_LENGTH"
    )
    max_event_bytes: int = Field(65_536, ge=1024, validation_alias="COUPONS_MAX_EVENT_BYTES")
    #: How bus messages reach the pool: ``direct`` (Celery's consumer reads the events queue
    #: and runs each message as ``coupons.ingest``, ``worker.entrypoints.celery.intake``) or
    #: ``bridge`` (a consumer step publishes each as a task first,
    #: ``worker.entrypoints.celery.bridge``).
    bus_intake: Literal["direct", "bridge"] = Field(
        "direct", validation_alias="COUPONS_BUS_INTAKE")

    max_attempts: int = Field(8, ge=1, validation_alias="COUPONS_MAX_ATTEMPTS")
    # Deliveries of one message that may fail for a reason not its own (a bug of ours, a
    # database refusing a statement) before it is kept as a dead letter (never a rejection).
    message_failure_limit: int = Field(
        5, ge=1, le=100, validation_alias="COUPONS_MESSAGE_FAILURE_LIMIT")
    retry_base_s: float = Field(2.0, gt=0, validation_alias="COUPONS_RETRY_BASE_SECONDS")
    retry_max_s: float = Field(900.0, gt=0, validation_alias="COUPONS_RETRY_MAX_SECONDS")
    reconcile_delay_s: float = Field(
        2.0, ge=0, validation_alias="COUPONS_RECONCILE_DELAY_SECONDS"
    )
    # The longest a task may hold a claim (its hard time limit is 5 s less). The claim's own
    # lease is short and renewed by a heartbeat while the task lives (worker.usecases.leases).
    lease_s: float = Field(120.0, gt=0, validation_alias="COUPONS_LEASE_SECONDS")
    claim_heartbeat_s: float = Field(
        10.0, ge=0.2, validation_alias="COUPONS_CLAIM_HEARTBEAT_SECONDS")
    # Twice the 60 s read timeout common to gateways and proxies in front of an API: a request
    # that a gateway gave up on may still be running behind it for that long.
    settle_window_s: float = Field(
        120.0, gt=0, validation_alias="COUPONS_SETTLE_WINDOW_SECONDS")
    run_sweeper: bool = Field(True, validation_alias="COUPONS_RUN_SWEEPER")
    sweep_interval_s: float = Field(1.0, gt=0, validation_alias="COUPONS_SWEEP_INTERVAL_SECONDS")
    requeue_after_s: float = Field(300.0, gt=0, validation_alias="COUPONS_REQUEUE_AFTER_SECONDS")

    # Retention (docs/retention.md). Scheduled only when COUPONS_RETENTION_DAYS is set;
    # `coupon-worker prune --older-than` runs it by hand either way.
    retention_days: int | None = Field(None, ge=1, validation_alias="COUPONS_RETENTION_DAYS")
    retention_event_id_window_days: int = Field(
        400, ge=1, validation_alias="COUPONS_RETENTION_EVENT_ID_WINDOW_DAYS")
    retention_audit_days: int = Field(
        730, ge=AUDIT_FLOOR_DAYS,
        validation_alias="COUPONS_RETENTION_AUDIT_DAYS")
    retention_interval_s: float = Field(
        86_400.0, ge=60, validation_alias="COUPONS_RETENTION_INTERVAL_SECONDS")
    retention_batch_size: int = Field(
        1000, ge=1, le=50_000, validation_alias="COUPONS_RETENTION_BATCH_SIZE")

    # The ledger's limits. A stalled database must fail a task with LedgerUnavailable (its
    # message goes back) well before Celery's hard time limit kills it; see _coherent().
    db_connect_timeout_s: int = Field(
        5, ge=2, validation_alias="COUPONS_DB_CONNECT_TIMEOUT_SECONDS")
    db_statement_timeout_s: float = Field(
        10.0, gt=0, validation_alias="COUPONS_DB_STATEMENT_TIMEOUT_SECONDS")
    db_lock_timeout_s: float = Field(
        3.0, gt=0, validation_alias="COUPONS_DB_LOCK_TIMEOUT_SECONDS")
    db_keepalive_idle_s: int = Field(
        10, ge=1, validation_alias="COUPONS_DB_KEEPALIVE_IDLE_SECONDS")
    db_keepalive_interval_s: int = Field(
        5, ge=1, validation_alias="COUPONS_DB_KEEPALIVE_INTERVAL_SECONDS")
    db_keepalive_count: int = Field(3, ge=1, validation_alias="COUPONS_DB_KEEPALIVE_COUNT")
    #: What stands between the worker and PostgreSQL: ``none`` (a direct connection, or a
    #: pooler in session mode) or ``transaction`` (a pooler in transaction mode: PgBouncer's
    #: ``pool_mode = transaction``, as most managed poolers). With ``transaction`` no
    #: statement is prepared on the server and the timeouts are set per transaction
    #: (docs/pooler.md).
    db_pooler: Literal["none", "transaction"] = Field(
        "none", validation_alias="COUPONS_DB_POOLER")
    #: Whether ledger statements are prepared on the server: ``auto`` (yes with
    #: ``COUPONS_DB_POOLER=none``, no with ``transaction``), ``on`` (behind a pooler that keeps
    #: them per client: PgBouncer 1.21 or later with ``max_prepared_statements``) or ``off``.
    db_prepared_statements: Literal["auto", "on", "off"] = Field(
        "auto", validation_alias="COUPONS_DB_PREPARED_STATEMENTS")

    #: Connections each process keeps open to the ledger; it may open as many again at a peak
    #: (SQLAlchemy's overflow), so a process holds at most twice this (docs/capacity.md).
    db_pool_size: int = Field(5, ge=1, le=50, validation_alias="COUPONS_DB_POOL_SIZE")
    #: The ledger's roles are ``<prefix>_owner``, ``_worker``, ``_console``, ``_retention``
    #: (``coupon-worker db roles``); ``migrate`` grants them their tables when they exist.
    db_role_prefix: str = Field("coupon", pattern=r"^[a-z_][a-z0-9_]{0,30}$",
                                validation_alias="COUPONS_DB_ROLE_PREFIX")

    heartbeat_dir: str = Field(DEFAULT_HEARTBEAT_DIR, min_length=1,
                               validation_alias="COUPONS_HEARTBEAT_DIR")
    heartbeat_interval_s: float = Field(
        5.0, gt=0, validation_alias="COUPONS_HEARTBEAT_INTERVAL_SECONDS")

    circuit_failure_threshold: int = Field(
        5, ge=1, validation_alias="COUPONS_CIRCUIT_FAILURE_THRESHOLD"
    )
    circuit_open_s: float = Field(30.0, gt=0, validation_alias="COUPONS_CIRCUIT_OPEN_SECONDS")

    rate_limit_per_minute: int | None = Field(
        None, ge=1, validation_alias="COUPONS_RATE_LIMIT_PER_MINUTE"
    )
    rate_limit_burst: int | None = Field(None, ge=1, validation_alias="COUPONS_RATE_LIMIT_BURST")
    rate_limit_max_wait_s: float = Field(
        30.0, gt=0, validation_alias="COUPONS_RATE_LIMIT_MAX_WAIT_SECONDS"
    )

    worker_concurrency: int | None = Field(
        None, ge=1, validation_alias="COUPONS_WORKER_CONCURRENCY"
    )
    #: Unacknowledged messages a worker holds per pool process (Celery's prefetch multiplier).
    prefetch_multiplier: int = Field(DEFAULT_PREFETCH_MULTIPLIER, ge=1, le=16,
                                     validation_alias="COUPONS_PREFETCH_MULTIPLIER")
    task_events: bool = Field(True, validation_alias="COUPONS_TASK_EVENTS")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias="COUPONS_LOG_LEVEL"
    )
    log_format: Literal["kv", "json"] = Field("kv", validation_alias="COUPONS_LOG_FORMAT")
    metrics_port: int = Field(9808, ge=0, le=65535, validation_alias="COUPONS_METRICS_PORT")
    tracing: TraceMode = Field(
        "auto", validation_alias="COUPONS_TRACING",
        description="Traces with OpenTelemetry (the tracing extra; docs/tracing.md): auto (on "
                    "when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is "
                    "set), on or off. The OTEL_* variables (endpoint, headers, service name, "
                    "sampler) are OpenTelemetry's own.")

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


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; a bad value raises ConfigurationError naming it.

    ``COUPONS_ENV_FILE`` names the optional dotenv file (default ``.env``; empty for none).
    """
    env_file = os.environ.get("COUPONS_ENV_FILE", ".env") or None
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            names = [_env_name(str(part)) for part in error["loc"]]
            problems.append(f"{'.'.join(names)}: {message}" if names else message)
        raise ConfigurationError("invalid configuration:\n  " + "\n  ".join(problems)) from None
