"""Retention: ``prune``, what the workers' schedule runs, by hand (docs/retention.md)."""

from __future__ import annotations

import click

from worker.domain.errors import WorkerError
from worker.entrypoints.cli import output
from worker.entrypoints.cli.options import parse_duration_s
from worker.entrypoints.cli.output import fail, print_json, say, settings_or_exit
from worker.entrypoints.cli.root import main

#: Why each kind of old row stays, as ``prune`` prints it.
KEPT_BECAUSE = {
    "dead_letters": "dead letters (entities; their events stay whole): a person replays or "
                    "discards them (dlq)",
    "unsettled_events": "events still processing: an entity is not at rest",
    "rejected_messages": "rejected messages: evidence, fixed and resubmitted by a person",
    "duplicate_issued": "events holding two of our coupons: a person decides (duplicates)",
    "verifying": "events whose late-original check is still due",
    "busy": "events a worker held during the run: the next run takes them",
}


def parse_age_s(value: str) -> float:
    """``90d``, ``36h`` or a number of days, in seconds; at least a day."""
    return parse_duration_s(value, bare_unit="d", minimum_s=86_400)


@main.command()
@click.option("--older-than", "older_than",
              help="Prune settled events older than this: 90d, 36h, or days "
                   "(default: COUPONS_RETENTION_DAYS).")
@click.option("--batch-size", type=click.IntRange(1, 50_000), default=None,
              help="Events (or audit rows) per transaction (default: "
                   "COUPONS_RETENTION_BATCH_SIZE).")
@click.option("--dry-run", is_flag=True, help="Count what would go; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(older_than: str | None, batch_size: int | None, dry_run: bool,
          as_json: bool) -> None:
    """Prune settled events, forget old event ids, age out the audit trail.

    Settled events (every entity issued or discarded) older than --older-than lose their
    entities, coupons, history and calls; each keeps an emptied row with its outcome, so a
    redelivery of its id is not issued again, until COUPONS_RETENTION_EVENT_ID_WINDOW_DAYS
    after it was received. Audit rows go after COUPONS_RETENTION_AUDIT_DAYS. Dead letters,
    duplicates, unsettled events and rejected messages are never pruned: they are counted as
    kept.
    """
    from worker.adapters.postgres.retention import RetentionStore
    from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine
    from worker.logs import configure_logging
    from worker.usecases.retention import policy_from
    from worker.usecases.retention import prune as run_prune

    settings = settings_or_exit()
    configure_logging(settings.log_level, settings.log_format)
    try:
        policy = policy_from(
            settings, older_than_s=parse_age_s(older_than) if older_than else None,
            batch_size=batch_size)
    except ValueError as exc:
        fail(str(exc), 2)
    # The ledger's password applies when the job connects as the worker's URL names.
    password = settings.database_secret() if settings.retention_database_url is None else None
    engine = make_engine(settings.retention_url, pool_size=1, application_name="coupon-prune",
                         limits=ConnectionLimits(pooler=settings.db_pooler), password=password)
    try:
        report = run_prune(RetentionStore(engine), policy, dry_run=dry_run)
    except WorkerError as exc:
        fail(f"prune stopped: {exc} (what was committed stays; run it again)")
    finally:
        engine.dispose()
    if as_json:
        print_json(report.as_dict())
        return
    from worker.entrypoints.cli.render import table

    removed = table("would remove" if dry_run else "removed", ["rows", "count"])
    for name, count in report.removed().items():
        removed.add_row(name.replace("_", " "), str(count))
    output.console.print(removed)
    if report.kept:
        kept = table("kept although old (never pruned)", ["count", "why"])
        for reason, count in report.kept.items():
            kept.add_row(str(count), KEPT_BECAUSE.get(reason, reason))
        output.console.print(kept)
    say(f"{'dry run: nothing changed; ' if dry_run else ''}{report.batches} batches of at most "
        f"{policy.batch_size} events or audit rows, in {report.duration_s:g} s")
