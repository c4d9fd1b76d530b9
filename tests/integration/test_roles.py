"""The ledger's PostgreSQL roles, on a database of their own: each role does its job's real
operations and is refused what its job must not do.

The roles are created by ``coupon-worker db roles --apply`` (as the administrator), the schema
by ``coupon-worker migrate`` run as the owner, exactly as a deployment does it. Role names carry
a prefix of this test's own, so parallel runs never share them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.harness.databases import drop_database
from tests.conftest import PG_ADMIN_URL
from worker.adapters.postgres import models as m
from worker.adapters.postgres import roles
from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.plans import SqlActionPlans
from worker.adapters.postgres.records import Transition
from worker.adapters.postgres.retention import RetentionStore
from worker.adapters.postgres.support import Selection
from worker.adapters.postgres.unit_of_work import make_engine, sql_unit_of_work_factory
from worker.bootstrap import build_deps, build_support_deps
from worker.config import Settings
from worker.domain.errors import LedgerError
from worker.domain.events import parse_event_data
from worker.domain.model import Coupon, EntityState
from worker.usecases import issue
from worker.usecases.deps import Deps, utcnow
from worker.usecases.rejection import record_rejection
from worker.usecases.replay_jobs import control_replay_job, start_replay_job, step_replay_jobs
from worker.usecases.retention import RetentionPolicy, prune
from worker.usecases.support import SupportDeps, discard, replay_event
from worker.usecases.sweep import publish_dead_letters, sweep, verify_issued
from worker.usecases.waiting import give_up, retry_now

CLI = Path(sys.executable).parent / "coupon-worker"
JOBS_WITH_LOGIN = ("owner", "worker", "console", "retention")
# How the guide writes "no right" (an en dash).
NONE = "\u2013"


@dataclass(frozen=True)
class Ledger:
    """A database set up with the roles: each role's URL."""

    prefix: str
    database: str
    admin_url: str

    def url(self, job: str) -> str:
        return make_url(self.admin_url).set(
            username=f"{self.prefix}_{job}", password=f"pw-{job}").render_as_string(
                hide_password=False)


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COUPONS_ENV_FILE": "", **env}
    return subprocess.run([str(CLI), *args], env=full_env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def ledger() -> Iterator[Ledger]:
    tag = uuid.uuid4().hex[:8]
    prefix, database = f"cwt{tag}", f"cw_roles_{tag}"
    admin_url = make_url(PG_ADMIN_URL).set(database=database).render_as_string(
        hide_password=False)
    with psycopg.connect(make_url(PG_ADMIN_URL).set(drivername="postgresql")
                         .render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"'.encode())
    found = Ledger(prefix, database, admin_url)
    try:
        # Given the roles, made by the administrator with passwords from the environment
        made = _run("db", "roles", "--apply", "--prefix", prefix, env={
            "COUPONS_DATABASE_URL": admin_url,
            **{f"COUPONS_DB_{job.upper()}_PASSWORD": f"pw-{job}" for job in JOBS_WITH_LOGIN}})
        assert made.returncode == 0, made.stderr
        # and the schema, migrated by the owner, who then grants the others their tables
        migrated = _run("migrate", env={"COUPONS_DATABASE_URL": found.url("owner"),
                                        "COUPONS_DB_ROLE_PREFIX": prefix})
        assert migrated.returncode == 0, migrated.stderr
        assert "granted" in migrated.stdout
        yield found
    finally:
        drop_database(PG_ADMIN_URL, database)
        with psycopg.connect(make_url(PG_ADMIN_URL).set(drivername="postgresql")
                             .render_as_string(hide_password=False), autocommit=True) as conn:
            for job in JOBS_WITH_LOGIN:
                conn.execute(f"DROP ROLE IF EXISTS {prefix}_{job}".encode())


def _connect(ledger: Ledger, job: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(make_url(ledger.url(job)).set(drivername="postgresql")
                           .render_as_string(hide_password=False), autocommit=True)


def refused(ledger: Ledger, job: str, statement: str) -> None:
    """``statement`` run as ``job`` fails for want of a privilege (not for another reason)."""
    with _connect(ledger, job) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement.encode())


@pytest.fixture
def engines(ledger: Ledger) -> Iterator[Callable[[str], Engine]]:
    made: list[Engine] = []

    def engine(job: str) -> Engine:
        made.append(make_engine(ledger.url(job), pool_size=1))
        return made[-1]

    yield engine
    for each in made:
        each.dispose()


def test_the_owner_owns_everything_and_is_no_superuser(ledger: Ledger) -> None:
    with _connect(ledger, "owner") as conn:
        owners = {row[0] for row in conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")}
        rights = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                              "WHERE rolname = current_user").fetchone()
    assert owners == {f"{ledger.prefix}_owner"}
    assert rights == (False, False, False)


def test_every_table_has_its_grants_decided() -> None:
    # A table a migration adds must be placed in GRANTS: out of reach or open, on purpose.
    assert {t.name for t in m.Base.metadata.sorted_tables} | {"alembic_version"} == set(
        roles.GRANTS)
    for table, grants in roles.GRANTS.items():
        assert "owner" not in grants, table
        for job, rights in grants.items():
            assert set(rights) <= {"SELECT", "INSERT", "UPDATE", "DELETE"}, (table, job)
    # The audit is appended to, never changed or deleted, by anyone
    assert all(set(rights) <= {"SELECT", "INSERT"}
               for rights in roles.GRANTS["operator_actions"].values())


def test_the_worker_runs_the_event_path_sweeper_and_replay_jobs(
        ledger: Ledger, engines: Callable[[str], Engine],
        settings_factory: Callable[..., Settings], sandbox: object) -> None:
    # Given a worker's real dependencies, connected as the worker role, the rate limit on
    settings = settings_factory(database_url=ledger.url("worker"), rate_limit_per_minute=600)
    worker_engine = engines("worker")
    publisher = FakePublisher()
    deps = build_deps(settings, publisher, engine=worker_engine)
    # When it issues an event through the sandbox
    event = parse_event_data({"eventId": f"roles-{uuid.uuid4().hex[:6]}",
                              "customer": {"id": "566881933"}, "seriesIds": [544770]})
    report = issue.issue_event(event, source="bus", deps=deps)
    # Then the coupon is recorded, and so are rejections, message failures and the sweeper
    assert report.issued == 1
    record_rejection(b"not json", "invalid JSON", source="bus", deps=deps)
    with deps.uow() as uow:
        assert uow.ledger.count_message_failure("k", kind="internal_error", error="x",
                                                now=utcnow()) == 1
        uow.ledger.forget_message_failure("k")
        uow.commit()
    sweep(deps)
    verify_issued(deps)
    publish_dead_letters(deps)
    assert len(publisher.dead_letters) == 1, "the rejection is announced, and marked so"
    assert publish_dead_letters(deps) == 0
    # And given a dead entity, the console starts a replay job that the worker steps
    dead_id = _dead_entity(deps)
    console = _support(engines("console"))
    job_id = start_replay_job((dead_id,), selection=Selection(entity_ids=(dead_id,)),
                              reason="test", operator="ops", velocity_per_min=600,
                              deps=console, store=ReplayJobStore(engines("console")),
                              plans=SqlActionPlans(engines("console")))
    worker_support = build_support_deps(settings, worker_engine)
    assert step_replay_jobs(worker_support, ReplayJobStore(worker_engine)) == 1
    assert job_id


def _dead_entity(deps: Deps, state: EntityState = EntityState.DEAD) -> int:
    event = parse_event_data({"eventId": f"dead-{uuid.uuid4().hex[:6]}",
                              "customer": {"id": "7"}, "seriesIds": [1]})
    now = utcnow()
    with deps.uow() as uow:
        _new, claim = uow.ledger.take_in(event, source="bus", token="t", worker="w", now=now,
                                         lease_s=60, settle_window_s=120)
        uow.commit()
    entity_id = claim.entities[0].entity_id
    with deps.uow() as uow:
        uow.ledger.record(claim, calls=[], worker="w", now=now, transitions=[Transition(
            entity_id, state, str(state), 1, error_code="x", error_message="gone",
            dead_reason="test" if state is EntityState.DEAD else None,
            next_attempt_at=None if state is EntityState.DEAD else now)])
        uow.commit()
    return entity_id


def _support(engine: Engine) -> SupportDeps:
    return SupportDeps(uow=sql_unit_of_work_factory(engine), publisher=FakePublisher(),
                       clock=utcnow)


def test_the_console_reads_everything_and_does_an_operators_actions(
        ledger: Ledger, engines: Callable[[str], Engine],
        settings_factory: Callable[..., Settings]) -> None:
    from starlette.testclient import TestClient

    from worker.entrypoints.console.app import create_app
    from worker.entrypoints.console.auth import hash_password
    from worker.entrypoints.console.config import load_console_settings

    # Given dead entities the worker recorded
    worker_deps = build_deps(settings_factory(database_url=ledger.url("worker")),
                             FakePublisher(), engine=engines("worker"))
    first, second = _dead_entity(worker_deps), _dead_entity(worker_deps)
    console_engine = engines("console")
    support = _support(console_engine)
    # When the console, as its own role, replays one, discards another, and runs a job
    with support.uow() as uow:
        event_id = uow.ledger.lock_target(first).event_id  # type: ignore[union-attr]
    assert replay_event(event_id, reason="r", operator="ops", deps=support)
    assert discard(Selection(entity_ids=(second,)), reason="r", operator="ops", deps=support)
    store = ReplayJobStore(console_engine)
    job_id = start_replay_job((second,), selection=Selection(entity_ids=(second,),
                                                             states=("discarded",)),
                              reason="r", operator="ops", velocity_per_min=60, deps=support,
                              store=store, plans=SqlActionPlans(console_engine))
    assert control_replay_job(job_id, "pause", operator="ops", reason="r", deps=support,
                              store=store)
    # and makes one waiting entity due now and gives up on another
    waiting = [_dead_entity(worker_deps, EntityState.RETRY_WAIT) for _ in range(2)]
    assert [r.outcome for r in retry_now(waiting[:1], operator="ops", deps=support)] == [
        "due now"]
    assert [r.outcome for r in give_up(waiting[1:], reason="r", operator="ops",
                                       deps=support)] == ["dead (given up)"]
    # Then every page of the console renders from the ledger
    users = {"users": [{"name": "ada", "role": "admin",
                        "password_hash": hash_password("admin-pass-1")}]}
    import json

    app = create_app(settings_factory(database_url=ledger.url("console")),
                     load_console_settings(secret="roles-test-secret-0123456789abcdefghij",
                                           users=json.dumps(users)),
                     engine=console_engine, support=support, submitter=FakePublisher())
    client = TestClient(app, follow_redirects=False)
    import re

    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert token
    assert client.post("/login", data={"username": "ada", "password": "admin-pass-1",
                                       "csrf_token": token.group(1)}).status_code == 303
    for page in ("/", "/dlq", "/audit", "/rejected", "/jobs", f"/jobs/{job_id}",
                 f"/entities/{first}", "/customer?q=id:7", "/waiting",
                 f"/dlq/discard/plan?entity_id={first}", f"/replay/plan?entity_id={first}"):
        assert client.get(page).status_code == 200, page


@pytest.mark.parametrize("job, statement", [
    # the audit: appended to, never changed
    ("worker", "UPDATE operator_actions SET reason = 'x'"),
    ("worker", "DELETE FROM operator_actions"),
    ("worker", "SELECT * FROM operator_actions"),
    ("console", "UPDATE operator_actions SET reason = 'x'"),
    ("console", "DELETE FROM operator_actions"),
    # the schema is the owner's
    ("worker", "DROP TABLE coupons"),
    ("worker", "ALTER TABLE entities ADD COLUMN x int"),
    ("worker", "TRUNCATE events"),
    ("worker", "CREATE TABLE sneaky (id int)"),
    ("worker", "UPDATE entity_transitions SET to_state = 'issued'"),
    ("worker", "UPDATE alembic_version SET version_num = '0001'"),
    ("console", "DROP TABLE coupons"),
    ("console", "CREATE TABLE sneaky (id int)"),
    # the worker's rows: history and coupons are written once
    ("worker", "DELETE FROM coupons"),
    ("worker", "UPDATE coupons SET code = 'x'"),
    ("worker", "DELETE FROM entity_history"),
    ("worker", "DELETE FROM events"),
    # the console cannot write the hot path's tables
    ("console", "INSERT INTO coupons (entity_id, event_id, series_id, customer_key, code, raw, "
                "recorded_via) VALUES (1, 'e', 1, 'c', 'x', '{}', 'x')"),
    ("console", "UPDATE coupons SET code = 'x'"),
    ("console", "INSERT INTO events (event_id) VALUES ('x')"),
    ("console", "DELETE FROM entities"),
    ("console", "INSERT INTO api_calls (entity_ids) VALUES ('{}')"),
    ("console", "DELETE FROM circuit_breakers"),
    ("console", "UPDATE rate_limit_buckets SET tokens = 100"),
    ("console", "DELETE FROM message_failures"),
    # the retention job deletes what it prunes, and nothing else
    ("retention", "INSERT INTO events (event_id) VALUES ('x')"),
    ("retention", "DELETE FROM rejected_events"),
    ("retention", "DELETE FROM message_failures"),
    ("retention", "UPDATE circuit_breakers SET state = 'open'"),
    ("retention", "UPDATE operator_actions SET reason = 'x'"),
    ("retention", "DROP TABLE events"),
    # and nobody but the retention job deletes an old event
    ("console", "DELETE FROM events"),
])
def test_each_role_is_refused_what_its_job_must_not_do(
        ledger: Ledger, job: str, statement: str) -> None:
    refused(ledger, job, statement)


def test_the_retention_role_prunes_and_the_worker_role_cannot(
        ledger: Ledger, engines: Callable[[str], Engine]) -> None:
    # Given a settled event two days old, recorded by the worker role
    worker_deps = _support(engines("worker"))
    event_id = f"old-{uuid.uuid4().hex[:6]}"
    event = parse_event_data({"eventId": event_id, "customer": {"id": "7"}, "seriesIds": [1]})
    now = utcnow()
    with worker_deps.uow() as uow:
        _new, claim = uow.ledger.take_in(event, source="bus", token="t", worker="w", now=now,
                                         lease_s=60, settle_window_s=120)
        uow.commit()
    with worker_deps.uow() as uow:
        uow.ledger.record(claim, calls=[], worker="w", now=now, transitions=[Transition(
            claim.entities[0].entity_id, EntityState.ISSUED, "issued", 1,
            coupon=Coupon(code="OLD-1", series_id=1))])
        uow.commit()
    with psycopg.connect(make_url(ledger.admin_url).set(drivername="postgresql")
                         .render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute("UPDATE events SET received_at = now() - interval '2 days', "
                      "updated_at = now() - interval '2 days' WHERE event_id = %s", (event_id,))
    policy = RetentionPolicy(older_than_s=86_400, event_id_window_s=86_400 * 30,
                             audit_days=365, batch_size=10)
    # When the worker role tries to prune, it is refused; the retention role prunes it
    with pytest.raises(LedgerError):
        prune(RetentionStore(engines("worker")), policy, dry_run=False)
    report = prune(RetentionStore(engines("retention")), policy, dry_run=False)
    assert report.events >= 1 and report.coupons >= 1
    with _connect(ledger, "retention") as conn:
        row = conn.execute("SELECT pruned_at IS NOT NULL FROM events WHERE event_id = %s",
                           (event_id,)).fetchone()
    assert row == (True,)
    # And the command connects as the retention role when COUPONS_RETENTION_DATABASE_URL says
    # so, while a worker's own settings alone are refused
    as_worker = {"COUPONS_DATABASE_URL": ledger.url("worker")}
    refused_run = _run("prune", "--older-than", "1d", env=as_worker)
    assert refused_run.returncode != 0 and "permission denied" in refused_run.stderr + \
        refused_run.stdout
    done = _run("prune", "--older-than", "1d", env={
        **as_worker, "COUPONS_RETENTION_DATABASE_URL": ledger.url("retention")})
    assert done.returncode == 0, done.stderr + done.stdout


def test_roles_are_idempotent_and_never_get_a_default_password(ledger: Ledger) -> None:
    # Run again without passwords: nothing fails, nothing is reset to a default
    again = _run("db", "roles", "--apply", "--prefix", ledger.prefix,
                 env={"COUPONS_DATABASE_URL": ledger.admin_url})
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("password unchanged") == 4
    with _connect(ledger, "owner") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # The printed SQL takes every password as a psql variable, never a value
    printed = _run("db", "roles", "--prefix", ledger.prefix, env={})
    assert printed.returncode == 0, printed.stderr
    for job in JOBS_WITH_LOGIN:
        assert f"ALTER ROLE {ledger.prefix}_{job} WITH PASSWORD " \
               f":'{ledger.prefix}_{job}_password';" in printed.stdout


def test_a_password_may_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "worker-password"
    secret.write_text("from-a-file\n")
    assert roles.password_from_environment(
        "worker", {"COUPONS_DB_WORKER_PASSWORD_FILE": str(secret)}) == "from-a-file"
    assert roles.password_from_environment("worker", {}) is None


def test_the_security_guide_lists_the_grants_as_they_are() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    listed = doc.split("<!-- grants:start -->\n", 1)[1].split("<!-- grants:end -->", 1)[0]
    jobs = ("worker", "console", "retention")
    rows = ["| table | " + " | ".join(f"`coupon_{job}`" for job in jobs) + " |",
            "|---|" + "---|" * len(jobs)]
    for table in sorted(roles.GRANTS):
        rights = [", ".join(roles.table_grants(job).get(table, ())) or NONE for job in jobs]
        rows.append(f"| `{table}` | " + " | ".join(rights) + " |")
    assert listed.strip() == "\n".join(rows)


def test_the_printed_sql_runs_in_psql_with_the_passwords_as_variables() -> None:
    # Given a database with a table made before the roles existed, by the administrator
    tag = uuid.uuid4().hex[:8]
    prefix, database = f"cwp{tag}", f"cw_roles_sql_{tag}"
    admin = make_url(PG_ADMIN_URL)
    with psycopg.connect(admin.set(drivername="postgresql").render_as_string(
            hide_password=False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"'.encode())
    target = admin.set(drivername="postgresql", database=database)
    try:
        with psycopg.connect(target.render_as_string(hide_password=False),
                             autocommit=True) as conn:
            conn.execute(b"CREATE TABLE events (event_id text PRIMARY KEY)")
        printed = _run("db", "roles", "--prefix", prefix,
                       env={"COUPONS_DATABASE_URL": target.set(
                           drivername="postgresql+psycopg").render_as_string(
                               hide_password=False)})
        assert printed.returncode == 0, printed.stderr
        # When an administrator runs it with psql, twice (it is idempotent)
        variables = [arg for job in JOBS_WITH_LOGIN
                     for arg in ("-v", f"{prefix}_{job}_password=pw-{job}")]
        for _ in range(2):
            ran = subprocess.run(
                ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *variables,
                 "-h", target.host or "127.0.0.1", "-p", str(target.port or 5432),
                 "-U", target.username or "postgres", "-d", database],
                input=printed.stdout, capture_output=True, text=True, timeout=60, check=False)
            assert ran.returncode == 0, ran.stderr
        # Then the roles exist, each with a password, and the owner owns the old table
        with psycopg.connect(target.render_as_string(hide_password=False)) as conn:
            rows = conn.execute(
                "SELECT rolname, rolpassword IS NOT NULL, rolsuper FROM pg_authid "
                "WHERE rolname LIKE %s ORDER BY rolname", (f"{prefix}_%",)).fetchall()
            owner = conn.execute("SELECT tableowner FROM pg_tables "
                                 "WHERE tablename = 'events'").fetchone()
        assert rows == sorted((f"{prefix}_{job}", True, False) for job in JOBS_WITH_LOGIN)
        assert owner == (f"{prefix}_owner",)
    finally:
        drop_database(PG_ADMIN_URL, database)
        with psycopg.connect(admin.set(drivername="postgresql").render_as_string(
                hide_password=False), autocommit=True) as conn:
            for job in JOBS_WITH_LOGIN:
                conn.execute(f"DROP ROLE IF EXISTS {prefix}_{job}".encode())
