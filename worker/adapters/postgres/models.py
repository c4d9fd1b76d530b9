"""SQLAlchemy 2.0 models: the ledger's schema. Alembic migrations must match these exactly.

Declared as ORM models, built as plain tables (``worker.adapters.postgres.declarative``): the
ledger's statements are SQLAlchemy core, and no worker process pays for the ORM's mappers.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

if TYPE_CHECKING:
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
else:
    # Plain tables at run time: no process loads the ORM for them (see ``declarative``).
    from worker.adapters.postgres.declarative import DeclarativeBase, Mapped, mapped_column

from worker.domain.model import DEAD_MESSAGE_KINDS, EntityState, EventState

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Timestamp = DateTime(timezone=True)


def _one_of(column: str, values: list[str]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Event(Base):
    """One inbound event, keyed by its idempotency key."""

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint(_one_of("state", [s.value for s in EventState]), name="state"),
        Index("ix_events_customer_key", "customer_key"),
        Index("ix_events_received_at", "received_at"),
        # The sweeper's repair of events left processing (0007).
        Index("ix_events_processing", "event_id", postgresql_where=text("state = 'processing'")),
        # Retention's scan of the settled events not yet pruned, oldest first (0009).
        Index("ix_events_prunable", "received_at", "event_id",
              postgresql_where=text("pruned_at IS NULL AND state = 'completed'")),
    )

    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    event_type: Mapped[str] = mapped_column(Text)
    customer_key: Mapped[str] = mapped_column(Text)
    customer: Mapped[dict[str, Any]] = mapped_column(JSONB)
    series_ids: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    fingerprint: Mapped[str] = mapped_column(Text)
    issue_ref: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime | None] = mapped_column(Timestamp)
    received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    state: Mapped[str] = mapped_column(Text, server_default=EventState.PROCESSING.value)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    #: Set by retention: the entities, calls, history and coupons are gone, and the customer,
    #: metadata and payload emptied; the row stays for the event-id window so that a
    #: redelivery is still recognised (docs/retention.md).
    pruned_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: What the event ended as, kept when it was pruned: entity states and coupon codes.
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    #: The W3C traceparent of its first delivery, when traces are recorded (0016): retries
    #: and replays link to that trace.
    traceparent: Mapped[str | None] = mapped_column(Text)


class Entity(Base):
    """One customer x one series of one event: what is issued, retried and dead-lettered."""

    __tablename__ = "entities"
    __table_args__ = (
        UniqueConstraint("event_id", "series_id"),
        CheckConstraint(_one_of("state", [s.value for s in EntityState]), name="state"),
        Index(
            "ix_entities_due",
            "next_attempt_at",
            postgresql_where=text("state = 'retry_wait'"),
        ),
        Index("ix_entities_queued", "queued_at", postgresql_where=text("state = 'queued'")),
        Index("ix_entities_leases", "lease_until", postgresql_where=text("state = 'in_flight'")),
        Index("ix_entities_dead", "dead_at", postgresql_where=text("state = 'dead'")),
        Index(
            "ix_entities_dead_unpublished",
            "id",
            postgresql_where=text("state = 'dead' AND dead_published_at IS NULL"),
        ),
        Index("ix_entities_customer_key", "customer_key"),
        # The console's dead-letter groups, read from the index alone (0015: with dead_at, so
        # that first and last need no visit to the table).
        Index("ix_entities_dead_causes", "last_error_code", "series_id", "last_error_message",
              postgresql_where=text("state = 'dead'"), postgresql_include=["dead_at"]),
        Index("ix_entities_updated_at", "updated_at"),
        Index("ix_entities_verify", "verify_after", postgresql_where=text(
            "verify_after IS NOT NULL")),
        # The metrics' oldest waiting retry and oldest unknown outcome, read at every scrape
        # (0013).
        Index("ix_entities_waiting_retry", "first_attempt_at",
              postgresql_where=text("state IN ('retry_wait', 'queued')")),
        Index("ix_entities_unknown_outcome", "settles_at", postgresql_where=text(
            "needs_reconcile AND state IN ('retry_wait', 'queued', 'in_flight')")),
        # The dead letters newest first, a page at a time (dlq list, the console) (0015).
        Index("ix_entities_dead_newest", text("dead_at DESC NULLS LAST"), text("id DESC"),
              postgresql_where=text("state = 'dead'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(Text, ForeignKey("events.event_id", ondelete="CASCADE"))
    series_id: Mapped[int] = mapped_column(Integer)
    customer_key: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text, server_default=EntityState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    needs_reconcile: Mapped[bool] = mapped_column(server_default=text("false"))
    last_verdict: Mapped[str | None] = mapped_column(Text)
    last_error_code: Mapped[str | None] = mapped_column(Text)
    last_error_message: Mapped[str | None] = mapped_column(Text)
    last_request_id: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp)
    queued_at: Mapped[datetime | None] = mapped_column(Timestamp)
    claim_token: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    first_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp)
    issued_at: Mapped[datetime | None] = mapped_column(Timestamp)
    dead_at: Mapped[datetime | None] = mapped_column(Timestamp)
    dead_reason: Mapped[str | None] = mapped_column(Text)
    dead_published_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: From this moment (database clock) an unknown outcome's original call can no longer
    #: land, so a read-back that does not show it proves it was not issued.
    settles_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: An issued entity whose history holds an unknown outcome: read back once more after
    #: this moment, to catch a late original that landed after the re-send.
    verify_after: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))


class EntityHistory(Base):
    """Every transition of an entity: the story support engineers read."""

    __tablename__ = "entity_history"
    __table_args__ = (Index("ix_entity_history_entity_id", "entity_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    entity_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("entities.id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    kind: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(Text)


class ApiCall(Base):
    """One HTTP call to Capillary, successful or not."""

    __tablename__ = "api_calls"
    __table_args__ = (
        Index("ix_api_calls_event_id", "event_id"),
        Index("ix_api_calls_entity_ids", "entity_ids", postgresql_using="gin"),
        # Support's search by X-Cap-Requestid (0011).
        Index("ix_api_calls_request_id", "request_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[str | None] = mapped_column(Text)
    entity_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    series_ids: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    operation: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    worker: Mapped[str | None] = mapped_column(Text)
    #: The attempt's own reference, sent in the notes (bulk issue calls only).
    issue_ref: Mapped[str | None] = mapped_column(Text)


class IssuedCoupon(Base):
    """A coupon Capillary issued for an entity: one, or two when a late original landed."""

    __tablename__ = "coupons"
    __table_args__ = (
        UniqueConstraint("entity_id", "code"),
        Index("ix_coupons_entity_id", "entity_id"),
        Index("ix_coupons_event_id", "event_id"),
        Index("ix_coupons_customer_key", "customer_key"),
        Index("ix_coupons_issued_at", "issued_at"),
        # Support's search by a code a customer reads out (0011).
        Index("ix_coupons_code", "code"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    entity_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("entities.id", ondelete="CASCADE")
    )
    event_id: Mapped[str] = mapped_column(Text)
    series_id: Mapped[int] = mapped_column(Integer)
    customer_key: Mapped[str] = mapped_column(Text)
    code: Mapped[str] = mapped_column(Text)
    capillary_coupon_id: Mapped[int | None] = mapped_column(BigInteger)
    description: Mapped[str | None] = mapped_column(Text)
    discount_code: Mapped[str | None] = mapped_column(Text)
    discount_type: Mapped[str | None] = mapped_column(Text)
    discount_value: Mapped[Decimal | None] = mapped_column(Numeric(18, 4))
    discount_upto: Mapped[Decimal | None] = mapped_column(Numeric(18, 4))
    discount_on: Mapped[str | None] = mapped_column(Text)
    valid_till: Mapped[datetime | None] = mapped_column(Timestamp)
    valid_till_date_time: Mapped[datetime | None] = mapped_column(Timestamp)
    raw: Mapped[dict[str, Any]] = mapped_column(JSONB)
    recorded_via: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    issued_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    #: What the answer warned of for this series (a list of text), NULL when nothing (0008).
    warnings: Mapped[list[str] | None] = mapped_column(JSONB)


class RejectedEvent(Base):
    """A message that was not a valid event: its raw bytes and the precise reason.

    The row is evidence and stays as it was received; a resubmission only links it to the
    event it became (``resubmitted_*``, set once; a trigger refuses any other change).
    """

    __tablename__ = "rejected_events"
    __table_args__ = (
        Index("ix_rejected_events_event_id", "event_id"),
        Index("ix_rejected_events_received_at", "received_at"),
        # Rejections still to announce on the dead queue, for the sweeper (0007).
        Index("ix_rejected_events_unannounced", "id",
              postgresql_where=text("dead_published_at IS NULL")),
        CheckConstraint(
            "kind IN (" + ", ".join(f"'{k}'" for k in DEAD_MESSAGE_KINDS) + ")", name="kind"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    source: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    size_bytes: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str | None] = mapped_column(Text)
    dead_published_at: Mapped[datetime | None] = mapped_column(Timestamp)
    resubmitted_at: Mapped[datetime | None] = mapped_column(Timestamp)
    resubmitted_event_id: Mapped[str | None] = mapped_column(Text)
    # Why it was kept (0010): its own bytes ("invalid", a rejection), or a failure of ours
    # that outlasted its redeliveries ("internal_error", "infrastructure"): a dead letter.
    kind: Mapped[str] = mapped_column(Text, server_default=text("'invalid'"))


class MessageFailure(Base):
    """How often one message failed for a reason not its own (0010), until it is dead-lettered.

    Keyed by the event id, or by a digest of the bytes when there is none.
    """

    __tablename__ = "message_failures"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    failures: Mapped[int] = mapped_column(Integer)
    first_failed_at: Mapped[datetime] = mapped_column(Timestamp)
    last_failed_at: Mapped[datetime] = mapped_column(Timestamp)
    last_error: Mapped[str] = mapped_column(Text)


class OperatorAction(Base):
    """An audit row for every replay and discard: who, when, why, what happened."""

    __tablename__ = "operator_actions"
    __table_args__ = (
        Index("ix_operator_actions_entity_id", "entity_id"),
        Index("ix_operator_actions_event_id", "event_id"),
        Index("ix_operator_actions_at", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    action: Mapped[str] = mapped_column(Text)
    operator: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    #: The entity acted on. Not a foreign key: an audit row keeps the id after the entity is
    #: pruned (a key's ``ON DELETE SET NULL`` would rewrite the row, which is refused).
    entity_id: Mapped[int | None] = mapped_column(BigInteger)
    event_id: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


class MaintenanceRun(Base):
    """A scheduled job of the fleet (``prune``): when it last started, on which worker, and
    what it did. A worker claims a run by locking the row (``SKIP LOCKED``) and moving
    ``started_at`` on, so one worker runs it per interval, behind PgBouncer too."""

    __tablename__ = "maintenance_runs"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    started_by: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


class CircuitBreaker(Base):
    """The fleet-wide pause switch: one row per guarded dependency."""

    __tablename__ = "circuit_breakers"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    state: Mapped[str] = mapped_column(Text, server_default="closed")
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    times_opened: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    open_until: Mapped[datetime | None] = mapped_column(Timestamp)
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    #: When it last opened or closed (a probe's half-open is still open), database clock; set
    #: by a trigger whoever writes the row (0013).
    state_since: Mapped[datetime | None] = mapped_column(Timestamp)


class RateLimitBucket(Base):
    """A token bucket shared by every worker process and host (see
    worker.adapters.postgres.ratelimit)."""

    __tablename__ = "rate_limit_buckets"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    refilled_at: Mapped[datetime] = mapped_column(Timestamp)
    blocked_until: Mapped[datetime | None] = mapped_column(Timestamp)


class EntityTransition(Base):
    """A move the entity state machine allows (``worker.domain.model``); a trigger on ``entities``
    refuses any other state change, whoever writes it."""

    __tablename__ = "entity_transitions"

    from_state: Mapped[str] = mapped_column(Text, primary_key=True)
    to_state: Mapped[str] = mapped_column(Text, primary_key=True)


class DeadLetterGroup(Base):
    """The console's dead-letter groups (cause x series x message), kept by a trigger on
    ``entities`` (0017): a row of +1 or -1 per entity entering or leaving the dead state, which
    the sweeper folds into one row per group (``worker.adapters.postgres.dead_letter_groups``)."""

    __tablename__ = "dead_letter_groups"
    __table_args__ = (
        # Whether there is anything to fold: the sweeper asks once a second.
        Index("ix_dead_letter_groups_unfolded", "id", postgresql_where=text("NOT folded")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    error_code: Mapped[str | None] = mapped_column(Text)
    series_id: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    #: +1 (entered the dead state), -1 (left it), or the group's count once folded.
    dead: Mapped[int] = mapped_column(Integer)
    #: The entity's ``dead_at`` (a delta), or the group's oldest and newest (folded).
    first_dead_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_dead_at: Mapped[datetime | None] = mapped_column(Timestamp)
    folded: Mapped[bool] = mapped_column(server_default=text("false"))


class ReplayJob(Base):
    """A replay an operator confirmed in the console: run by the workers' sweeper, at a pace.

    The entities it covers are frozen in ``replay_job_items`` when it is created (from the dry
    run the operator saw); each item goes through the same replay service as the CLI, which
    re-checks the entity's state under a lock, so an item issued meanwhile is skipped.
    """

    __tablename__ = "replay_jobs"
    __table_args__ = (
        CheckConstraint(_one_of("state", ["running", "paused", "cancelled", "done"]),
                        name="state"),
        Index("ix_replay_jobs_due", "next_at", postgresql_where=text("state = 'running'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    created_by: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    selection: Mapped[dict[str, Any]] = mapped_column(JSONB)
    plan: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    velocity_per_min: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Text, server_default="running")
    total: Mapped[int] = mapped_column(Integer)
    next_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)


class ReplayJobItem(Base):
    """One entity of a replay job and what replaying it did."""

    __tablename__ = "replay_job_items"
    __table_args__ = (
        UniqueConstraint("job_id", "entity_id"),
        CheckConstraint(_one_of("state", ["pending", "done", "cancelled"]), name="state"),
        Index("ix_replay_job_items_pending", "job_id", "id",
              postgresql_where=text("state = 'pending'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("replay_jobs.id", ondelete="CASCADE"))
    entity_id: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(Text, server_default="pending")
    outcome: Mapped[str | None] = mapped_column(Text)
    done_at: Mapped[datetime | None] = mapped_column(Timestamp)


class ConsoleSession(Base):
    """A logged-in console session (``worker.adapters.postgres.console_sessions``). The cookie
    holds a random id; only its SHA-256 is stored, so a read of this table logs no one in.
    Deleting the row ends the session at once (logout, revocation, a changed user entry)."""

    __tablename__ = "console_sessions"
    __table_args__ = (Index("ix_console_sessions_user_name", "user_name"),)

    id_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    user_name: Mapped[str] = mapped_column(Text)
    #: The role at login, for the record; each request reads today's role from the users file.
    role: Mapped[str] = mapped_column(Text)
    #: A digest of the user's entry in the users file at login: a changed role, password or a
    #: removal changes it, and the session is refused from the next request on.
    fingerprint: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    last_seen_at: Mapped[datetime] = mapped_column(Timestamp)
    client: Mapped[str] = mapped_column(Text)
    user_agent: Mapped[str] = mapped_column(Text)
    #: What the pages keep in the session (the CSRF token).
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


class LoginAttempt(Base):
    """Failed-login counters of the console, per user name and per client address, shared by
    every console process (``worker.adapters.postgres.login_limits``). The key is a digest:
    a name typed at the login form may hold any bytes."""

    __tablename__ = "login_attempts"

    key_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    #: ``user`` or ``address``.
    kind: Mapped[str] = mapped_column(Text)
    failures: Mapped[int] = mapped_column(Integer)
    last_at: Mapped[datetime] = mapped_column(Timestamp)
    #: No attempt under this key before then (the backoff).
    next_allowed_at: Mapped[datetime] = mapped_column(Timestamp)
