"""Support: ``events``, ``dlq`` and ``duplicates`` — inspect, replay, discard."""

from __future__ import annotations

import click

from worker.domain.errors import NotFound
from worker.entrypoints.cli import output
from worker.entrypoints.cli.confirm import confirmed_ids
from worker.entrypoints.cli.options import (
    cli_origin,
    guard_selection,
    ledger_engine,
    make_selection,
    operator_action_options,
    print_actions,
    selection_options,
    support_deps,
)
from worker.entrypoints.cli.output import fail, print_json, settings_or_exit
from worker.entrypoints.cli.root import main

# -- events --------------------------------------------------------------------------------


@main.group()
def events() -> None:
    """Inspect events in the ledger."""


@events.command("show")
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def events_show(event_id: str, as_json: bool) -> None:
    """Show an event: its entities, attempts, errors and coupons."""
    from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine
    from worker.usecases.queries import event_story

    settings = settings_or_exit()
    engine = make_engine(settings.database_url, pool_size=1,
                         limits=ConnectionLimits(pooler=settings.db_pooler))
    try:
        story = event_story(engine, event_id)
    except NotFound as exc:
        fail(str(exc), 3)
    finally:
        engine.dispose()
    if as_json:
        print_json(story)
        return
    from worker.entrypoints.cli.render import render_event

    render_event(output.console, story)


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
    from worker.usecases.support import default_operator, replay_event

    with support_deps() as deps:
        results = replay_event(event_id, reason=reason, operator=operator or default_operator(),
                               deps=deps, dry_run=dry_run, rate_per_s=rate,
                               origin=cli_origin())
    print_actions(results, as_json, dry_run, empty=f"nothing to replay for {event_id}")

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
    from worker.usecases.queries import DEAD_MESSAGE_CODES, dead_letters

    selection = make_selection((), error_code, series_id, customer, event_id, since, until)
    with ledger_engine() as engine:
        rows = dead_letters(engine, selection, limit=limit,
                            include_rejected=error_code in (None, *DEAD_MESSAGE_CODES))
    if error_code in DEAD_MESSAGE_CODES:
        rows = [r for r in rows if r["kind"] == "rejected"]
    if as_json:
        print_json(rows)
        return
    from worker.entrypoints.cli.render import render_dead_letters

    render_dead_letters(output.console, rows)


@dlq.command("summary")
@selection_options
@click.option("--json", "as_json", is_flag=True)
def dlq_summary(error_code: str | None, series_id: int | None, customer: str | None,
                event_id: str | None, since: str | None, until: str | None,
                as_json: bool) -> None:
    """Dead entities grouped by error code and series: what failed, how many, since when."""
    from worker.usecases.queries import dead_letter_summary

    selection = make_selection((), error_code, series_id, customer, event_id, since, until)
    with ledger_engine() as engine:
        rows = dead_letter_summary(engine, selection)
    if as_json:
        print_json(rows)
        return
    from worker.entrypoints.cli.render import render_summary

    render_summary(output.console, rows)


@dlq.command("show")
@click.argument("entity_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def dlq_show(entity_id: int, as_json: bool) -> None:
    """The full story of one entity: attempts, request ids, errors, operator actions."""
    from worker.usecases.queries import entity_story

    with ledger_engine() as engine, engine.connect() as conn:
        try:
            story = entity_story(conn, entity_id)
        except NotFound as exc:
            fail(str(exc), 3)
    if as_json:
        print_json(story)
        return
    from worker.entrypoints.cli.render import render_entity

    render_entity(output.console, story)

@dlq.command("replay")
@click.argument("entity_ids", type=int, nargs=-1)
@selection_options
@operator_action_options
@click.option("--rate", type=float, default=20.0, show_default=True,
              help="At most this many entities re-enqueued per second.")
@click.option("--yes", is_flag=True, help="Do not ask before acting on what a filter found.")
@click.option("--json", "as_json", is_flag=True)
def dlq_replay(entity_ids: tuple[int, ...], error_code: str | None, series_id: int | None,
               customer: str | None, event_id: str | None, since: str | None,
               until: str | None, everything: bool, reason: str, operator: str | None,
               dry_run: bool, rate: float, yes: bool, as_json: bool) -> None:
    """Replay dead entities by id, or those a filter finds (listed, then confirmed: only the
    listed ids are replayed). Safe to run twice."""
    from worker.usecases.action_plans import by_ids
    from worker.usecases.support import REPLAYABLE, default_operator, replay

    selection = make_selection(entity_ids, error_code, series_id, customer, event_id, since, until)
    guard_selection(selection, everything)
    ids = confirmed_ids(selection, REPLAYABLE, verb="replay", dry_run=dry_run, yes=yes,
                        as_json=as_json)
    if ids is None:
        return
    with support_deps() as deps:
        results = replay(by_ids(ids, REPLAYABLE), reason=reason,
                         operator=operator or default_operator(), deps=deps, rate_per_s=rate,
                         dry_run=dry_run, origin=cli_origin()) if ids else []
    print_actions(results, as_json, dry_run, empty="no dead entity matches")


@dlq.command("discard")
@click.argument("entity_ids", type=int, nargs=-1)
@selection_options
@operator_action_options
@click.option("--yes", is_flag=True, help="Do not ask before acting on what a filter found.")
@click.option("--json", "as_json", is_flag=True)
def dlq_discard(entity_ids: tuple[int, ...], error_code: str | None, series_id: int | None,
                customer: str | None, event_id: str | None, since: str | None,
                until: str | None, everything: bool, reason: str, operator: str | None,
                dry_run: bool, yes: bool, as_json: bool) -> None:
    """Close dead entities without issuing them: by id, or those a filter finds (listed,
    then confirmed: only the listed ids are discarded)."""
    from worker.usecases.action_plans import by_ids
    from worker.usecases.support import DISCARDABLE, default_operator, discard

    selection = make_selection(entity_ids, error_code, series_id, customer, event_id, since, until)
    guard_selection(selection, everything)
    ids = confirmed_ids(selection, DISCARDABLE, verb="discard", dry_run=dry_run, yes=yes,
                        as_json=as_json)
    if ids is None:
        return
    with support_deps() as deps:
        results = discard(by_ids(ids, DISCARDABLE), reason=reason,
                          operator=operator or default_operator(), deps=deps,
                          dry_run=dry_run, origin=cli_origin()) if ids else []
    print_actions(results, as_json, dry_run, empty="no dead entity matches")

@main.command()
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def duplicates(limit: int, as_json: bool) -> None:
    """Entities holding two of our coupons (a late original landed), and what to do."""
    from worker.usecases.queries import DUPLICATE_ADVICE
    from worker.usecases.queries import duplicates as find_duplicates

    with ledger_engine() as engine:
        rows = find_duplicates(engine, limit=limit)
    if as_json:
        print_json({"advice": DUPLICATE_ADVICE, "duplicates": rows})
        return
    if not rows:
        output.console.print("no duplicates: no entity holds more than one of our coupons")
        return
    from worker.entrypoints.cli.render import render_duplicates

    render_duplicates(output.console, rows, DUPLICATE_ADVICE)
