"""Deploying: ``db roles`` (PostgreSQL roles per job), ``broker users`` (a RabbitMQ user per
component) and ``doctor`` (a deployment's settings against the capacity guide)."""

from __future__ import annotations

import os
import sys

import click

from worker.domain.text import printable
from worker.entrypoints.cli.broker import broker
from worker.entrypoints.cli.output import fail, print_json, say, settings_or_exit
from worker.entrypoints.cli.root import main

# -- db roles ------------------------------------------------------------------------------


@main.group("db")
def db() -> None:
    """The ledger database's roles (see docs/security.md)."""


@db.command("roles")
@click.option("--apply", "apply_", is_flag=True,
              help="Run the statements on COUPONS_DATABASE_URL (as an administrator who may "
                   "create roles) instead of printing them.")
@click.option("--prefix", default=None,
              help="Role names' prefix (default: COUPONS_DB_ROLE_PREFIX, `coupon`).")
def db_roles(apply_: bool, prefix: str | None) -> None:
    """Create the roles <prefix>_owner, _worker, _console and _retention, and grant each its
    tables. Idempotent: run it again at any time.

    Passwords come from COUPONS_DB_<JOB>_PASSWORD or COUPONS_DB_<JOB>_PASSWORD_FILE (JOB is
    OWNER, WORKER, CONSOLE, RETENTION); there is no default: a role created without one cannot
    log in with a password until it is set. Printed, the SQL takes them as psql variables
    (psql -v coupon_worker_password=… -f roles.sql), so no password is ever printed.
    """
    import psycopg

    from worker.adapters.postgres import roles

    settings = settings_or_exit()
    try:
        names = roles.RoleNames(prefix or settings.db_role_prefix)
    except ValueError as exc:
        fail(str(exc), 2)
    from sqlalchemy.engine import make_url

    database = make_url(settings.database_url).database or "coupon_worker"
    if not apply_:
        click.echo("-- The ledger's roles: run as an administrator who may create roles, e.g.")
        click.echo("--   psql -v ON_ERROR_STOP=1 " + " ".join(
            f"-v {names.of(job)}_password=…" for job in roles.JOBS) + f" -d {database} -f FILE")
        click.echo("-- Then `coupon-worker migrate` as the owner: it grants the other roles "
                   "their tables after every upgrade.")
        statements = roles.role_statements(
            database, names, lambda job: f":'{names.of(job)}_password'")
        for statement in statements:
            click.echo(statement + ";")
        return
    try:
        with roles.connect(settings.database_url) as conn:
            passwords = {job: roles.password_from_environment(job, os.environ)
                         for job in roles.JOBS}
            roles.execute(conn, roles.role_statements(
                database, names,
                lambda job: (None if passwords[job] is None
                             else roles.password_literal(conn, passwords[job] or ""))))
            roles.apply_grants(conn, names)
    except (psycopg.Error, OSError) as exc:
        fail(f"could not set up the roles: {exc}")
    for job in roles.JOBS:
        state = "password set" if passwords[job] else "password unchanged (none given)"
        say(f"{names.of(job)}: {state}")


# -- broker users --------------------------------------------------------------------------


@broker.command("users")
@click.option("--vhost", default="/", show_default=True, help="The vhost of the deployment.")
@click.option("--prefix", default="coupons", show_default=True,
              help="Users are <prefix>-worker, -producer, -flower and -console.")
@click.option("--rabbitmqctl", "rabbitmqctl", default="rabbitmqctl", show_default=True,
              help="How to call rabbitmqctl (e.g. `rabbitmqctl -n rabbit@mq`).")
def broker_users(vhost: str, prefix: str, rabbitmqctl: str) -> None:
    """Print the rabbitmqctl commands that create a user per component with only its
    permissions, for the queue names of these settings (COUPONS_*_QUEUE).

    Passwords are read, when the lines run, from RABBITMQ_WORKER_PASSWORD,
    RABBITMQ_PRODUCER_PASSWORD, RABBITMQ_FLOWER_PASSWORD and RABBITMQ_CONSOLE_PASSWORD
    (required: there is no default). Pipe the output to `sh`; running it again updates the
    passwords and permissions.
    """
    from worker.adapters.rabbitmq.permissions import rabbitmqctl_commands

    settings = settings_or_exit()
    click.echo("set -e")
    for line in rabbitmqctl_commands(settings, vhost=vhost, prefix=prefix,
                                     rabbitmqctl=rabbitmqctl):
        click.echo(line)


# -- doctor --------------------------------------------------------------------------------


@main.command()
@click.option("--workers", type=int, default=1, show_default=True,
              help="Worker processes (`coupon-worker worker`) the fleet runs, on every host.")
@click.option("--concurrency", type=int, default=None,
              help="Pool processes (prefork) or threads (threads) per worker (default: "
                   "COUPONS_WORKER_CONCURRENCY or the CPUs here).")
@click.option("--pool", type=click.Choice(["prefork", "threads"]), default="prefork",
              show_default=True, help="The pool the workers run (`coupon-worker worker -P`).")
@click.option("--max-connections", type=int, default=None,
              help="PostgreSQL's max_connections, instead of asking the server.")
@click.option("--broker-nodes", type=int, default=None,
              help="RabbitMQ nodes in the cluster, instead of asking its management API.")
@click.option("--latency-ms", type=float, default=None,
              help="One Capillary call's latency, for the quota check (default 500).")
@click.option("--offline", is_flag=True, help="Ask neither PostgreSQL nor RabbitMQ.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(workers: int, concurrency: int | None, pool: str, max_connections: int | None,
           broker_nodes: int | None, latency_ms: float | None, offline: bool,
           as_json: bool) -> None:
    """Check this deployment's settings against the capacity guide (docs/capacity.md): pool
    sizes against max_connections, quorum queues on one node, a pooler without
    COUPONS_DB_POOLER=transaction, superusers and plain http, the fleet against the quota, the
    pool against Capillary's latency (docs/threads-pool.md).

    Exit 1 when something must change, 0 otherwise (warnings included).
    """
    from worker.entrypoints.cli import doctor as d

    settings = settings_or_exit()
    concurrency = concurrency or settings.worker_concurrency or os.cpu_count() or 1
    database: d.DatabaseFacts | None = None
    database_error = broker_error = None
    if not offline:
        import psycopg

        try:
            database = d.observe_database(settings.database_url)
        except psycopg.Error as exc:
            database_error = f"PostgreSQL did not answer: {str(exc).strip()}"
    if max_connections is not None:
        database = d.DatabaseFacts(
            max_connections=max_connections,
            reserved_connections=database.reserved_connections if database else 3,
            server_port=database.server_port if database else None,
            superuser=database.superuser if database else False)
    if broker_nodes is None and not offline and settings.queue_type == "quorum":
        try:
            broker_nodes = d.observe_broker_nodes(settings)
        except (OSError, ValueError) as exc:
            broker_error = str(exc)
    facts = d.Facts(settings=settings, workers=workers, concurrency=concurrency,
                    pool="threads" if pool == "threads" else "prefork",
                    pooler_setting=d.pooler_setting(settings), database=database,
                    database_error=database_error or ("offline" if offline else None),
                    broker_nodes=broker_nodes,
                    broker_error=broker_error or "offline: pass --broker-nodes",
                    call_latency_s=(latency_ms / 1000.0 if latency_ms
                                    else d.DEFAULT_CALL_LATENCY_S))
    findings = d.examine(facts)
    if as_json:
        print_json({"problems": d.has_problems(findings), "findings": d.as_dicts(findings)})
    else:
        # Plain lines, never wrapped: read from logs and deployment scripts.
        for finding in findings:
            click.echo(printable(f"{finding.severity.upper():8} {finding.check}: "
                                 f"{finding.message}"))
            if finding.change and finding.severity != "ok":
                click.echo(printable(f"{'':8} change: {finding.change}"))
    sys.exit(1 if d.has_problems(findings) else 0)
