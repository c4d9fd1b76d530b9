"""PostgreSQL roles per job: who may run which statement on which ledger table.

- ``<prefix>_owner`` owns the schema and its tables and runs the migrations (``migrate``);
- ``<prefix>_worker`` runs the event path, the sweeper and the replay jobs;
- ``<prefix>_console`` is the support console and the support commands (``events``, ``dlq``,
  ``rejected``): it reads the ledger and writes only what an operator's action changes;
- ``<prefix>_retention`` is the pruning job's hook: it may connect and read, and gets its
  ``DELETE`` grants from the retention change (``RETENTION_GRANTS`` below).

No role but the owner may change the schema (``CREATE``, ``ALTER``, ``DROP``, ``TRUNCATE``),
and nobody may ``UPDATE`` or ``DELETE`` the audit (``operator_actions``): the worker and the
console only append to it. Every table the migrations create must be listed in ``GRANTS``
(a test compares it with the models), so that a new table is never silently out of reach nor
silently open to everyone.

Two steps, both idempotent. ``role_statements`` (run by an administrator who may create roles)
creates the roles, sets their passwords and hands the schema and any existing table to the
owner. ``grant_statements`` (run by the owner, or the administrator) grants each role its
tables; ``coupon-worker migrate`` runs it after every upgrade when the roles exist, so a table
added by a later migration gets its grants in the same step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import psycopg

Job = Literal["owner", "worker", "console", "retention"]
JOBS: tuple[Job, ...] = ("owner", "worker", "console", "retention")
DEFAULT_PREFIX = "coupon"
# Unquoted identifiers only: role names are written into statements as they are.
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")

SEL, INS, UPD, DEL = "SELECT", "INSERT", "UPDATE", "DELETE"

#: Each table and what each job (but the owner, who owns them) may do to it. Read from the
#: code: ``worker.adapters.postgres.hot_path``/``repository`` (the event path, the sweeper, message
#: failures), ``worker.adapters.postgres.ratelimit`` and ``worker.adapters.postgres.circuit`` (the
#: fleet's limits), ``worker.adapters.postgres.jobs`` and ``worker.usecases.support`` (replay jobs,
#: which the workers step and the console creates, pauses and cancels),
#: ``worker.adapters.postgres.support`` and ``worker.usecases.queries`` (the console's actions and
#: pages).
GRANTS: Mapping[str, Mapping[Job, tuple[str, ...]]] = {
    "events": {"worker": (SEL, INS, UPD), "console": (SEL, UPD), "retention": (SEL,)},
    "entities": {"worker": (SEL, INS, UPD), "console": (SEL, UPD), "retention": (SEL,)},
    "entity_history": {"worker": (SEL, INS), "console": (SEL, INS), "retention": (SEL,)},
    "coupons": {"worker": (SEL, INS), "console": (SEL,), "retention": (SEL,)},
    "api_calls": {"worker": (SEL, INS), "console": (SEL,), "retention": (SEL,)},
    # The console's operators open and close it by hand (audited: usecases.circuit_control).
    "circuit_breakers": {"worker": (SEL, INS, UPD), "console": (SEL, INS, UPD)},
    "rate_limit_buckets": {"worker": (SEL, INS, UPD), "console": (SEL,)},
    "rejected_events": {"worker": (SEL, INS, UPD), "console": (SEL, UPD), "retention": (SEL,)},
    # A row per failing message, removed once it succeeds or is kept as a dead letter.
    "message_failures": {"worker": (SEL, INS, UPD, DEL), "console": (SEL,)},
    "replay_jobs": {"worker": (SEL, UPD), "console": (SEL, INS, UPD)},
    "replay_job_items": {"worker": (SEL, UPD), "console": (SEL, INS, UPD)},
    # The retention schedule: claimed by the job that prunes (the worker's sweeper runs it on
    # the retention role's URL when COUPONS_RETENTION_DATABASE_URL is set, else its own).
    "maintenance_runs": {"worker": (SEL, INS, UPD), "console": (SEL,),
                         "retention": (SEL, INS, UPD)},
    # Read by the trigger that checks every state change of an entity.
    "entity_transitions": {"worker": (SEL,), "console": (SEL,)},
    # The console's dead-letter groups (0017): a trigger adds a row whenever an entity enters
    # or leaves the dead state, as whoever writes the entity; the sweeper folds them.
    "dead_letter_groups": {"worker": (SEL, INS, DEL), "console": (SEL, INS),
                           "retention": (INS,)},
    # The audit: appended to, never changed (its trigger refuses it even to the owner).
    "operator_actions": {"worker": (INS,), "console": (SEL, INS), "retention": (SEL,)},
    # Which schema the ledger has: read by the workers' start-up and metrics, the console.
    "alembic_version": {"worker": (SEL,), "console": (SEL,), "retention": (SEL,)},
    # The console's sessions and failed-login counters: its own, created, touched and deleted
    # (logout, revocation, expiry) by the console alone.
    "console_sessions": {"console": (SEL, INS, UPD, DEL)},
    "login_attempts": {"console": (SEL, INS, UPD, DEL)},
}

#: What the retention job (``worker.adapters.postgres.retention``) adds to the grants above: the
#: tables it prunes (``UPDATE`` where it locks rows ``FOR UPDATE`` or empties the event row), the
#: audit only as far as its trigger allows. The worker and the console never get ``DELETE``
#: on what is evidence.
RETENTION_GRANTS: Mapping[str, tuple[str, ...]] = {
    "events": (SEL, UPD, DEL),
    "entities": (SEL, UPD, DEL),
    "coupons": (SEL, DEL),
    "entity_history": (SEL, DEL),
    "api_calls": (SEL, DEL),
    "operator_actions": (SEL, DEL),
    "replay_jobs": (SEL, DEL),
    "replay_job_items": (SEL, DEL),
}


@dataclass(frozen=True)
class RoleNames:
    """The roles' names: ``<prefix>_owner`` and so on."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _IDENTIFIER.match(f"{self.prefix}_retention"):
            raise ValueError(f"role prefix {self.prefix!r}: lower-case letters, digits and _")

    def of(self, job: Job) -> str:
        return f"{self.prefix}_{job}"

    def all(self) -> list[str]:
        return [self.of(job) for job in JOBS]


def table_grants(job: Job) -> dict[str, tuple[str, ...]]:
    """What ``job`` may do, per table (the owner owns them all: not listed)."""
    found = {table: grants[job] for table, grants in GRANTS.items() if job in grants}
    if job == "retention":
        for table, extra in RETENTION_GRANTS.items():
            found[table] = tuple(dict.fromkeys((*found.get(table, ()), *extra)))
    return found


def _serial_sequences() -> dict[str, str]:
    """The sequence behind each table's generated id (an INSERT needs ``USAGE`` on it)."""
    from worker.adapters.postgres import models as m

    return {table.name: f"{table.name}_{table.autoincrement_column.name}_seq"
            for table in m.Base.metadata.sorted_tables
            if table.autoincrement_column is not None}


PasswordSql = Callable[[Job], str | None]


def role_statements(database: str, names: RoleNames, password_sql: PasswordSql,
                    schema: str = "public") -> list[str]:
    """Create the roles (idempotent) and give the owner the schema and what is already in it.

    ``password_sql(job)`` is the SQL literal of the role's password, or None to leave it as it
    is (a role created without one cannot log in with a password: there is no default).
    """
    owner = names.of("owner")
    if not _IDENTIFIER.match(schema):
        raise ValueError(f"schema {schema!r}: lower-case letters, digits and _")
    statements: list[str] = []
    for job in JOBS:
        role = names.of(job)
        statements.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role}; END IF; END $$")
        # Whatever the role was before: no superuser, no role or database creation, no RLS
        # bypass, no inherited grants from other roles.
        statements.append(f"ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                          "NOINHERIT NOREPLICATION NOBYPASSRLS")
        password = password_sql(job)
        if password is not None:
            statements.append(f"ALTER ROLE {role} WITH PASSWORD {password}")
        statements.append(f'GRANT CONNECT ON DATABASE "{database}" TO {role}')
        statements.append(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    # Nobody creates objects in the schema but the owner (the default before PostgreSQL 15).
    statements.append(f"REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC")
    statements.append(f"GRANT CREATE ON SCHEMA {schema} TO {owner}")
    # A ledger migrated before the roles existed: its tables and trigger functions pass to the
    # owner, who must own them for later migrations to alter them.
    # Names checked against _IDENTIFIER: no outside text in the statement.
    statements.append(
        "DO $$ DECLARE r record; BEGIN "  # noqa: S608
        "FOR r IN SELECT c.oid::regclass AS name FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE n.nspname = '{schema}' AND c.relkind IN ('r', 'p', 'v', 'm') "
        f"AND pg_get_userbyid(c.relowner) <> '{owner}' LOOP "
        f"EXECUTE format('ALTER TABLE %s OWNER TO {owner}', r.name); END LOOP; "
        "FOR r IN SELECT p.oid::regprocedure AS name FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        f"WHERE n.nspname = '{schema}' AND pg_get_userbyid(p.proowner) <> '{owner}' LOOP "
        f"EXECUTE format('ALTER FUNCTION %s OWNER TO {owner}', r.name); END LOOP; END $$")
    return statements


def grant_statements(names: RoleNames, tables: Iterable[str], schema: str = "public",
                     ) -> list[str]:
    """Grant each role exactly its rights on the ``tables`` that exist (idempotent: every
    right is revoked first, so a right taken out of ``GRANTS`` is taken away too)."""
    present = set(tables)
    sequences = _serial_sequences()
    others = ", ".join(names.of(job) for job in JOBS if job != "owner")
    statements: list[str] = []
    for table in sorted(present):
        statements.append(f"REVOKE ALL ON TABLE {schema}.{table} FROM PUBLIC, {others}")
        if table in sequences:
            statements.append(
                f"REVOKE ALL ON SEQUENCE {schema}.{sequences[table]} FROM PUBLIC, {others}")
    for job in JOBS:
        if job == "owner":
            continue
        role = names.of(job)
        for table, rights in sorted(table_grants(job).items()):
            if table not in present or not rights:
                continue
            statements.append(f"GRANT {', '.join(rights)} ON TABLE {schema}.{table} TO {role}")
            if INS in rights and table in sequences:
                statements.append(
                    f"GRANT USAGE ON SEQUENCE {schema}.{sequences[table]} TO {role}")
    return statements


def _query(conn: psycopg.Connection[Any], sql: str, *params: object) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def existing_tables(conn: psycopg.Connection[Any], schema: str = "public") -> list[str]:
    return [row[0] for row in _query(
        conn, "SELECT tablename FROM pg_tables WHERE schemaname = %s", schema)]


def missing_roles(conn: psycopg.Connection[Any], names: RoleNames) -> list[str]:
    """Which of the roles do not exist on this server."""
    found = {row[0] for row in _query(
        conn, "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", names.all())}
    return [name for name in names.all() if name not in found]


def execute(conn: psycopg.Connection[Any], statements: Iterable[str]) -> None:
    """Run ``statements`` as they are (no parameters: ``%`` is not a placeholder here)."""
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement.encode("utf-8"))


def password_literal(conn: psycopg.Connection[Any], password: str) -> str:
    from psycopg import sql

    return sql.Literal(password).as_string(conn)


def connect(database_url: str, *, connect_timeout_s: int = 5) -> psycopg.Connection[Any]:
    """A plain psycopg connection (autocommit off) for a SQLAlchemy-style URL."""
    from sqlalchemy.engine import make_url

    uri = make_url(database_url).set(drivername="postgresql")
    return psycopg.connect(uri.render_as_string(hide_password=False),
                           connect_timeout=connect_timeout_s)


def apply_grants(conn: psycopg.Connection[Any], names: RoleNames) -> list[str]:
    """Grant the roles their tables on ``conn``'s database; the statements run."""
    statements = grant_statements(names, existing_tables(conn))
    execute(conn, statements)
    return statements


def password_from_environment(job: Job, environ: Mapping[str, str]) -> str | None:
    """``COUPONS_DB_<JOB>_PASSWORD``, or the content of the file ``..._PASSWORD_FILE`` names
    (trailing newline dropped); None when neither is set."""
    name = f"COUPONS_DB_{job.upper()}_PASSWORD"
    if environ.get(name):
        return environ[name]
    path = environ.get(f"{name}_FILE")
    if path:
        from pathlib import Path

        return Path(path).read_text(encoding="utf-8").rstrip("\r\n") or None
    return None
