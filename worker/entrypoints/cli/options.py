"""What the support commands share: filters, scope and audit options, the ledger and the
support services they act through, how results are printed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from worker.domain.errors import WorkerError
from worker.entrypoints.cli import output
from worker.entrypoints.cli.output import fail, print_json, say, settings_or_exit

# -- dead letters --------------------------------------------------------------------------


def parse_when(value: str | None) -> datetime | None:
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
        click.option("--error-code", help="e.g. 712, read_timeout, rejected, internal_error, "
                     "infrastructure"),
        click.option("--series", "series_id", type=int, help="Coupon series id."),
        click.option("--customer", help="Customer id, or key like mobile:9198..."),
        click.option("--event", "event_id", help="Event id."),
        click.option("--since", help="ISO-8601 or 30m / 2h / 7d ago."),
        click.option("--until", help="ISO-8601 or 30m / 2h / 7d ago."),
    ]):
        func = option(func)
    return func


def make_selection(ids: tuple[int, ...], error_code: str | None, series_id: int | None,
               customer: str | None, event_id: str | None, since: str | None,
               until: str | None) -> Any:
    from worker.adapters.postgres.support import Selection

    return Selection(entity_ids=ids, event_id=event_id, error_code=error_code,
                     series_id=series_id, customer=customer, since=parse_when(since),
                     until=parse_when(until))


@contextmanager
def ledger_engine() -> Iterator[Any]:
    from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine

    settings = settings_or_exit()
    engine = make_engine(settings.database_url, pool_size=1,
                         limits=ConnectionLimits(pooler=settings.db_pooler))
    try:
        yield engine
    except WorkerError as exc:
        fail(str(exc))
    finally:
        engine.dispose()


@contextmanager
def support_deps() -> Iterator[Any]:
    from worker.adapters.postgres.unit_of_work import ConnectionLimits, make_engine
    from worker.bootstrap import build_support_deps

    settings = settings_or_exit()
    engine = make_engine(settings.database_url, pool_size=1,
                         limits=ConnectionLimits(pooler=settings.db_pooler))
    try:
        yield build_support_deps(settings, engine)
    except (WorkerError, ValueError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()


def print_actions(results: list[Any], as_json: bool, dry_run: bool, *, empty: str) -> None:
    if as_json:
        print_json({"dry_run": dry_run, "results": [r.as_dict() for r in results]})
        return
    if not results:
        say(empty)
        return
    from worker.entrypoints.cli.render import render_actions

    render_actions(output.console, results, dry_run=dry_run)

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


def cli_origin() -> dict[str, str]:
    """Who ran the command, whatever ``--operator`` says: kept in the audit's details."""
    from worker.usecases.support import default_operator

    return {"via": "cli", "os_user": default_operator()}


def guard_selection(selection: Any, everything: bool) -> None:
    if selection.is_empty() and not everything:
        fail("name entity ids, --event, or a filter (or --all to act on every dead entity)", 2)


_UNITS_S = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}


def parse_duration_s(value: str, *, bare_unit: str, minimum_s: float = 1.0) -> float:
    """A duration given as ``90s``, ``10m``, ``36h`` or ``90d`` (a bare number counts in
    ``bare_unit``), in seconds; at least ``minimum_s``."""
    unit = value[-1:].lower()
    number = value[:-1] if unit in _UNITS_S else value
    if not number.isdigit():
        raise click.BadParameter(f"{value!r}: a whole number with s, m, h or d (a bare number "
                                 f"counts in {bare_unit})")
    seconds = float(int(number) * _UNITS_S[unit if unit in _UNITS_S else bare_unit])
    if seconds < minimum_s:
        raise click.BadParameter(f"{value!r}: at least {minimum_s:g} s")
    return seconds
