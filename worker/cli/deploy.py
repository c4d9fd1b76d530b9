"""Deploying: ``db roles`` (PostgreSQL roles per job), ``broker users`` (a RabbitMQ user per
component) and ``doctor`` (a deployment's settings against the capacity guide)."""

from __future__ import annotations

import os

import click

from worker.cli.output import fail, say, settings_or_exit
from worker.cli.root import main

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

    from worker.ledger import roles

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


@main.group("broker")
def broker() -> None:
    """The broker's users (see docs/security.md)."""


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
    from worker.broker.permissions import rabbitmqctl_commands

    settings = settings_or_exit()
    click.echo("set -e")
    for line in rabbitmqctl_commands(settings, vhost=vhost, prefix=prefix,
                                     rabbitmqctl=rabbitmqctl):
        click.echo(line)
