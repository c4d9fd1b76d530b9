"""Real workers whose ledger connections go through PgBouncer in transaction pooling mode
(docs/pooler.md): every entity issued exactly once, and nothing refused on the way."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from sqlalchemy import Engine, text

from coupon_devtools.harness.pgbouncer import PgBouncer
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_every_delivery
from tests.conftest import WorkerProcess, wait_until
from worker.config import Settings

EVENTS = 60
SERIES = (544770, 553379)


def _customer(n: int) -> str:
    return str(566_100_000 + n)


def _states(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {str(state): int(n) for state, n in conn.execute(text(
            "SELECT state, count(*) FROM events GROUP BY state"))}


def test_workers_behind_pgbouncer_issue_every_entity_exactly_once(
    pooled_settings_factory: Callable[..., Settings], pgbouncer: PgBouncer,
    clean_ledger: Engine, sandbox: SandboxAdmin, start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given two workers (two pool processes each, and a sweeper) whose ledger is reached
    # through a PgBouncer in transaction mode with two server connections to share
    settings = pooled_settings_factory()
    logged_before = len(pgbouncer.log())  # (the session's PgBouncer: other tests log there)
    workers = [start_worker(settings), start_worker(settings)]
    # And a Capillary that refuses some calls (retried), and issues then fails others
    # (unknown outcomes: read back after the settle window), so that retries, the sweeper and
    # reconciliation run through the pooler too
    sandbox.add_fault(customer=_customer(0), kind="error_before", status=503, times=2)
    sandbox.add_fault(customer=_customer(1), kind="error_after")
    sandbox.add_fault(customer=_customer(2), kind="reset_after")
    # When events for two series each are published
    events = [example_event(f"pooled-{n}", series=SERIES, customer=_customer(n))
              for n in range(EVENTS)]
    publish(settings, *events)
    # Then every event completes
    wait_until(lambda: _states(clean_ledger).get("completed") == EVENTS, timeout_s=90,
               interval_s=0.5, message=f"{EVENTS} events completed")
    wait_for_every_delivery(settings)
    # And Capillary issued each (customer, series) exactly once
    issued = Counter((str(c["customer"]), c["seriesId"]) for c in sandbox.ledger())
    assert len(issued) == EVENTS * len(SERIES) and set(issued.values()) == {1}
    with clean_ledger.connect() as conn:
        # And the ledger holds one coupon per entity, and nothing was recorded as rejected
        assert conn.scalar(text("SELECT count(*) FROM coupons")) == EVENTS * len(SERIES)
        assert conn.scalar(text("SELECT count(*) FROM rejected_events")) == 0
        assert conn.scalar(text("SELECT count(*) FROM entities WHERE state <> 'issued'")) == 0
        assert conn.scalar(text("SELECT count(*) FROM coupons "
                                "WHERE recorded_via = 'reconcile'")) >= 2
    for worker in workers:
        assert worker.process.poll() is None
        assert "prepared statement" not in worker.log(), worker.log_tail()
        assert "schema_unchecked" not in worker.log(), worker.log_tail()
    assert "unsupported startup parameter" not in pgbouncer.log()[logged_before:]


def test_a_worker_refused_by_the_pooler_says_which_setting_to_change(
    pooled_settings_factory: Callable[..., Settings],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a worker configured for a direct connection, its ledger behind PgBouncer
    settings = pooled_settings_factory(db_pooler="none")
    worker = start_worker(settings, wait_ready=False)
    # Then it does not start consuming events it could never record: it exits, saying why
    code = worker.process.wait(timeout=60)
    assert code != 0, worker.log_tail()
    assert "COUPONS_DB_POOLER=transaction" in worker.log(), worker.log_tail()
    assert "worker.pooler_mismatch" in worker.log()
