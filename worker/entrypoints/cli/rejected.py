"""``rejected``: messages that were not valid events; inspect, fix and resubmit them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from worker.domain.errors import NotFound
from worker.entrypoints.cli import output
from worker.entrypoints.cli.options import ledger_engine, parse_when, support_deps
from worker.entrypoints.cli.output import fail, print_json, say, settings_or_exit
from worker.entrypoints.cli.root import main

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
    from worker.usecases.queries import rejected_list as listed

    with ledger_engine() as engine:
        rows = listed(engine, since=parse_when(since), until=parse_when(until),
                      event_id=event_id, pending_only=pending, limit=limit)
    if as_json:
        print_json(rows)
        return
    from worker.entrypoints.cli.render import render_rejected_list

    render_rejected_list(output.console, rows)


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

    from worker.usecases.queries import rejected_story

    with ledger_engine() as engine:
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
    from worker.entrypoints.cli.render import render_rejected

    render_rejected(output.console, story, full=full)
    if save:
        say(f"saved the {len(raw)} raw bytes to {save}")


@rejected.command("resubmit")
@click.argument("rejected_id", type=int)
@click.option("--file", "source", type=click.File("rb"), default=None, metavar="FILE|-",
              help="The fixed event (a JSON object); - reads standard input. Without it, the "
              "message as received (a dead letter of ours: internal_error, infrastructure).")
@click.option("--reason", required=True, help="Why, e.g. the ticket (stored in the audit log).")
@click.option("--operator", default=None, help="Who (default: the OS user).")
@click.option("--dry-run", is_flag=True, help="Validate and show what would happen; change "
              "nothing.")
@click.option("--resend", is_flag=True, help="Send again a resubmission whose publish failed "
              "(refused once its event is in the ledger).")
@click.option("--json", "as_json", is_flag=True)
def rejected_resubmit(rejected_id: int, source: Any, reason: str, operator: str | None,
                      dry_run: bool, resend: bool, as_json: bool) -> None:
    """Send the fixed version of a rejected message through the normal intake, once.

    The fixed payload is validated like any event; when valid it is issued as the
    coupons.issue task. It keeps the original's eventId, customer and series: only what
    failed validation, and the metadata, may change. The rejected message is kept as
    received and linked to the event; who, when and why are recorded in the audit log.
    """
    from worker.usecases.support import default_operator, resubmit_rejected

    settings = settings_or_exit()
    if source is not None:
        payload = source.read()
    else:
        from worker.usecases.queries import rejected_story

        with ledger_engine() as engine:
            try:
                payload = rejected_story(engine, rejected_id)["raw"]
            except NotFound as exc:
                fail(str(exc), 3)
    with support_deps() as deps:
        try:
            result = resubmit_rejected(
                rejected_id, payload, reason=reason, operator=operator or default_operator(),
                os_user=default_operator(), deps=deps, submitter=deps.publisher,
                max_bytes=settings.max_event_bytes, dry_run=dry_run, resend=resend)
        except NotFound as exc:
            fail(str(exc), 3)
    if as_json:
        print_json({"dry_run": dry_run, **result.as_dict()})
    else:
        from worker.entrypoints.cli.render import render_resubmit

        render_resubmit(output.console, result, dry_run=dry_run)
    if not result.accepted:
        sys.exit(1)
