"""The ``coupon-worker`` command line.

    coupon-worker migrate                 create the database if needed, upgrade to head
    coupon-worker worker                  run a Celery worker (tasks, bridge, sweeper, metrics)
    coupon-worker publish FILE|-          publish one event or a JSON-lines file of events
    coupon-worker events show EVENT_ID    an event's entities, attempts, errors and coupons
    coupon-worker events replay EVENT_ID  re-run what an event has not issued yet
    coupon-worker dlq list|summary|show|replay|discard   dead letters, for support engineers
    coupon-worker health                  whether this host's workers are consuming
    coupon-worker rejected list|show|resubmit   rejected messages: inspect, fix and resubmit
    coupon-worker flower                  Flower on the project's app
    coupon-worker sandbox                 run the sandbox Capillary server      (dev tools)
    coupon-worker demo | bench | chaos    the demo, the benchmark, the chaos run (dev tools)

The dev-tool commands live in the ``coupon_devtools`` package (the ``devtools`` extra); the
runtime never imports it, and this command line finds those commands only when one is asked for.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.text import Text

from worker.config import Settings, load_settings
from worker.errors import ConfigurationError, EventRejected, NotFound, WorkerError
from worker.sanitize import printable

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1, *, multiline: bool = False) -> NoReturn:
    # Messages quote ids and reasons from the ledger: shown as text, never as markup, and on
    # one line unless they are ours to break (the configuration's list of problems).
    text = printable(message, keep="\n" if multiline else "")
    err_console.print(Text.assemble(("error:", "bold red"), " ", text), highlight=False)
    sys.exit(code)


def say(message: str, *, err: bool = False) -> None:
    """One line that may quote outside data: plain text, control characters escaped."""
    (err_console if err else console).print(Text(printable(message)), highlight=False)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigurationError as exc:
        fail(str(exc), 2, multiline=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# Each dev-tool command: the factory that builds it, as "module:function".
DEVTOOL_COMMANDS: dict[str, str] = {
    "sandbox": "coupon_devtools.sandbox.command:sandbox_command",
    "demo": "coupon_devtools.demo.command:demo_command",
    "bench": "coupon_devtools.bench.command:bench_command",
    "chaos": "coupon_devtools.chaos.command:chaos_command",
}
DEVTOOLS_MISSING = "needs the dev tools: install coupon-worker[devtools]"


class _DevToolsGroup(click.Group):
    """A group that imports a dev-tool command only when it is asked for, so that the
    worker's start-up never loads (nor needs) the ``coupon_devtools`` package."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *DEVTOOL_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in DEVTOOL_COMMANDS:
            return command
        import importlib

        module_name, factory = DEVTOOL_COMMANDS[cmd_name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith(("coupon_devtools", "aiohttp", "pgserver")):
                raise
            return _missing_devtools(cmd_name)
        built: click.Command = getattr(module, factory)()
        return built


def _missing_devtools(name: str) -> click.Command:
    def explain() -> NoReturn:
        raise click.ClickException(f"coupon-worker {name} {DEVTOOLS_MISSING}")

    return click.Command(name, callback=explain, help=f"({DEVTOOLS_MISSING})",
                         context_settings={"ignore_unknown_options": True,
                                           "allow_extra_args": True})


@click.group(cls=_DevToolsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="coupon-worker")
def main() -> None:
    """Issue loyalty coupons through Capillary's bulk-issue API, exactly once."""
    import os

    from worker.logs import configure_logging

    # Structured lines on stderr (what an operator did is logged too); tables go to stdout.
    configure_logging(os.environ.get("COUPONS_LOG_LEVEL", "INFO").upper(),
                      "json" if os.environ.get("COUPONS_LOG_FORMAT") == "json" else "kv")


# -- migrate -------------------------------------------------------------------------------


@main.command()
def migrate() -> None:
    """Create the ledger database if it is missing, then upgrade it to the latest schema."""
    from worker.ledger.migrate import ensure_database, schema_status, upgrade
    from worker.logs import configure_logging

    settings = settings_or_exit()
    configure_logging(settings.log_level, settings.log_format)
    try:
        created = ensure_database(settings.database_url)
        upgrade(settings.database_url)
        status = schema_status(settings.database_url)
    except WorkerError as exc:
        fail(str(exc))
    where = settings.safe_summary()["database"]
    # What to watch during a roll: which releases' workers may run on the new schema.
    console.print(
        f"{'created and ' if created else ''}migrated {where} to revision {status.ledger} "
        f"(workers of revision {status.compatible_from} and later run on it)",
        highlight=False,
    )


# -- worker --------------------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--concurrency", "-c", type=int, default=None,
              help="Worker processes (default: COUPONS_WORKER_CONCURRENCY or CPUs).")
# Prefork only: it is the one Celery pool that enforces the hard time limit, and that limit
# is what keeps an attempt inside its lease (see the README's exactly-once section).
@click.option("--pool", "-P", type=click.Choice(["prefork"]),
              default="prefork", show_default=True)
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
    from worker.broker.worker_steps import prepare_metrics_dir

    prepare_metrics_dir()
    from worker.broker.liveness import default_node_name, run_worker
    from worker.celery_app import app

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


# -- publish -------------------------------------------------------------------------------


def _read_lines(source: str) -> Iterator[tuple[int, str]]:
    stream = sys.stdin if source == "-" else Path(source).open(encoding="utf-8")  # noqa: SIM115
    try:
        text = stream.read()
    finally:
        if stream is not sys.stdin:
            stream.close()
    stripped = text.strip()
    if stripped.startswith("{") and "\n" in stripped:
        # One pretty-printed JSON object rather than JSON lines?
        try:
            json.loads(stripped)
        except ValueError:
            pass
        else:
            yield 1, stripped
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


@main.command()
@click.argument("source", metavar="FILE|-")
@click.option("--via", type=click.Choice(["bus", "task"]), default="bus", show_default=True,
              help="bus: plain JSON on the events queue; task: the coupons.issue Celery task.")
@click.option("--no-validate", is_flag=True,
              help="Publish lines as they are, even invalid ones (the worker records them).")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Publish each event this many times (to see duplicates suppressed).")
def publish(source: str, via: str, no_validate: bool, repeat: int) -> None:
    """Publish one event (a JSON object) or a JSON-lines file of events."""
    from worker.bootstrap import open_producer
    from worker.events import parse_event_bytes

    settings = settings_or_exit()
    lines = list(_read_lines(source))
    if not lines:
        fail("no events to publish")
    published = invalid = 0
    try:
        with open_producer(settings) as producer:
            for number, line in lines:
                body = line.encode("utf-8")
                if not no_validate:
                    try:
                        event = parse_event_bytes(body, max_bytes=settings.max_event_bytes)
                    except EventRejected as exc:
                        say(f"line {number}: not published: {exc.reason}", err=True)
                        invalid += 1
                        continue
                    data: Any = event.to_message()
                else:
                    data = None
                for _ in range(repeat):
                    if via == "bus":
                        producer.publish_raw(body)
                    else:
                        producer.publish_event(data if data is not None else json.loads(line),
                                               via="task")
                    published += 1
    except WorkerError as exc:
        fail(str(exc))
    say(f"published {published} message(s) to "
        f"{settings.events_queue if via == 'bus' else settings.tasks_queue}"
        + (f"; {invalid} invalid line(s) skipped" if invalid else ""))
    if invalid:
        sys.exit(1)


# -- events --------------------------------------------------------------------------------


@main.group()
def events() -> None:
    """Inspect events in the ledger."""


@events.command("show")
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def events_show(event_id: str, as_json: bool) -> None:
    """Show an event: its entities, attempts, errors and coupons."""
    from worker.ledger.unit_of_work import make_engine
    from worker.views import event_story

    settings = settings_or_exit()
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        story = event_story(engine, event_id)
    except NotFound as exc:
        fail(str(exc), 3)
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not crash
        fail(f"cannot read the ledger: {exc}")
    finally:
        engine.dispose()
    if as_json:
        print_json(story)
        return
    from worker.render import render_event

    render_event(console, story)


@events.command("replay")
@click.argument("event_id")
@click.option("--reason", required=True, help="Why (stored in the audit log).")
@click.option("--operator", default=None, help="Who (default: the OS user).")
@click.option("--dry-run", is_flag=True, help="Show what would happen; change nothing.")
@click.option("--rate", type=float, default=20.0, show_default=True,
              help="At most this many entities re-enqueued per second.")
@click.option("--json", "as_json", is_flag=True)
def events_replay(event_id: str, reason: str, operator: str | None, dry_run: bool,
                  rate: float, as_json: bool) -> None:
    """Re-run only what an event has not issued yet (dead entities, waiting retries)."""
    from worker.replay import default_operator, replay_event

    with _support_deps() as deps:
        results = replay_event(event_id, reason=reason, operator=operator or default_operator(),
                               deps=deps, dry_run=dry_run, rate_per_s=rate,
                               origin=_cli_origin())
    _print_actions(results, as_json, dry_run, empty=f"nothing to replay for {event_id}")


# -- dead letters --------------------------------------------------------------------------


def _parse_when(value: str | None) -> datetime | None:
    """ISO-8601, or a duration back from now: 30m, 2h, 7d."""
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use ISO-8601 or 30m / 2h / 7d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def selection_options(func: Any) -> Any:
    """The filters shared by dlq list / summary / replay / discard."""
    for option in reversed([
        click.option("--error-code", help="e.g. 712, read_timeout, rejected"),
        click.option("--series", "series_id", type=int, help="Coupon series id."),
        click.option("--customer", help="Customer id, or key like mobile:9198..."),
        click.option("--event", "event_id", help="Event id."),
        click.option("--since", help="ISO-8601 or 30m / 2h / 7d ago."),
        click.option("--until", help="ISO-8601 or 30m / 2h / 7d ago."),
    ]):
        func = option(func)
    return func


def _selection(ids: tuple[int, ...], error_code: str | None, series_id: int | None,
               customer: str | None, event_id: str | None, since: str | None,
               until: str | None) -> Any:
    from worker.ledger.support import Selection

    return Selection(entity_ids=ids, event_id=event_id, error_code=error_code,
                     series_id=series_id, customer=customer, since=_parse_when(since),
                     until=_parse_when(until))


@contextmanager
def _engine() -> Iterator[Any]:
    from worker.ledger.unit_of_work import make_engine

    settings = settings_or_exit()
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        yield engine
    except WorkerError as exc:
        fail(str(exc))
    finally:
        engine.dispose()


@contextmanager
def _support_deps() -> Iterator[Any]:
    from worker.bootstrap import build_support_deps
    from worker.ledger.unit_of_work import make_engine

    settings = settings_or_exit()
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        yield build_support_deps(settings, engine)
    except (WorkerError, ValueError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()


def _print_actions(results: list[Any], as_json: bool, dry_run: bool, *, empty: str) -> None:
    if as_json:
        print_json({"dry_run": dry_run, "results": [r.as_dict() for r in results]})
        return
    if not results:
        say(empty)
        return
    from worker.render import render_actions

    render_actions(console, results, dry_run=dry_run)


@main.group()
def dlq() -> None:
    """Dead letters: what could not be issued, and putting it right."""


@dlq.command("list")
@selection_options
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(error_code: str | None, series_id: int | None, customer: str | None,
             event_id: str | None, since: str | None, until: str | None, limit: int,
             as_json: bool) -> None:
    """Dead entities and rejected events, newest first."""
    from worker.views import dead_letters

    selection = _selection((), error_code if error_code != "rejected" else None, series_id,
                           customer, event_id, since, until)
    with _engine() as engine:
        rows = dead_letters(engine, selection, limit=limit,
                            include_rejected=error_code in (None, "rejected"))
    if error_code == "rejected":
        rows = [r for r in rows if r["kind"] == "rejected"]
    if as_json:
        print_json(rows)
        return
    from worker.render import render_dead_letters

    render_dead_letters(console, rows)


@dlq.command("summary")
@selection_options
@click.option("--json", "as_json", is_flag=True)
def dlq_summary(error_code: str | None, series_id: int | None, customer: str | None,
                event_id: str | None, since: str | None, until: str | None,
                as_json: bool) -> None:
    """Dead entities grouped by error code and series: what failed, how many, since when."""
    from worker.views import dead_letter_summary

    selection = _selection((), error_code, series_id, customer, event_id, since, until)
    with _engine() as engine:
        rows = dead_letter_summary(engine, selection)
    if as_json:
        print_json(rows)
        return
    from worker.render import render_summary

    render_summary(console, rows)


@dlq.command("show")
@click.argument("entity_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def dlq_show(entity_id: int, as_json: bool) -> None:
    """The full story of one entity: attempts, request ids, errors, operator actions."""
    from worker.views import entity_story

    with _engine() as engine, engine.connect() as conn:
        try:
            story = entity_story(conn, entity_id)
        except NotFound as exc:
            fail(str(exc), 3)
    if as_json:
        print_json(story)
        return
    from worker.render import render_entity

    render_entity(console, story)


def operator_action_options(func: Any) -> Any:
    """What every state-changing support command asks: scope, why, who, and a dry run."""
    for option in reversed([
        click.option("--all", "everything", is_flag=True, help="Every dead entity."),
        click.option("--reason", required=True, help="Why (stored in the audit log)."),
        click.option("--operator", default=None, help="Who (default: the OS user)."),
        click.option("--dry-run", is_flag=True, help="Show what would happen; change nothing."),
    ]):
        func = option(func)
    return func


def _cli_origin() -> dict[str, str]:
    """Who ran the command, whatever ``--operator`` says: kept in the audit's details."""
    from worker.replay import default_operator

    return {"via": "cli", "os_user": default_operator()}


def _guard_selection(selection: Any, everything: bool) -> None:
    if selection.is_empty() and not everything:
        fail("name entity ids, --event, or a filter (or --all to act on every dead entity)", 2)


@dlq.command("replay")
@click.argument("entity_ids", type=int, nargs=-1)
@selection_options
@operator_action_options
@click.option("--rate", type=float, default=20.0, show_default=True,
              help="At most this many entities re-enqueued per second.")
@click.option("--json", "as_json", is_flag=True)
def dlq_replay(entity_ids: tuple[int, ...], error_code: str | None, series_id: int | None,
               customer: str | None, event_id: str | None, since: str | None,
               until: str | None, everything: bool, reason: str, operator: str | None,
               dry_run: bool, rate: float, as_json: bool) -> None:
    """Replay dead entities by id, by event or by filter (safe to run twice)."""
    from worker.replay import default_operator, replay

    selection = _selection(entity_ids, error_code, series_id, customer, event_id, since, until)
    _guard_selection(selection, everything)
    with _support_deps() as deps:
        results = replay(selection, reason=reason, operator=operator or default_operator(),
                         deps=deps, dry_run=dry_run, rate_per_s=rate, origin=_cli_origin())
    _print_actions(results, as_json, dry_run, empty="no dead entity matches")


@dlq.command("discard")
@click.argument("entity_ids", type=int, nargs=-1)
@selection_options
@operator_action_options
@click.option("--json", "as_json", is_flag=True)
def dlq_discard(entity_ids: tuple[int, ...], error_code: str | None, series_id: int | None,
                customer: str | None, event_id: str | None, since: str | None,
                until: str | None, everything: bool, reason: str, operator: str | None,
                dry_run: bool, as_json: bool) -> None:
    """Close dead entities without issuing them."""
    from worker.replay import default_operator, discard

    selection = _selection(entity_ids, error_code, series_id, customer, event_id, since, until)
    _guard_selection(selection, everything)
    with _support_deps() as deps:
        results = discard(selection, reason=reason, operator=operator or default_operator(),
                          deps=deps, dry_run=dry_run, origin=_cli_origin())
    _print_actions(results, as_json, dry_run, empty="no dead entity matches")


# -- rejected messages ---------------------------------------------------------------------


@main.group()
def rejected() -> None:
    """Rejected messages (not valid events): inspect them, fix and resubmit."""


@rejected.command("list")
@click.option("--since", help="ISO-8601 or 30m / 2h / 7d ago.")
@click.option("--until", help="ISO-8601 or 30m / 2h / 7d ago.")
@click.option("--event", "event_id", help="The event id the message claimed.")
@click.option("--pending", is_flag=True, help="Only those not resubmitted yet.")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def rejected_list(since: str | None, until: str | None, event_id: str | None, pending: bool,
                  limit: int, as_json: bool) -> None:
    """Rejected messages, newest first: why each was refused, and whether it was resubmitted."""
    from worker.views import rejected_list as listed

    with _engine() as engine:
        rows = listed(engine, since=_parse_when(since), until=_parse_when(until),
                      event_id=event_id, pending_only=pending, limit=limit)
    if as_json:
        print_json(rows)
        return
    from worker.render import render_rejected_list

    render_rejected_list(console, rows)


@rejected.command("show")
@click.argument("rejected_id", type=int)
@click.option("--full", is_flag=True, help="The whole payload, however long.")
@click.option("--save", type=click.Path(dir_okay=False, writable=True),
              help="Write the exact raw bytes to this file (to fix and resubmit).")
@click.option("--json", "as_json", is_flag=True,
              help="JSON, the payload as base64 and as escaped text.")
def rejected_show(rejected_id: int, full: bool, save: str | None, as_json: bool) -> None:
    """One rejected message: the payload as received (shown safely), the reason, the audit."""
    import base64

    from worker.views import rejected_story

    with _engine() as engine:
        try:
            story = rejected_story(engine, rejected_id)
        except NotFound as exc:
            fail(str(exc), 3)
    raw: bytes = story["raw"]
    if save:
        Path(save).write_bytes(raw)
    if as_json:
        print_json({**story, "raw": base64.b64encode(raw).decode("ascii"),
                    "raw_text": raw.decode("utf-8", errors="backslashreplace")})
        return
    from worker.render import render_rejected

    render_rejected(console, story, full=full)
    if save:
        say(f"saved the {len(raw)} raw bytes to {save}")


@rejected.command("resubmit")
@click.argument("rejected_id", type=int)
@click.option("--file", "source", type=click.File("rb"), required=True, metavar="FILE|-",
              help="The fixed event (a JSON object); - reads standard input.")
@click.option("--reason", required=True, help="Why, e.g. the ticket (stored in the audit log).")
@click.option("--operator", default=None, help="Who (default: the OS user).")
@click.option("--dry-run", is_flag=True, help="Validate and show what would happen; change "
              "nothing.")
@click.option("--json", "as_json", is_flag=True)
def rejected_resubmit(rejected_id: int, source: Any, reason: str, operator: str | None,
                      dry_run: bool, as_json: bool) -> None:
    """Send the fixed version of a rejected message through the normal intake, once.

    The fixed payload is validated like any event; when valid it is issued as the
    coupons.issue task. The rejected message is kept as received and linked to the event;
    who, when and why are recorded in the audit log.
    """
    from worker.replay import default_operator, resubmit_rejected

    payload = source.read()
    settings = settings_or_exit()
    with _support_deps() as deps:
        try:
            result = resubmit_rejected(
                rejected_id, payload, reason=reason, operator=operator or default_operator(),
                os_user=default_operator(), deps=deps, submitter=deps.publisher,
                max_bytes=settings.max_event_bytes, dry_run=dry_run)
        except NotFound as exc:
            fail(str(exc), 3)
    if as_json:
        print_json({"dry_run": dry_run, **result.as_dict()})
    else:
        from worker.render import render_resubmit

        render_resubmit(console, result, dry_run=dry_run)
    if not result.accepted:
        sys.exit(1)


# -- console -------------------------------------------------------------------------------


@main.group("console", invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Listen address (0.0.0.0 in a container).")
@click.option("--port", type=int, default=8780, show_default=True)
@click.pass_context
def console_(ctx: click.Context, host: str, port: int) -> None:
    """The support console in the browser (COUPONS_CONSOLE_* variables configure it)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from worker.console.app import create_app
    from worker.console.config import load_console_settings

    settings = settings_or_exit()
    try:
        console_settings = load_console_settings()
        app = create_app(settings, console_settings)
    except WorkerError as exc:
        fail(str(exc))
    say(f"console on http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)



@console_.command("hash-password")
@click.password_option(help="The password to hash (asked twice when not given).")
def console_hash_password(password: str) -> None:
    """Print an argon2 hash for the console's users file."""
    from worker.console.auth import hash_password

    click.echo(hash_password(password))


# -- flower --------------------------------------------------------------------------------


@main.command()
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def duplicates(limit: int, as_json: bool) -> None:
    """Entities holding two of our coupons (a late original landed), and what to do."""
    from worker.views import DUPLICATE_ADVICE
    from worker.views import duplicates as find_duplicates

    with _engine() as engine:
        rows = find_duplicates(engine, limit=limit)
    if as_json:
        print_json({"advice": DUPLICATE_ADVICE, "duplicates": rows})
        return
    if not rows:
        console.print("no duplicates: no entity holds more than one of our coupons")
        return
    from worker.render import render_duplicates

    render_duplicates(console, rows, DUPLICATE_ADVICE)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Listen address (0.0.0.0 in a container).")
@click.pass_context
def flower(ctx: click.Context, port: int, address: str) -> None:
    """Run Flower on the project's app (FLOWER_* variables apply, e.g. FLOWER_BASIC_AUTH).

    Extra options are passed to Flower as they are. Flower's API can send tasks, shut workers
    down and resize pools: on any address but loopback it needs an authentication
    (FLOWER_BASIC_AUTH, FLOWER_AUTH, --basic-auth or --auth).
    """
    settings_or_exit()
    import os

    from worker.config import is_loopback

    authenticated = bool(os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH")
                         or any(a.startswith(("--basic-auth", "--basic_auth", "--auth"))
                                for a in ctx.args))
    if not authenticated and not is_loopback(address):
        fail(f"refusing to serve Flower on {address} without authentication: its API can "
             "send tasks and shut workers down; set FLOWER_BASIC_AUTH=user:password", 2)
    from worker.celery_app import app

    app.start(["flower", f"--port={port}", f"--address={address}", *ctx.args])


if __name__ == "__main__":
    main()
