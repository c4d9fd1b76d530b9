"""Destructive commands act on explicit ids: a filter lists what it finds now (bounded), the
operator confirms that list, and only those ids are touched
(``worker.usecases.action_plans``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import click

from worker.entrypoints.cli import output
from worker.entrypoints.cli.options import ledger_engine
from worker.entrypoints.cli.output import fail, print_json, say


def confirmed_ids(selection: Any, states: tuple[str, ...], *, verb: str, dry_run: bool,
                  yes: bool, as_json: bool) -> tuple[int, ...] | None:
    """The ids to act on: those named when no filter is given (the command's own dry run
    then shows what it would do), else the ones the filter finds now (at most ``MAX_IDS``;
    more exits 2 asking to narrow it), shown and confirmed.

    None after a filter's dry run (the list is printed with the ids to confirm) or when the
    operator says no; the command then changes nothing.
    """
    from worker.adapters.postgres.plans import SqlActionPlans
    from worker.domain.errors import SelectionRefused
    from worker.usecases.action_plans import MAX_IDS, plan_action, too_many

    if selection.entity_ids and replace(selection, entity_ids=()).is_empty():
        # Named one by one: acted on (or, with --dry-run, shown) as named.
        if len(selection.entity_ids) > MAX_IDS:
            fail(str(too_many(len(selection.entity_ids))), 2)
        return tuple(selection.entity_ids)
    with ledger_engine() as engine:
        try:
            plan = plan_action(replace(selection, states=states), SqlActionPlans(engine))
        except SelectionRefused as exc:
            fail(str(exc), 2)
    ids = plan.entity_ids
    if as_json and dry_run:
        print_json({"dry_run": True, "ids": list(ids), "results": [
            {"entity_id": t.entity_id, "event_id": t.event_id, "series_id": t.series_id,
             "customer": t.customer_key, "state_before": t.state,
             "outcome": _would(verb, t)} for t in plan.targets]})
        return None
    if not ids:
        if not as_json:
            say(f"nothing to {verb}: no entity matches")
        return ()
    if not as_json:
        from worker.entrypoints.cli.render import render_planned

        render_planned(output.console, plan.targets, verb=verb)
    if dry_run:
        say(f"dry run: nothing changed. To {verb} exactly these {len(ids)}, run the command "
            f"again without --dry-run and confirm, or name them: {' '.join(map(str, ids))}")
        return None
    if not yes and not click.confirm(f"{verb.capitalize()} exactly these {len(ids)} entities?",
                                     default=False, err=True):
        say("nothing changed")
        return None
    return ids


def _would(verb: str, target: Any) -> str:
    if verb != "replay":
        return f"would {verb}"
    return "would reconcile, then issue if absent" if target.needs_reconcile \
        else "would issue again"
