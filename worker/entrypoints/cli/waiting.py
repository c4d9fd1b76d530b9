"""``waiting``: entities waiting for a retry or for an unknown outcome to settle; make them due
now, or give up on them (dead letters). The console's Waiting view, from a terminal."""

from __future__ import annotations

import click

from worker.entrypoints.cli import output
from worker.entrypoints.cli.options import cli_origin, ledger_engine, print_actions, support_deps
from worker.entrypoints.cli.output import print_json, say
from worker.entrypoints.cli.root import main


@main.group()
def waiting() -> None:
    """What waits for its next attempt, and putting it right."""


@waiting.command("list")
@click.option("--kind", type=click.Choice(["retry", "unknown_outcome"]), default=None,
              help="Only retries, or only unknown outcomes settling.")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def waiting_list(kind: str | None, limit: int, as_json: bool) -> None:
    """Waiting entities, the soonest due first: why, since when, the next attempt."""
    from worker.adapters.postgres.waiting import WaitingReader
    from worker.usecases.issue import utcnow

    with ledger_engine() as engine:
        reader = WaitingReader(engine)
        rows = reader.entities(now=utcnow(), kind=kind, limit=limit)
        counts = reader.counts()
    if as_json:
        print_json({"counts": counts, "entities": rows})
        return
    if not rows:
        say("nothing is waiting")
        return
    from worker.entrypoints.cli.render import render_waiting

    render_waiting(output.console, rows, counts)


@waiting.command("retry-now")
@click.argument("entity_ids", type=int, nargs=-1, required=True)
@click.option("--reason", default="", help="Why (stored in the audit log).")
@click.option("--operator", default=None, help="Who (default: the OS user).")
@click.option("--json", "as_json", is_flag=True)
def waiting_retry_now(entity_ids: tuple[int, ...], reason: str, operator: str | None,
                      as_json: bool) -> None:
    """Make these waiting entities due at once (the sweeper sends them within a sweep)."""
    from worker.usecases.support import default_operator
    from worker.usecases.waiting import retry_now

    with support_deps() as deps:
        results = retry_now(entity_ids, operator=operator or default_operator(), deps=deps,
                            reason=reason, origin=cli_origin())
    print_actions(results, as_json, False, empty="nothing waiting")


@waiting.command("give-up")
@click.argument("entity_ids", type=int, nargs=-1, required=True)
@click.option("--reason", required=True, help="Why (the dead letter's reason, and the audit).")
@click.option("--operator", default=None, help="Who (default: the OS user).")
@click.option("--json", "as_json", is_flag=True)
def waiting_give_up(entity_ids: tuple[int, ...], reason: str, operator: str | None,
                    as_json: bool) -> None:
    """Make these waiting entities dead letters, with your reason."""
    from worker.usecases.support import default_operator
    from worker.usecases.waiting import give_up

    with support_deps() as deps:
        results = give_up(entity_ids, reason=reason, operator=operator or default_operator(),
                          deps=deps, origin=cli_origin())
    print_actions(results, as_json, False, empty="nothing waiting")
