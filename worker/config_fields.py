"""The settings' fields: every environment variable, its type, default and description.

The reference page docs/reference/configuration.md is generated from these fields
(``make docs-reference``), so a field's ``description`` is what users read: say what it does and
in what unit. :mod:`worker.config` builds :class:`~worker.config.Settings` on them and checks
them together; nothing here reads the environment. The secrets among them are also read from
the file ``<NAME>_FILE`` names (``Settings.secret_file_fields``, docs/secrets.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/coupon_worker"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_SANDBOX_PORT = 8750
DEFAULT_CAPILLARY_BASE_URL = f"http://127.0.0.1:{DEFAULT_SANDBOX_PORT}"
DEFAULT_PREFETCH_MULTIPLIER = 2
# Per host, not per deployment: `coupon-worker health` reads the heartbeats of the workers
# running beside it.
DEFAULT_HEARTBEAT_DIR = str(Path(tempfile.gettempdir()) / "coupon-worker")
#: The youngest audit row the database lets the retention job delete, in days (the trigger of
#: migration 0009 holds the same number): COUPONS_RETENTION_AUDIT_DAYS cannot go below it.
AUDIT_FLOOR_DAYS = 90


class SettingsFields(BaseSettings):
    """What can be set, field by field; :class:`worker.config.Settings` adds the checks."""

    # URLs may carry passwords: kept out of repr(); safe_summary() shows them redacted.
    database_url: str = Field(
        DEFAULT_DATABASE_URL, validation_alias="COUPONS_DATABASE_URL", repr=False,
        description="The ledger: a PostgreSQL URL (`postgres://` and `postgresql://` are read "
                    "as `postgresql+psycopg://`).")
    database_password: SecretStr | None = Field(
        None, validation_alias="COUPONS_DATABASE_PASSWORD", repr=False,
        description="The ledger's password, instead of one in `COUPONS_DATABASE_URL` (it wins "
                    "over one there); also used by the retention job when "
                    "`COUPONS_RETENTION_DATABASE_URL` is not set. Given as a file, it is read "
                    "again when the file changes: new connections use the new password, with "
                    "no restart.")
    # The retention job's own role may delete; the worker's may not (docs/security.md).
    retention_database_url: str | None = Field(
        None, validation_alias="COUPONS_RETENTION_DATABASE_URL", repr=False,
        description="The retention job's own connection (the `<prefix>_retention` role, which "
                    "may delete what it prunes; the worker's role may not): the workers' "
                    "scheduled prune and `coupon-worker prune` use it when set, else "
                    "`COUPONS_DATABASE_URL`.")
    broker_url: str = Field(
        DEFAULT_BROKER_URL, validation_alias="COUPONS_BROKER_URL", repr=False,
        description="RabbitMQ; a cluster's nodes as a `;`-separated list of `amqp://` URLs, "
                    "tried in turn on connection loss (docs/rabbitmq-cluster.md). The demo's "
                    "no-server fallback uses `cwfile://`, the file-based transport of the dev "
                    "tools.")
    broker_folder: str | None = Field(
        None, validation_alias="COUPONS_BROKER_FOLDER",
        description="Folder of the file-based broker (`cwfile://`); unused with RabbitMQ.")

    capillary_base_url: str = Field(
        DEFAULT_CAPILLARY_BASE_URL, validation_alias="CAPILLARY_BASE_URL",
        description="Your Capillary cluster, e.g. `https://eu.api.capillarytech.com` (the "
                    "default is the sandbox); plain `http://` only for a loopback host.")
    capillary_username: str | None = Field(
        None, validation_alias="CAPILLARY_USERNAME",
        description="Basic auth's user name, with `CAPILLARY_PASSWORD`.")
    capillary_password: SecretStr | None = Field(
        None, validation_alias="CAPILLARY_PASSWORD",
        description="Basic auth's password (sent MD5-hashed, as Capillary wants).")
    capillary_oauth_key: str | None = Field(
        None, validation_alias="CAPILLARY_OAUTH_KEY",
        description="OAuth instead of Basic auth, with `CAPILLARY_OAUTH_SECRET` (the token is "
                    "cached, renewed before expiry and once on a 401).")
    capillary_oauth_secret: SecretStr | None = Field(
        None, validation_alias="CAPILLARY_OAUTH_SECRET",
        description="OAuth's client secret, with `CAPILLARY_OAUTH_KEY`.")
    capillary_source: str | None = Field(
        None, validation_alias="CAPILLARY_SOURCE",
        description="The `source` query parameter of bulk issue (e.g. `INSTORE`).")
    capillary_timezone: str = Field(
        "UTC", validation_alias="CAPILLARY_TIMEZONE",
        description="The organisation's time zone in Capillary (`+05:30` or `Asia/Kolkata`): "
                    "a date or time without offset in an answer (a date-only `validTill`) is "
                    "read in it.")
    capillary_max_series_per_call: int = Field(
        100, ge=1, le=1000, validation_alias="CAPILLARY_MAX_SERIES_PER_CALL",
        description="Series per bulk-issue call: an event with more (up to 1000 series) is "
                    "issued in several calls, each call's outcome committed before the next "
                    "is sent.")
    capillary_allow_insecure_http: bool = Field(
        False, validation_alias="CAPILLARY_ALLOW_INSECURE_HTTP",
        description="Allow `http://` to a non-loopback host (a sandbox on a private network).")

    http_timeout_s: float = Field(
        10.0, gt=0, validation_alias="COUPONS_HTTP_TIMEOUT_SECONDS",
        description="Read timeout of a Capillary call, in seconds.")
    http_connect_timeout_s: float = Field(
        3.05, gt=0, validation_alias="COUPONS_HTTP_CONNECT_TIMEOUT_SECONDS",
        description="Connect timeout of a Capillary call, in seconds.")
    http_pool_size: int = Field(
        10, ge=1, validation_alias="COUPONS_HTTP_POOL_SIZE",
        description="Pooled HTTP connections to Capillary per worker thread.")

    events_queue: str = Field(
        "coupons.events", min_length=1, validation_alias="COUPONS_EVENTS_QUEUE",
        description="The queue of plain-JSON events from the bus.")
    tasks_queue: str = Field(
        "coupons.tasks", min_length=1, validation_alias="COUPONS_TASKS_QUEUE",
        description="The queue of the Celery tasks `coupons.issue` and `coupons.ingest`.")
    retry_queue: str = Field(
        "coupons.retry", min_length=1, validation_alias="COUPONS_RETRY_QUEUE",
        description="The queue of due retries, one message per entity.")
    dead_queue: str = Field(
        "coupons.dead", min_length=1, validation_alias="COUPONS_DEAD_QUEUE",
        description="Dead-letter announcements, for alerting (the ledger keeps every one).")
    queue_type: Literal["classic", "quorum"] = Field(
        "classic", validation_alias="COUPONS_QUEUE_TYPE",
        description="`quorum` declares every queue as a replicated quorum queue (production); "
                    "RabbitMQ cannot convert a queue in place.")
    parked_queue: str = Field(
        "coupons.parked", min_length=1, validation_alias="COUPONS_PARKED_QUEUE",
        description="Where RabbitMQ parks a message of a quorum queue delivered past the "
                    "delivery limit (`coupon-worker broker setup`, `broker parked`, "
                    "`broker move-back`).")
    delivery_limit: int = Field(
        50, ge=2, validation_alias="COUPONS_DELIVERY_LIMIT",
        description="The quorum queues' delivery limit, set by `coupon-worker broker setup`'s "
                    "policy; must exceed `COUPONS_MESSAGE_FAILURE_LIMIT`.")
    dead_queue_max_length: int = Field(
        100_000, ge=1, validation_alias="COUPONS_DEAD_QUEUE_MAX_LENGTH",
        description="The newest announcements kept on the dead queue (the ledger keeps all).")
    max_event_bytes: int = Field(
        65_536, ge=1024, validation_alias="COUPONS_MAX_EVENT_BYTES",
        description="Larger messages are rejected (and kept, as rejected events).")
    bus_intake: Literal["direct", "bridge"] = Field(
        "direct", validation_alias="COUPONS_BUS_INTAKE",
        description="How bus messages reach the pool: `direct` (Celery's consumer reads the "
                    "events queue and runs each message as `coupons.ingest`, acknowledged late) "
                    "or `bridge` (a consumer step publishes each as a task first).")

    max_attempts: int = Field(
        8, ge=1, validation_alias="COUPONS_MAX_ATTEMPTS",
        description="Attempts per entity before it is dead.")
    message_failure_limit: int = Field(
        5, ge=1, le=100, validation_alias="COUPONS_MESSAGE_FAILURE_LIMIT",
        description="Deliveries of one message that may fail for a reason not its own (a bug "
                    "of ours, a database refusing a statement) before it is kept as a dead "
                    "letter of kind `internal_error` or `infrastructure`; never a rejection.")
    retry_base_s: float = Field(
        2.0, gt=0, validation_alias="COUPONS_RETRY_BASE_SECONDS",
        description="Backoff base, in seconds (full jitter: uniform(0, base x 2^(attempt-1))).")
    retry_max_s: float = Field(
        900.0, gt=0, validation_alias="COUPONS_RETRY_MAX_SECONDS",
        description="Backoff cap, in seconds; at least the base.")
    reconcile_delay_s: float = Field(
        2.0, ge=0, validation_alias="COUPONS_RECONCILE_DELAY_SECONDS",
        description="The least wait before reading back an ambiguous call, in seconds.")
    lease_s: float = Field(
        120.0, gt=0, validation_alias="COUPONS_LEASE_SECONDS",
        description="The longest a task may hold a claim, in seconds (its hard time limit is "
                    "5 s less); at least 3 x (connect + read timeout) + the rate limit's "
                    "longest wait.")
    claim_heartbeat_s: float = Field(
        10.0, ge=0.2, validation_alias="COUPONS_CLAIM_HEARTBEAT_SECONDS",
        description="How often a task's claims are renewed while it runs, in seconds; a "
                    "claim's lease is three heartbeats (at most `COUPONS_LEASE_SECONDS`), so a "
                    "killed or hung task's entities come back within about 30 s.")
    # Twice the 60 s read timeout common to gateways and proxies in front of an API: a request
    # that a gateway gave up on may still be running behind it for that long.
    settle_window_s: float = Field(
        120.0, gt=0, validation_alias="COUPONS_SETTLE_WINDOW_SECONDS",
        description="How long after an unknown outcome its original call may still land, in "
                    "seconds: a read-back that finds nothing proves \"not issued\" only after "
                    "it; must exceed connect + read timeout.")
    run_sweeper: bool = Field(
        True, validation_alias="COUPONS_RUN_SWEEPER",
        description="Run the sweeper in this worker (`coupon-worker worker --no-sweeper` too).")
    sweep_interval_s: float = Field(
        1.0, gt=0, validation_alias="COUPONS_SWEEP_INTERVAL_SECONDS",
        description="How often the sweeper runs, in seconds.")
    requeue_after_s: float = Field(
        300.0, gt=0, validation_alias="COUPONS_REQUEUE_AFTER_SECONDS",
        description="A queued retry whose message vanished is dispatched again after this "
                    "many seconds.")

    retention_days: int | None = Field(
        None, ge=1, validation_alias="COUPONS_RETENTION_DAYS",
        description="Settled events older than this many days are pruned by the workers' "
                    "schedule; unset, nothing is scheduled (`coupon-worker prune` works by "
                    "hand either way; docs/retention.md).")
    retention_event_id_window_days: int = Field(
        400, ge=1, validation_alias="COUPONS_RETENTION_EVENT_ID_WINDOW_DAYS",
        description="A pruned event's id is still recognised (a redelivery is not issued "
                    "again) until this many days after it was received; at least "
                    "`COUPONS_RETENTION_DAYS`.")
    retention_audit_days: int = Field(
        730, ge=AUDIT_FLOOR_DAYS, validation_alias="COUPONS_RETENTION_AUDIT_DAYS",
        description="Audit rows (`operator_actions`) are removed past this age in days, by "
                    "the retention job only; at least 90 and at least `COUPONS_RETENTION_DAYS`.")
    retention_interval_s: float = Field(
        86_400.0, ge=60, validation_alias="COUPONS_RETENTION_INTERVAL_SECONDS",
        description="The scheduled prune runs at most once per this many seconds, on one "
                    "worker of the fleet.")
    retention_batch_size: int = Field(
        1000, ge=1, le=50_000, validation_alias="COUPONS_RETENTION_BATCH_SIZE",
        description="Events (or audit rows) per prune transaction.")

    # The ledger's limits. A stalled database must fail a task with LedgerUnavailable (its
    # message goes back) well before Celery's hard time limit kills it; see _coherent().
    db_connect_timeout_s: int = Field(
        5, ge=2, validation_alias="COUPONS_DB_CONNECT_TIMEOUT_SECONDS",
        description="libpq's connect timeout, in whole seconds.")
    db_statement_timeout_s: float = Field(
        10.0, gt=0, validation_alias="COUPONS_DB_STATEMENT_TIMEOUT_SECONDS",
        description="The server cancels a worker statement running longer, in seconds; ledger "
                    "statements take milliseconds, so this only ever cuts a stall.")
    db_lock_timeout_s: float = Field(
        3.0, gt=0, validation_alias="COUPONS_DB_LOCK_TIMEOUT_SECONDS",
        description="A statement waiting this long for a lock gives up, in seconds (a longer "
                    "wait is a migration or an open session elsewhere); at most the statement "
                    "timeout.")
    db_keepalive_idle_s: int = Field(
        10, ge=1, validation_alias="COUPONS_DB_KEEPALIVE_IDLE_SECONDS",
        description="TCP keepalives on ledger connections: the first probe after this many "
                    "seconds of silence.")
    db_keepalive_interval_s: int = Field(
        5, ge=1, validation_alias="COUPONS_DB_KEEPALIVE_INTERVAL_SECONDS",
        description="Seconds between keepalive probes.")
    db_keepalive_count: int = Field(
        3, ge=1, validation_alias="COUPONS_DB_KEEPALIVE_COUNT",
        description="Unanswered probes before the connection is dead (10 + 5 x 3 = 25 s, also "
                    "the TCP user timeout); the connect timeout plus the longer of this and the "
                    "statement timeout must stay below the task hard time limit (lease - 5 s).")
    db_pooler: Literal["none", "transaction"] = Field(
        "none", validation_alias="COUPONS_DB_POOLER",
        description="What stands between the worker and PostgreSQL: `none` (a direct "
                    "connection, or a pooler in session mode) or `transaction` (PgBouncer's "
                    "`pool_mode = transaction`, as most managed poolers): no server-side "
                    "prepared statements, no session state, the timeouts set per transaction "
                    "(docs/pooler.md).")
    db_prepared_statements: Literal["auto", "on", "off"] = Field(
        "auto", validation_alias="COUPONS_DB_PREPARED_STATEMENTS",
        description="Whether ledger statements are prepared on the server: `auto` (yes with "
                    "`COUPONS_DB_POOLER=none`, no with `transaction`), `on` (behind a pooler "
                    "that keeps them per client: PgBouncer 1.21+ with "
                    "`max_prepared_statements`; untested here) or `off`.")
    db_pool_size: int = Field(
        5, ge=1, le=50, validation_alias="COUPONS_DB_POOL_SIZE",
        description="Sizes each process's (worker or console) ledger pool: it opens "
                    "connections as they are needed, up to twice this, and keeps them "
                    "(docs/capacity.md, `coupon-worker doctor`).")
    db_role_prefix: str = Field(
        "coupon", pattern=r"^[a-z_][a-z0-9_]{0,30}$", validation_alias="COUPONS_DB_ROLE_PREFIX",
        description="The ledger's roles are `<prefix>_owner`, `_worker`, `_console`, "
                    "`_retention` (`coupon-worker db roles`; docs/security.md); `migrate` "
                    "grants them their tables after every upgrade when they exist.")

    heartbeat_dir: str = Field(
        DEFAULT_HEARTBEAT_DIR, min_length=1, validation_alias="COUPONS_HEARTBEAT_DIR",
        description="Where each worker's consumer writes its heartbeat, read by "
                    "`coupon-worker health` on the same host.")
    heartbeat_interval_s: float = Field(
        5.0, gt=0, validation_alias="COUPONS_HEARTBEAT_INTERVAL_SECONDS",
        description="How often a worker writes its heartbeat, in seconds; one older than three "
                    "intervals is stale.")

    circuit_failure_threshold: int = Field(
        5, ge=1, validation_alias="COUPONS_CIRCUIT_FAILURE_THRESHOLD",
        description="Consecutive call failures that open the circuit.")
    circuit_open_s: float = Field(
        30.0, gt=0, validation_alias="COUPONS_CIRCUIT_OPEN_SECONDS",
        description="The circuit's first pause, in seconds (doubles while probes fail, up to "
                    "10 min).")

    rate_limit_per_minute: int | None = Field(
        None, ge=1, validation_alias="COUPONS_RATE_LIMIT_PER_MINUTE",
        description="Global limit of Capillary calls per minute across every worker and host; "
                    "unset, no limit.")
    rate_limit_burst: int | None = Field(
        None, ge=1, validation_alias="COUPONS_RATE_LIMIT_BURST",
        description="Calls allowed at once after a quiet spell; unset, the limit / 60, "
                    "between 1 and 10.")
    rate_limit_max_wait_s: float = Field(
        30.0, gt=0, validation_alias="COUPONS_RATE_LIMIT_MAX_WAIT_SECONDS",
        description="A call that would wait longer than this for the rate limit, in seconds, "
                    "is deferred instead.")

    worker_concurrency: int | None = Field(
        None, ge=1, validation_alias="COUPONS_WORKER_CONCURRENCY",
        description="Worker processes (prefork, the only pool: it enforces the hard time "
                    "limit); unset, the CPU count.")
    prefetch_multiplier: int = Field(
        DEFAULT_PREFETCH_MULTIPLIER, ge=1, le=16, validation_alias="COUPONS_PREFETCH_MULTIPLIER",
        description="Unacknowledged messages a worker holds per pool process: with 2, a "
                    "process that finishes finds its next message already in the worker; 1 for "
                    "tasks that run long (a crash re-delivers, and a slow worker holds, at most "
                    "this many per process).")
    task_events: bool = Field(
        True, validation_alias="COUPONS_TASK_EVENTS",
        description="Celery task events for Flower (published without broker confirms: best "
                    "effort, off the event's path).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias="COUPONS_LOG_LEVEL",
        description="`DEBUG` adds Celery's \"received\" and \"succeeded\" lines per task.")
    log_format: Literal["kv", "json"] = Field(
        "kv", validation_alias="COUPONS_LOG_FORMAT",
        description="`kv` (key=value) or `json`; secrets are redacted either way.")
    metrics_port: int = Field(
        9808, ge=0, le=65535, validation_alias="COUPONS_METRICS_PORT",
        description="Prometheus endpoint of each worker (`0` = off): the first free port from "
                    "this one up to 15 above it, so a second worker on the host serves on the "
                    "next; each logs `metrics.serving port=…` and tells it in `coupon-worker "
                    "health` and in its Flower / `celery inspect stats` entry.")
    tracing: Literal["auto", "on", "off"] = Field(
        "auto", validation_alias="COUPONS_TRACING",
        description="Traces with OpenTelemetry (the `tracing` extra; docs/tracing.md): `auto` "
                    "(on when `OTEL_EXPORTER_OTLP_ENDPOINT` or "
                    "`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set), `on` or `off`. The `OTEL_*` "
                    "variables (endpoint, protocol, headers, service name, sampler) are "
                    "OpenTelemetry's own.")
