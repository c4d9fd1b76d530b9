"""Running the service: ``migrate``, ``worker``, ``health`` and ``flower``.

``output`` (and ``rich`` with it) is imported where a command prints, not here: the ``worker``
command's process is the one its pool processes are forked from, and prints nothing of its own
unless it fails (see ``root.COMMAND_MODULES``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from worker.domain.errors import ConfigurationError, WorkerError
from worker.entrypoints.cli.root import main

if TYPE_CHECKING:
    from worker.config import Settings


def fail(message: str, code: int = 1, *, multiline: bool = False) -> NoReturn:
    from worker.entrypoints.cli.output import fail as fail_

    fail_(message, code, multiline=multiline)


def settings_or_exit() -> Settings:
    from worker.config import load_settings

    try:
        return load_settings()
    except ConfigurationError as exc:
        fail(str(exc), 2, multiline=True)

# -- migrate -------------------------------------------------------------------------------


@main.command()
def migrate() -> None:
    """Create the ledger database if it is missing, then upgrade it to the latest schema."""
    from worker.adapters.postgres.migrate import (
        ensure_database,
        grant_roles,
        schema_status,
        upgrade,
    )
    from worker.entrypoints.cli import output
    from worker.logs import configure_logging

    settings = settings_or_exit()
    configure_logging(settings.log_level, settings.log_format)
    try:
        url = settings.ledger_url()
        created = ensure_database(url)
        upgrade(url)
        status = schema_status(url, pooler=settings.db_pooler)
        granted = grant_roles(url, settings.db_role_prefix)
    except WorkerError as exc:
        fail(str(exc))
    where = settings.safe_summary()["database"]
    if granted:
        output.console.print(f"granted {', '.join(granted)} their tables", highlight=False)
    # What to watch during a roll: which releases' workers may run on the new schema.
    output.console.print(
        f"{'created and ' if created else ''}migrated {where} to revision {status.ledger} "
        f"(workers of revision {status.compatible_from} and later run on it)",
        highlight=False,
    )


# -- worker --------------------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--concurrency", "-c", type=int, default=None,
              help="Pool processes (prefork) or threads (threads): the calls in flight "
                   "(default: COUPONS_WORKER_CONCURRENCY or CPUs).")
# Prefork (a process per task) or threads (tasks of one process, for a slow Capillary): the
# two pools on which every attempt keeps inside its claim (docs/threads-pool.md).
@click.option("--pool", "-P", type=click.Choice(["prefork", "threads"]),
              default="prefork", show_default=True,
              help="prefork: a process per task; threads: one process, a thread per task, for "
                   "hundreds of milliseconds of Capillary latency (docs/threads-pool.md).")
@click.option("--hostname", "-n", default=None,
              help="Node name, e.g. coupons1@%h (default: coupon-worker-<pid>@<host>, unique "
                   "per process so that any number of workers share a host).")
@click.option("--no-sweeper", is_flag=True,
              help="Do not run the periodic sweeper in this worker (another one does).")
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, pool: str, hostname: str | None,
           no_sweeper: bool) -> None:
    """Run a Celery worker: consumes events, retries, and runs the sweeper and metrics.

    Extra options are passed to ``celery worker`` as they are. Exits non-zero when the worker
    stops on its own (its consumer hit an unrecoverable broker error), so that a supervisor
    restarts it.
    """
    import os

    settings = settings_or_exit()
    if no_sweeper:
        os.environ["COUPONS_RUN_SWEEPER"] = "false"
    try:
        settings.require_capillary_credentials()
    except ConfigurationError as exc:
        fail(str(exc), 2)
    from worker.optional_modules import WORKER_UNUSED, without

    # Celery and Kombu import them whenever they are installed (worker.optional_modules).
    with without(WORKER_UNUSED):
        from worker.entrypoints.celery.worker_steps import prepare_metrics_dir

        if pool == "prefork":
            # Every pool process writes its samples there; under threads one process counts
            # all.
            prepare_metrics_dir()
        from worker.entrypoints.celery.app import app
        from worker.entrypoints.celery.liveness import default_node_name, run_worker

    argv = ["worker", f"--pool={pool}", "--without-gossip", "--without-mingle",
            f"--loglevel={settings.log_level}", f"--hostname={hostname or default_node_name()}"]
    if concurrency or settings.worker_concurrency:
        argv.append(f"--concurrency={concurrency or settings.worker_concurrency}")
    argv.extend(ctx.args)
    sys.exit(run_worker(app, argv))


# -- health --------------------------------------------------------------------------------


@main.command()
@click.option("--node", default=None, help="Only this worker (its node name).")
@click.option("--pid", type=int, default=None, help="Only the worker with this process id.")
@click.option("--max-age", "max_age_s", type=float, default=None,
              help="Seconds after which a heartbeat is stale (default: 3 heartbeat intervals).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def health(node: str | None, pid: int | None, max_age_s: float | None, as_json: bool) -> None:
    """Whether this host's workers are consuming: exit 0 if healthy, 1 if not.

    Judged from the heartbeat each worker's consumer writes from its event loop
    (COUPONS_HEARTBEAT_DIR), so a process that runs but no longer consumes is unhealthy.
    Needs neither the database nor the broker.
    """
    from worker.entrypoints.cli.output import print_json
    from worker.health import check_health

    settings = settings_or_exit()
    report = check_health(Path(settings.heartbeat_dir), node=node, pid=pid, max_age_s=max_age_s)
    if as_json:
        print_json(report.as_dict())
    else:
        # Plain lines, never wrapped: health checks are read from logs and probes.
        click.echo(("healthy: " if report.healthy else "unhealthy: ") + report.reason)
        for worker_health in report.workers:
            click.echo(f"  {worker_health.describe()}")
    sys.exit(0 if report.healthy else 1)


#: Flower's secret settings, also read from ``<NAME>_FILE`` (docs/secrets.md).
FLOWER_SECRETS = ("FLOWER_BASIC_AUTH", "FLOWER_OAUTH2_SECRET", "FLOWER_COOKIE_SECRET")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Listen address (0.0.0.0 in a container).")
@click.pass_context
def flower(ctx: click.Context, port: int, address: str) -> None:
    """Run Flower on the project's app (FLOWER_* variables apply, e.g. FLOWER_BASIC_AUTH;
    FLOWER_BASIC_AUTH_FILE, FLOWER_COOKIE_SECRET_FILE and FLOWER_OAUTH2_SECRET_FILE name files).

    Extra options are passed to Flower as they are. Flower's API can send tasks, shut workers
    down and resize pools: on any address but loopback it needs an authentication
    (FLOWER_BASIC_AUTH, FLOWER_AUTH, --basic-auth or --auth).
    """
    settings_or_exit()
    import os

    from worker.config import is_loopback
    from worker.domain.errors import ConfigurationError
    from worker.secret_files import FILE_SUFFIX, read_secret_file

    # Flower reads its own variables: the files the _FILE convention names become them.
    for name in FLOWER_SECRETS:
        path = os.environ.get(name + FILE_SUFFIX)
        if not path:
            continue
        if os.environ.get(name):
            fail(f"{name} and {name}{FILE_SUFFIX} are both set; set one of them", 2)
        try:
            os.environ[name] = read_secret_file(path, variable=name + FILE_SUFFIX)
        except ConfigurationError as exc:
            fail(str(exc), 2)
    authenticated = bool(os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH")
                         or any(a.startswith(("--basic-auth", "--basic_auth", "--auth"))
                                for a in ctx.args))
    if not authenticated and not is_loopback(address):
        fail(f"refusing to serve Flower on {address} without authentication: its API can "
             "send tasks and shut workers down; set FLOWER_BASIC_AUTH=user:password", 2)
    from worker.entrypoints.celery.app import app

    app.start(["flower", f"--port={port}", f"--address={address}", *ctx.args])
