"""What happened: the figures, the exactly-once check against the sandbox's own ledger, and
the commands to look further."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from coupon_devtools.demo.services import ConsoleLogin

from coupon_devtools.demo.backends import Backends
from coupon_devtools.demo.defaults import CALL_LABELS, DEAD_REASONS, display
from coupon_devtools.demo.scenario import Plan


@dataclass(frozen=True)
class Outcome:
    """What the run did, read from the ledger, the worker's counters and the sandbox."""

    coupons: Mapping[str, int]  # by recorded_via
    retried: int
    dead: list[tuple[str, str, int]]  # code, label, count
    rejected: list[str]
    duplicates: int | None
    calls: Mapping[str, int]
    problems: list[str]
    pending: int  # coupons issued whose entity is not at rest yet (a run that did not drain)
    sandbox_issued: int
    examples: Mapping[str, str]

    @property
    def exactly_once(self) -> bool:
        return not self.problems and not self.pending


def exactly_once_problems(ours: Sequence[tuple[str, int, str]],
                           before: Sequence[Mapping[str, Any]],
                           after: Sequence[Mapping[str, Any]],
                           unsettled: set[tuple[str, int]]) -> tuple[list[str], int]:
    """Compare our ledger's coupons (customer key, series, code) with the sandbox's, read
    ``before`` and ``after`` ours, so that a worker still running cannot fake a discrepancy.

    Returns the discrepancies, and how many coupons the sandbox issued for entities still being
    retried (a timeout's coupon is recorded only once the retry reconciles it)."""
    problems = []
    pending = 0
    by_code = {code: (customer, series) for customer, series, code in ours}
    for coupon in before:
        code = str(coupon["code"])
        expected = (f"id:{coupon['customerId']}", int(coupon["seriesId"]))
        if code not in by_code and expected in unsettled:
            pending += 1
        elif code not in by_code:
            problems.append(f"coupon {code} (customer {coupon['customerId']}, series "
                            f"{coupon['seriesId']}) was issued but is not in our ledger")
        elif by_code[code] != expected:
            problems.append(f"coupon {code} is recorded for {by_code[code]}, issued for "
                            f"{expected}")
    issued_codes = {str(c["code"]) for c in after}
    for code in sorted(set(by_code) - issued_codes):
        problems.append(f"coupon {code} is in our ledger but the sandbox never issued it")
    twice = Counter((c["customerId"], c["seriesId"]) for c in after)
    for (customer, series), count in sorted(twice.items()):
        if count > 1:
            problems.append(f"customer {customer} got {count} coupons of series {series}")
    return problems, pending


def summarise(engine: Engine, sandbox_url: str, taken_in: Counter[str] | None) -> Outcome:
    """Gather the run's numbers and the exactly-once verdict."""
    from sqlalchemy import distinct, func, select

    from coupon_devtools.sandbox import SandboxAdmin
    from worker.adapters.postgres import models as m
    from worker.domain.model import TERMINAL_STATES

    with SandboxAdmin(sandbox_url) as admin:
        before = admin.ledger()
    with engine.connect() as conn:
        coupons = {str(via): int(n) for via, n in conn.execute(
            select(m.IssuedCoupon.recorded_via, func.count()).group_by(
                m.IssuedCoupon.recorded_via))}
        retried = conn.execute(select(func.count(distinct(m.EntityHistory.entity_id))).where(
            m.EntityHistory.kind == "retry_scheduled")).scalar_one()
        dead = [(str(code), DEAD_REASONS.get(str(code), str(message or "")[:60]), int(n))
                for code, message, n in conn.execute(
                    select(m.Entity.last_error_code, func.min(m.Entity.last_error_message),
                           func.count()).where(m.Entity.state == "dead")
                    .group_by(m.Entity.last_error_code).order_by(func.count().desc()))]
        rejected = [str(r) for r in conn.execute(
            select(m.RejectedEvent.reason).order_by(m.RejectedEvent.id)).scalars()]
        ours = [(str(c), int(s), str(code)) for c, s, code in conn.execute(
            select(m.IssuedCoupon.customer_key, m.IssuedCoupon.series_id, m.IssuedCoupon.code))]
        unsettled = {(str(c), int(s)) for c, s in conn.execute(
            select(m.Entity.customer_key, m.Entity.series_id).where(
                m.Entity.state.not_in([s.value for s in TERMINAL_STATES])))}
        examples = _examples(conn)
    with SandboxAdmin(sandbox_url) as admin:
        after = admin.ledger()
        calls = admin.stats().get("calls", {})
    problems, pending = exactly_once_problems(ours, before, after, unsettled)
    return Outcome(
        coupons=coupons, retried=int(retried), dead=dead, rejected=rejected,
        duplicates=taken_in["duplicate"] if taken_in is not None else None,
        calls={str(k): int(v) for k, v in calls.items()},
        problems=problems, pending=pending, sandbox_issued=len(after),
        examples=examples,
    )


def _examples(conn: Any) -> dict[str, str]:
    """Real event ids worth a look: one reconciled, one retried, one dead, one rejected."""
    from sqlalchemy import select

    from worker.adapters.postgres import models as m

    queries = {
        "reconciled after a timeout or 5xx": select(m.IssuedCoupon.event_id)
        .where(m.IssuedCoupon.recorded_via == "reconcile"),
        "retried after a 503": select(m.Entity.event_id).join(
            m.EntityHistory, m.EntityHistory.entity_id == m.Entity.id)
        .where(m.EntityHistory.kind == "retry_scheduled", m.EntityHistory.error_code == "http_503"),
        "a series dead-lettered": select(m.Entity.event_id).where(m.Entity.state == "dead"),
        "a rejected message": select(m.RejectedEvent.event_id)
        .where(m.RejectedEvent.event_id.is_not(None)),
    }
    found = {}
    for label, query in queries.items():
        event_id = conn.execute(query.limit(1)).scalar()
        if event_id:
            found[label] = str(event_id)
    return found


def print_summary(console: Console, plan: Plan, outcome: Outcome, *, drained: bool,
                  drain_s: float, total_s: float) -> None:
    """The table a newcomer reads: what went in, what came out, what went wrong and why."""
    from rich.table import Table

    issued = sum(outcome.coupons.values())
    reconciled = outcome.coupons.get("reconcile", 0)
    table = Table(title="what happened", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    table.add_row("events published", str(len(plan.deliveries)),
                  f"messages: {len(plan.events)} distinct events, {plan.duplicates} repeated, "
                  f"{plan.malformed} malformed")
    table.add_row("coupons issued", str(issued),
                  f"{issued - reconciled} on the first answer, {reconciled} by read-back")
    duplicates = outcome.duplicates
    table.add_row("duplicates suppressed",
                  str(duplicates if duplicates is not None else plan.duplicates),
                  "deliveries that found nothing to claim" if duplicates is not None
                  else "published minus distinct (worker metrics unavailable)")
    table.add_row("retried", str(outcome.retried), "entities scheduled for another attempt")
    table.add_row("reconciled", str(reconciled),
                  "coupons confirmed by read-back after a timeout or 5xx")
    dead_total = sum(n for _code, _label, n in outcome.dead)
    table.add_row("dead-lettered", str(dead_total),
                  escape("\n".join(f"{n} x {code} {label}" for code, label, n in outcome.dead))
                  or "-")
    table.add_row("rejected messages", str(len(outcome.rejected)),
                  escape("\n".join(_shorten(r, 60) for r in outcome.rejected)) or "-")
    table.add_row("Capillary calls", str(sum(outcome.calls.values())),
                  ", ".join(f"{n} {CALL_LABELS.get(path, path)}"
                            for path, n in outcome.calls.items() if n))
    table.add_row("elapsed", f"{total_s:.1f} s",
                  f"{drain_s:.1f} s from first publish to "
                  + ("drained" if drained else "giving up"))
    console.print(table)
    if outcome.exactly_once and drained:
        console.print(f"[bold green]exactly once: OK[/] - the sandbox issued "
                      f"{outcome.sandbox_issued} coupons; every one is in the ledger, none twice")
    elif not outcome.problems:
        console.print(f"[bold yellow]exactly once: not verified[/] - the pipeline did not drain; "
                      f"no discrepancy among the {outcome.sandbox_issued} coupons issued so far"
                      + (f" ({outcome.pending} not recorded yet: their entities are still "
                         "in progress)" if outcome.pending else ""))
    else:
        console.print(f"[bold red]exactly once: FAILED[/] - {len(outcome.problems)} "
                      "discrepancies:")
        for problem in outcome.problems[:20]:
            console.print(f"  {escape(problem)}")


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def print_next_steps(console: Console, backends: Backends, outcome: Outcome,
                     flower_url: str | None, *, keep: bool, workdir: Path,
                     login: ConsoleLogin | None = None) -> None:
    """Copy-pasteable commands into the run's ledger and logs; the console's URL last."""
    from sqlalchemy.engine import make_url

    console.print("\n[bold]where to look next[/]")
    if flower_url:
        console.print(f"  Flower    {flower_url}"
                      + ("" if keep else "  (stopped with the demo: rerun with --keep)"))
    console.print(f"  logs      {display(workdir / 'logs')}/")
    if backends.database.pgdata is not None and not keep:
        console.print("  (the embedded PostgreSQL is stopped now: rerun with --keep to query "
                      "the ledger with the commands below)")
    exports = {"COUPONS_DATABASE_URL": backends.database.url, **backends.broker.env(),
               "COUPONS_ENV_FILE": ""}
    if make_url(backends.database.url).password:
        # Never echo a password the caller configured.
        exports["COUPONS_DATABASE_URL"] = make_url(backends.database.url).render_as_string()
    for name, value in exports.items():
        console.print(f"  export {name}={_shell_quote(value)}")
    for label, event_id in outcome.examples.items():
        console.print(f"  coupon-worker events show {event_id}    # {label}")
    console.print("  coupon-worker dlq list")
    if keep:
        console.print(f"\neverything is still running; stop it with:  coupon-worker demo "
                      f"--stop --workdir {_shell_quote(display(workdir))}")
    if login is not None:
        console.print(f"\n[bold]support console[/]  {login.url}  log in as {login.user} / "
                      f"{login.password}"
                      + ("" if keep else "  (stopped with the demo: rerun with --keep)"))


def _shell_quote(value: str) -> str:
    return shlex.quote(value) if value else "''"
