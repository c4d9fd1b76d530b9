"""``coupon-worker bench --scenario ledger-size``: is the ledger as fast at a year's size as new?

Two databases of the bench's own, both migrated with the real migrations and seeded with the
same shapes (:mod:`coupon_devtools.bench.ledger_seed`): the baseline, nearly empty (5,000
entities, a day of a small programme: enough for a full page of dead letters, so that a page
is compared with a page, not with nothing), and the ledger at size, ``--ledger-rows`` entities
and their events, calls, history and coupons. The same work then runs on each, in this process,
through the project's own code (no SQL of the bench's):

- *hot path*: one event's claim and outcome, ``SqlLedger.take_in`` then ``SqlLedger.record``
  (the two statements of ``worker.adapters.postgres.hot_path``), a new event each time;
- *sweeper cycle*: ``worker.usecases.sweep.sweep`` and the replay-job step, as the sweeper
  thread runs them every second (nothing is due: the seeded retries wait for hours);
- *dlq list*: ``queries.dead_letters`` with no filter, as ``coupon-worker dlq list``;
- *search*: the console's ``queries.customer_story`` by customer, coupon code, Capillary
  request id and event id, each naming one event the hot path recorded in that ledger, so
  both ledgers answer the same story;
- *dead-letter groups*: ``queries.dead_letter_groups``, the console's page.

``--rounds`` rounds (default three); in each, every piece of work runs on both ledgers, the two
taking turns at going first, after a warm-up. A row's figure is the median of all its samples
(the hot path's p99 too); its verdict compares the ledger at size with the baseline in the
same run: at most 1.2 times. The ratio of each round's medians is shown as min-max, a measure
of the shared machine's noise.

Then each piece of work runs once more on each ledger with its statements captured, and every
statement is run again under ``EXPLAIN (ANALYZE, BUFFERS)`` (rolled back): the verdict is that
no plan reads one of the big tables whole (a sequential scan); the buffers each statement
touched are shown beside the baseline's.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from coupon_devtools.bench.events import Percentiles
from coupon_devtools.bench.ledger_seed import BIG_TABLES, SEED_SERIES, SeedReport, seed
from coupon_devtools.bench.machine import Machine, describe_machine
from coupon_devtools.bench.plans import Captured, PlanCheck, capture, check_all, explain
from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.fakes.capillary import FakeCapillary
from coupon_devtools.harness.databases import drop_database, recreate_migrated
from worker.adapters.capillary.api import CallInfo
from worker.adapters.postgres.circuit import CircuitGate
from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.ratelimit import Unlimited
from worker.adapters.postgres.records import Claim, RecordedCall, Transition
from worker.adapters.postgres.support import Selection
from worker.adapters.postgres.unit_of_work import (
    ConnectionLimits,
    SqlUnitOfWork,
    make_engine,
    sql_unit_of_work_factory,
)
from worker.domain.events import LoyaltyEvent
from worker.domain.model import Coupon, EntityState
from worker.domain.policy import CircuitPolicy, RetryPolicy
from worker.metrics import Metrics
from worker.usecases import queries, sweep
from worker.usecases.deps import Deps, utcnow
from worker.usecases.replay_jobs import step_replay_jobs
from worker.usecases.support import SupportDeps

DEFAULT_LEDGER_ROWS = 2_000_000
#: The baseline's entities: about 150 dead letters, more than a page of ``dlq list``.
BASELINE_ROWS = 5_000
FLAT_TARGET = 1.2
HOT_EVENTS_PER_ROUND = 150
REPEATS_PER_ROUND = 15
LEASE_S = 120.0
SETTLE_S = 120.0
WORKER = "bench-ledger:1"
WORK = ("hot path", "sweeper cycle", "dlq list", "search by customer", "search by code",
        "search by request id", "search by event id", "dead-letter groups")


@dataclass(frozen=True)
class Probe:
    """One event the hot path recorded: what the searches look for."""

    event_id: str
    customer_key: str
    code: str
    request_id: str


@dataclass
class Ledger:
    """One of the two ledgers, with the engine and the dependencies the work runs on."""

    name: str
    url: str
    engine: Engine
    uow: Callable[[], SqlUnitOfWork]
    deps: Deps
    support: SupportDeps
    jobs: ReplayJobStore
    probes: list[Probe] = field(default_factory=list)
    serial: int = 0


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure on both ledgers, their ratio and the verdict."""

    what: str
    baseline_ms: float
    full_ms: float
    ratio: float
    round_ratios: tuple[float, ...]
    samples: int

    @property
    def met(self) -> bool:
        return self.ratio <= FLAT_TARGET


@dataclass
class LedgerSizeReport:
    machine: Machine
    seed: SeedReport
    rounds: int
    baseline_rows: int
    rows: list[Row] = field(default_factory=list)
    plans: list[PlanCheck] = field(default_factory=list)
    baseline_buffers: dict[str, int] = field(default_factory=dict)

    @property
    def plans_ok(self) -> bool:
        return all(p.ok for p in self.plans)


# -- the work ------------------------------------------------------------------------------


def _event(ledger: Ledger) -> LoyaltyEvent:
    ledger.serial += 1
    n = ledger.serial
    return LoyaltyEvent.model_validate({
        "eventId": f"bench-ledger-{uuid.uuid4().hex}",
        "eventType": "TierUpgraded",
        "customer": {"id": f"8{n:09d}"},
        "seriesIds": [SEED_SERIES[n % len(SEED_SERIES)], SEED_SERIES[(n + 3) % len(SEED_SERIES)]],
        "metadata": {"sourceType": "TierUpgrade", "sourceId": "bench", "reason": "ledger size"},
    })


def _claim(ledger: Ledger, event: LoyaltyEvent, now: datetime, *, joined: bool) -> Claim:
    with ledger.uow() as uow:
        if joined:
            # A statement first: the hot path's statement then joins the session's transaction
            # (rolled back at the end) and passes through SQLAlchemy, where it is captured.
            uow.session.execute(text("SELECT 1"))
        _, claim = uow.ledger.take_in(event, source="bus", token=uuid.uuid4().hex,
                                      worker=WORKER, now=now, lease_s=LEASE_S,
                                      settle_window_s=SETTLE_S)
        if not joined:
            uow.commit()
    return claim


def _outcome(ledger: Ledger, claim: Claim, now: datetime, *, joined: bool) -> Probe:
    request_id = uuid.uuid4().hex
    coupons = {c.entity_id: Coupon(code=f"LS{uuid.uuid4().hex[:10].upper()}",
                                   series_id=c.series_id) for c in claim.entities}
    transitions = [Transition(c.entity_id, EntityState.ISSUED, "issued", c.attempts,
                              coupon=coupons[c.entity_id], request_id=request_id)
                   for c in claim.entities]
    call = RecordedCall(CallInfo("bulk_issue", now, 240.0, 200, request_id, "answered"),
                        tuple(c.entity_id for c in claim.entities),
                        tuple(c.series_id for c in claim.entities), claim.issue_ref)
    with ledger.uow() as uow:
        if joined:
            uow.session.execute(text("SELECT 1"))
        uow.ledger.record(claim, calls=[call], transitions=transitions, worker=WORKER, now=now)
        if not joined:
            uow.commit()
    return Probe(claim.event_id, claim.customer_key, next(iter(coupons.values())).code,
                 request_id)


def issue_one(ledger: Ledger) -> Probe:
    """One event's claim and outcome, as ``issue_event`` records them: two statements, each
    a transaction of its own."""
    now = datetime.now(UTC)
    return _outcome(ledger, _claim(ledger, _event(ledger), now, joined=False), now,
                    joined=False)


def issue_for_plans(ledger: Ledger) -> None:
    """The hot path's two statements, each joined to a transaction that is rolled back (so
    that they are captured): the claim of one new event, and the outcome of another event's
    claim, committed first, so that the outcome can be run again under EXPLAIN."""
    now = datetime.now(UTC)
    _claim(ledger, _event(ledger), now, joined=True)
    claim = _claim(ledger, _event(ledger), now, joined=False)
    _outcome(ledger, claim, now, joined=True)


def _probe(ledger: Ledger) -> Probe:
    if not ledger.probes:
        ledger.probes.append(issue_one(ledger))
    return ledger.probes[0]


def _sweep(ledger: Ledger) -> None:
    sweep.sweep(ledger.deps)
    step_replay_jobs(ledger.support, ledger.jobs)


def _work(name: str) -> Callable[[Ledger], Any]:
    """The piece of work named ``name``, on a ledger."""
    searches: dict[str, Callable[[Probe], str]] = {
        "search by customer": lambda p: p.customer_key,
        "search by code": lambda p: p.code,
        "search by request id": lambda p: p.request_id,
        "search by event id": lambda p: p.event_id,
    }
    if name == "hot path":
        return issue_one
    if name == "sweeper cycle":
        return _sweep
    if name == "dlq list":
        return lambda ledger: queries.dead_letters(ledger.engine, Selection(), limit=100)
    if name == "dead-letter groups":
        return lambda ledger: queries.dead_letter_groups(ledger.engine)
    if name in searches:
        term = searches[name]

        def search(ledger: Ledger) -> None:
            story = queries.customer_story(ledger.engine, term(_probe(ledger)))
            assert len(story["events"]) == 1, f"{name}: {len(story['events'])} events found"

        return search
    raise ValueError(name)


def _timed(work: Callable[[Ledger], Any], ledger: Ledger, times: int) -> list[float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        work(ledger)
        samples.append(time.perf_counter() - started)
    return samples


# -- the two ledgers -----------------------------------------------------------------------


@contextmanager
def _ledger(name: str, url: str) -> Iterator[Ledger]:
    engine = make_engine(url, pool_size=2, application_name=f"coupon-worker-bench-{name}",
                         limits=ConnectionLimits(statement_timeout_s=60.0))
    uow = sql_unit_of_work_factory(engine)
    publisher = FakePublisher()
    metrics = Metrics()
    deps = Deps(
        uow=uow, api=FakeCapillary(), publisher=publisher, limiter=Unlimited(),
        circuit=CircuitGate(uow, CircuitPolicy(), clock=utcnow, probe_timeout_s=LEASE_S),
        retry_policy=RetryPolicy(), metrics=metrics, worker_id=WORKER, lease_s=LEASE_S)
    try:
        yield Ledger(name, url, engine, uow, deps,
                     SupportDeps(uow=uow, publisher=publisher, clock=utcnow,
                                 metrics=metrics), ReplayJobStore(engine))
    finally:
        engine.dispose()


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3) if samples else float("nan")


def measure(baseline: Ledger, full: Ledger, *, rounds: int, hot_events: int, repeats: int,
            say: Callable[[str], None]) -> list[Row]:
    """Every piece of work on both ledgers, ``rounds`` times, interleaved."""
    samples: dict[tuple[str, str], list[list[float]]] = {
        (w, ledger.name): [] for w in WORK for ledger in (baseline, full)}
    for name in WORK:  # warm-up: caches, prepared statements, the probes
        for ledger in (baseline, full):
            _timed(_work(name), ledger, 2)
    for round_no in range(rounds):
        order = (baseline, full) if round_no % 2 == 0 else (full, baseline)
        say(f"round {round_no + 1} of {rounds}: {order[0].name} first")
        for name in WORK:
            times = hot_events if name == "hot path" else repeats
            for ledger in order:
                samples[(name, ledger.name)].append(_timed(_work(name), ledger, times))
    rows = []
    for name in WORK:
        per_round_e = samples[(name, baseline.name)]
        per_round_f = samples[(name, full.name)]
        all_e = [s for r in per_round_e for s in r]
        all_f = [s for r in per_round_f for s in r]
        ratios = tuple(round(statistics.median(f) / statistics.median(e), 2)
                       for e, f in zip(per_round_e, per_round_f, strict=True))
        label = "hot path: claim + outcome, p50" if name == "hot path" else name
        e_ms, f_ms = _median_ms(all_e), _median_ms(all_f)
        rows.append(Row(label, e_ms, f_ms, round(f_ms / e_ms, 2), ratios, len(all_f)))
        if name == "hot path":
            e99, f99 = Percentiles.of(all_e).p99_ms, Percentiles.of(all_f).p99_ms
            p99_ratios = tuple(
                round(Percentiles.of(f).p99_ms / Percentiles.of(e).p99_ms, 2)
                for e, f in zip(per_round_e, per_round_f, strict=True))
            rows.append(Row("hot path: claim + outcome, p99", e99, f99, round(f99 / e99, 2),
                            p99_ratios, len(all_f)))
    return rows


def capture_plans(ledger: Ledger) -> tuple[list[Captured], list[dict[str, Any]]]:
    """Every statement of every piece of work, once, and its plan as run on ``ledger``."""
    with capture(ledger.engine) as seen:
        for name in WORK:
            seen.label = name
            if name == "hot path":
                issue_for_plans(ledger)
            else:
                _work(name)(ledger)
    statements = [s for s in seen.statements if s.sql.strip() != "SELECT 1"]
    return statements, explain(ledger.engine, statements)


def _unique(checks: list[PlanCheck]) -> list[PlanCheck]:
    """Each statement once, under the first piece of work that ran it."""
    seen: set[str] = set()
    out = []
    for c in checks:
        if c.statement not in seen:
            seen.add(c.statement)
            out.append(c)
    return out


#: A statement's reads are flat when the ledger at size costs it at most this many buffers
#: (8 kB pages) more than the baseline: an index descent or two, not a range that grows.
FLAT_BUFFERS = 30


def reads_flat(baseline_buffers: int | None, size_buffers: int) -> bool:
    return baseline_buffers is None or size_buffers <= baseline_buffers + FLAT_BUFFERS


# -- the scenario --------------------------------------------------------------------------


def database_urls(namespace: str, admin_url: str) -> dict[str, str]:
    suffix = f"_{namespace.replace('-', '_')}" if namespace else ""
    base = make_url(admin_url).set(drivername="postgresql+psycopg")
    return {name: base.set(database=f"coupon_worker_bench_{name}{suffix}")
            .render_as_string(hide_password=False) for name in ("baseline", "ledger")}


def run_ledger_size(*, rows: int, rounds: int, say: Callable[[str], None], admin_url: str,
                    namespace: str = "", keep: bool = False,
                    hot_events: int = HOT_EVENTS_PER_ROUND,
                    repeats: int = REPEATS_PER_ROUND,
                    baseline_rows: int = BASELINE_ROWS) -> LedgerSizeReport:
    """Seed, measure, explain; drops both databases afterwards unless ``keep``."""
    machine = describe_machine()
    urls = database_urls(namespace, admin_url)
    try:
        for url in urls.values():
            say(f"database {make_url(url).database}: drop, create, migrate")
            recreate_migrated(url)
        say(f"seeding {rows:,} entities with COPY")
        seeded = seed(make_url(urls["ledger"]).set(drivername="postgresql")
                      .render_as_string(hide_password=False), rows, say=say)
        say(f"seeded in {seeded.total_s:.0f} s ({seeded.size_mb:,.0f} MB); the baseline: "
            f"{baseline_rows:,} entities")
        seed(make_url(urls["baseline"]).set(drivername="postgresql")
             .render_as_string(hide_password=False), baseline_rows, say=lambda _m: None)
        with _ledger("baseline", urls["baseline"]) as baseline, \
                _ledger("ledger", urls["ledger"]) as full:
            with full.engine.connect() as conn:
                postgres = str(conn.execute(text("SHOW server_version")).scalar()).split()[0]
            machine = Machine(**{**machine.__dict__, "postgres": postgres})
            report = LedgerSizeReport(machine, seeded, rounds, baseline_rows)
            report.rows = measure(baseline, full, rounds=rounds, hot_events=hot_events,
                                  repeats=repeats, say=say)
            say("explaining every statement on both ledgers")
            statements, plans = capture_plans(full)
            report.plans = _unique(check_all(statements, plans, BIG_TABLES))
            statements, plans = capture_plans(baseline)
            for c in check_all(statements, plans, BIG_TABLES):
                report.baseline_buffers.setdefault(c.statement, c.buffers)
        return report
    finally:
        if not keep:
            for url in urls.values():
                drop_database(url, str(make_url(url).database))


# -- the report ----------------------------------------------------------------------------


def describe(statement: str) -> str:
    """A statement in a few words: the hot path's by name, any other by verb and table."""
    if statement.startswith("WITH new_event AS"):
        return "hot_path.TAKE_IN (claim)"
    if statement.startswith("WITH t AS"):
        return "hot_path.RECORD (outcome)"
    verb = statement.split(None, 1)[0].upper()
    found = re.search(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)", statement, re.IGNORECASE)
    return f"{verb} {found.group(1) if found else ''}".strip()


def _reads(c: PlanCheck) -> str:
    return ", ".join(scan.split(" using ", 1)[-1].split(" on ", 1)[0]
                     if " using " in scan else scan for scan in c.scans) or "-"


def render_ledger_size(console: Console, report: LedgerSizeReport) -> None:
    """The machine, the seeded ledger, one verdict per row, and the plans at size."""
    m, s = report.machine, report.seed
    console.print(
        f"Machine: {m.cpus} x {m.cpu_model}, {m.memory_gb:g} GB; PostgreSQL {m.postgres}; "
        f"{m.system}; {m.date}; load before the run {m.background_busy_pct:g} % CPU busy, "
        f"load average {' '.join(f'{v:g}' for v in m.load_average)}")
    console.print(
        f"Ledger: {s.big_table_rows:,} rows in its big tables ("
        + ", ".join(f"{n:,} {t}" for t, n in s.rows.items())
        + f"); {s.size_mb:,.0f} MB; seeded in {s.total_s:.0f} s (COPY {s.copy_s:.0f} s, "
        f"indexes {s.index_s:.0f} s, VACUUM ANALYZE {s.vacuum_s:.0f} s; "
        f"{s.all_visible:.0%} of the entities' pages all-visible)")
    table = Table(title=f"The ledger at size ({s.entities:,} entities) against a nearly empty "
                        f"one ({report.baseline_rows:,}), same run ({report.rounds} rounds, "
                        "interleaved; medians)", title_justify="left")
    for column in ("what", "baseline ms", "at size ms", "ratio", "rounds", "target",
                   "verdict"):
        table.add_column(column, justify="left" if column in ("what", "verdict") else "right")
    for row in report.rows:
        table.add_row(row.what, f"{row.baseline_ms:.2f}", f"{row.full_ms:.2f}",
                      f"{row.ratio:.2f}x",
                      f"{min(row.round_ratios):.2f}-{max(row.round_ratios):.2f}",
                      f"<= {FLAT_TARGET:g}x", "[green]met[/]" if row.met else "[red]missed[/]")
    console.print(table)
    plans = Table(title="Plans at size (EXPLAIN ANALYZE, BUFFERS): every statement of the work "
                        "above", title_justify="left")
    for column in ("work", "statement", "reads (indexes, or Seq Scan)", "buffers base / size",
                   "verdict"):
        plans.add_column(column)
    for c in report.plans:
        base = report.baseline_buffers.get(c.statement)
        flat = ("" if reads_flat(base, c.buffers)
                else f"; [yellow]reads grow: +{c.buffers - (base or 0)} buffers[/]")
        plans.add_row(c.label, describe(c.statement), _reads(c),
                      f"{'-' if base is None else base} / {c.buffers}",
                      ("[green]no seq scan[/]" if c.ok else
                       f"[red]{', '.join(c.seq_scans)}[/]") + flat)
    console.print(plans)
    verdict = ("[green]index scan, no sequential scan of the big tables[/]" if report.plans_ok
               else "[red]a big table is read whole: "
               + "; ".join(f"{c.label}: {', '.join(c.seq_scans)}"
                           for c in report.plans if not c.ok) + "[/]")
    console.print(f"Plans at size: {verdict}")


def report_json(report: LedgerSizeReport) -> str:
    document = asdict(report)
    document["seed"]["big_table_rows"] = report.seed.big_table_rows
    document["plans_ok"] = report.plans_ok
    for row, data in zip(report.rows, document["rows"], strict=True):
        data["met"] = row.met
    return json.dumps(document, indent=2, default=str)
