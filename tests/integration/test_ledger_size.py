"""The ledger-size bench, small: seeding, the measurement and the plan checker, end to end, so
that the 2,000,000-entity run (``coupon-worker bench --scenario ledger-size``) cannot rot."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from coupon_devtools.bench import ledger_size
from coupon_devtools.bench.ledger_seed import BIG_TABLES, seed
from coupon_devtools.bench.plans import capture, check_all, explain
from coupon_devtools.harness.databases import drop_database, recreate_migrated
from tests.conftest import PG_ADMIN_URL

ROWS = 5_000


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _index_definitions(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'")).scalars())


@pytest.fixture(scope="module")
def seeded() -> Iterator[tuple[Engine, Engine]]:
    """A migrated ledger seeded with ``ROWS`` entities, and a migrated empty one."""
    names = [f"cw_test_ledger_size_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    urls = [PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}" for name in names]
    for url in urls:
        recreate_migrated(url)
    seed(_libpq(urls[0]), ROWS, say=lambda _m: None)
    engines = [create_engine(url) for url in urls]
    yield engines[0], engines[1]
    for engine, name in zip(engines, names, strict=True):
        engine.dispose()
        drop_database(PG_ADMIN_URL, name)


def test_the_seeded_ledger_has_a_year_of_realistic_shapes(seeded: tuple[Engine, Engine],
                                                          ) -> None:
    full, _ = seeded
    with full.connect() as conn:
        states: dict[str, int] = dict(conn.execute(text(
            "SELECT state, count(*) FROM entities GROUP BY state")).all())
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                  for t in BIG_TABLES}
        customers = conn.execute(text(
            "SELECT count(DISTINCT customer_key) FROM events")).scalar_one()
        days = conn.execute(text(
            "SELECT extract(day FROM max(received_at) - min(received_at)) FROM events"),
        ).scalar_one()
        unknown = conn.execute(text(
            "SELECT count(*) FROM entities WHERE state = 'retry_wait' AND needs_reconcile"),
        ).scalar_one()
        orphans = conn.execute(text(
            "SELECT count(*) FROM coupons c LEFT JOIN entities e ON e.id = c.entity_id "
            "WHERE e.id IS NULL")).scalar_one()
    assert counts["entities"] == ROWS
    assert 0.02 * ROWS < states["dead"] < 0.04 * ROWS
    assert states["retry_wait"] > 0 and unknown > 0 and states["discarded"] > 0
    assert states["issued"] > 0.9 * ROWS
    assert counts["coupons"] >= states["issued"]
    assert counts["entity_history"] > 2 * ROWS and counts["api_calls"] >= counts["events"]
    assert customers > counts["events"] / 10
    assert days > 350
    assert orphans == 0
    # The loader rebuilt every index from its own definition: the schema is the migrations'.
    assert _index_definitions(full) == _index_definitions(seeded[1])


def test_the_measurement_runs_end_to_end_with_one_verdict_per_row(session_tag: str) -> None:
    say: list[str] = []
    report = ledger_size.run_ledger_size(
        rows=ROWS, rounds=2, say=say.append, admin_url=PG_ADMIN_URL,
        namespace=f"t{session_tag}", hot_events=3, repeats=2)
    what = [row.what for row in report.rows]
    assert what == ["hot path: claim + outcome, p50", "hot path: claim + outcome, p99",
                    "sweeper cycle", "dlq list", "search by customer", "search by code",
                    "search by request id", "search by event id", "dead-letter groups"]
    for row in report.rows:
        assert row.baseline_ms > 0 and row.full_ms > 0 and math.isfinite(row.ratio)
        assert len(row.round_ratios) == 2
        assert row.met == (row.ratio <= ledger_size.FLAT_TARGET)
    described = {ledger_size.describe(p.statement) for p in report.plans}
    assert {"hot_path.TAKE_IN (claim)", "hot_path.RECORD (outcome)"} <= described
    assert {p.label for p in report.plans} >= {"hot path", "sweeper cycle", "dlq list",
                                               "search by customer", "dead-letter groups"}
    assert report.seed.rows["entities"] == ROWS
    # Both databases of the run are gone.
    with create_engine(PG_ADMIN_URL).connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM pg_database WHERE datname LIKE :n"),
                            {"n": f"%_t{session_tag}"}).scalar_one()
    assert left == 0


def test_the_plan_checker_flags_a_big_table_read_whole_until_it_has_its_index(
        engine: Engine) -> None:
    # Given a scratch table of its own, large enough that a search must not read it whole
    schema = f"scratch_{uuid.uuid4().hex[:8]}"
    table = f"{schema}.big"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"CREATE TABLE {table} (id bigint, code text)"))
        conn.execute(text(f"INSERT INTO {table} SELECT n, 'C' || n "
                          "FROM generate_series(1, 50000) AS n"))
    try:
        def checked() -> list[str]:
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                    text(f"ANALYZE {table}"))
            with capture(engine) as seen:
                seen.label = "search"
                with engine.connect() as conn:
                    conn.execute(text(f"SELECT id FROM {table} WHERE code = :c"),
                                 {"c": "C4242"})
            [check] = check_all(seen.statements, explain(engine, seen.statements), ("big",))
            return list(check.seq_scans) if not check.ok else ["ok: " + ", ".join(check.scans)]

        # When the column has no index, Then the checker says the table is read whole
        assert checked() == ["Seq Scan on big"]
        # When it has one, Then the plan passes, through that index
        with engine.begin() as conn:
            conn.execute(text(f"CREATE INDEX ix_big_code ON {table} (code)"))
        result = checked()
        assert result[0].startswith("ok: ") and "ix_big_code" in result[0], result
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def test_the_bench_command_runs_the_scenario_and_prints_its_verdicts_as_json(
        session_tag: str) -> None:
    from click.testing import CliRunner

    from coupon_devtools.bench.command import bench_command

    result = CliRunner().invoke(bench_command(), [
        "--scenario", "ledger-size", "--ledger-rows", "300", "--rounds", "1", "--json",
        "--namespace", f"c{session_tag}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["seed"]["entities"] == 300 and report["baseline_rows"] == 5000
    assert report["seed"]["big_table_rows"] == sum(report["seed"]["rows"].values()) > 300
    assert len(report["rows"]) == 9 and all("met" in row for row in report["rows"])
    assert isinstance(report["plans_ok"], bool) and report["plans"]


def test_seeding_says_when_vacuum_cannot_make_the_rows_visible_to_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    from coupon_devtools.bench import ledger_seed

    monkeypatch.setattr(ledger_seed, "VACUUM_PAUSE_S", 0.1)
    name = f"cw_test_ledger_vm_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    recreate_migrated(url)
    said: list[str] = []
    try:
        # Given a transaction that holds a snapshot taken before the rows are copied
        with psycopg.connect(_libpq(url)) as other:
            other.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            other.execute("SELECT txid_current()")
            # When the ledger is seeded, Then VACUUM cannot mark its rows visible to all,
            # and the seeding says so, tries again, and reports the share it reached
            report = seed(_libpq(url), 2_000, say=said.append)
            other.rollback()
        assert report.all_visible < ledger_seed.ALL_VISIBLE_TARGET
        assert sum("all-visible after VACUUM" in m for m in said) == \
            ledger_seed.VACUUM_TRIES - 1
    finally:
        drop_database(PG_ADMIN_URL, name)


def test_the_dead_letter_groups_are_read_from_their_summary_not_the_entities(
        seeded: tuple[Engine, Engine]) -> None:
    from worker.usecases import queries

    full, _ = seeded
    with capture(full) as seen:
        seen.label = "dead-letter groups"
        groups = queries.dead_letter_groups(full)
    [check] = check_all(seen.statements, explain(full, seen.statements), BIG_TABLES)
    # One statement, on the summary alone: no big table, not even through an index
    assert check.ok and all("dead_letter_groups" in scan for scan in check.scans), check
    with full.connect() as conn:
        dead = conn.execute(text("SELECT count(*) FROM entities WHERE state = 'dead'")).scalar()
    # The seeder counted them (its COPY runs without triggers), as 0017's backfill does
    assert sum(g["count"] for g in groups) == dead
