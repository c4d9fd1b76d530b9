"""The doctor's checks, one finding at a time, from facts given here (no service asked)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.config import Settings, load_settings
from worker.entrypoints.cli.doctor import (
    ConnectionBudget,
    DatabaseFacts,
    Facts,
    check_connections,
    check_pool,
    check_pooler,
    check_privileges,
    check_quorum,
    check_quota,
    examine,
    has_problems,
    pooler_setting,
)

DIRECT = "postgresql+psycopg://coupon_worker@db:5432/coupon_worker"


def facts(settings: Settings | None = None, **values: Any) -> Facts:
    values.setdefault("workers", 2)
    values.setdefault("concurrency", 4)
    values.setdefault("pooler_setting", None)
    return Facts(settings=settings or load_settings(database_url=DIRECT), **values)


def server(max_connections: int = 100, *, port: int | None = 5432,
           superuser: bool = False) -> DatabaseFacts:
    return DatabaseFacts(max_connections=max_connections, reserved_connections=3,
                         server_port=port, superuser=superuser)


def test_the_budget_counts_every_process_and_its_overflow() -> None:
    # Given 3 workers of 4 pool processes each, pools of 5 (overflow 5 more)
    budget = ConnectionBudget(workers=3, concurrency=4, pool_size=5)
    # Then 15 processes (4 children and a main process each) hold up to 10 each, the console
    # 10, a tool 2; typically a connection per process, the console's pool and the tool
    assert budget.processes == 15
    assert budget.worst_case == 16 * 10 + 2
    assert budget.typical == 15 + 5 + 1
    # and the largest pool that fits in 87 connections is 2 (16 x 2 x 2 + 2 = 66)
    assert budget.largest_pool_size(87) == 2
    assert budget.largest_pool_size(30) == 0


def test_a_fleet_beyond_max_connections_is_a_problem_that_says_what_to_change() -> None:
    found = check_connections(facts(workers=4, database=server(100)))
    assert [f.severity for f in found] == ["problem"]
    # 4 x 5 processes + the console = 21 processes: pools of 2 fit in 87 (21 x 4 + 2 = 86)
    assert "COUPONS_DB_POOL_SIZE=2" in found[0].change
    assert "max_connections to at least 225" in found[0].change
    assert "COUPONS_DB_POOLER=transaction" in found[0].change


def test_a_fleet_that_fits_is_fine_and_one_near_the_limit_is_warned() -> None:
    small = load_settings(database_url=DIRECT, db_pool_size=1)
    assert check_connections(facts(small, workers=2, database=server(100)))[0].severity == "ok"
    # (2 x 6 + 1) processes x 2 x 3 + 2 = 80 of 87: more than 80 %
    near = load_settings(database_url=DIRECT, db_pool_size=3)
    warned = check_connections(facts(near, workers=2, concurrency=5, database=server(100)))
    assert warned[0].severity == "warning" and "COUPONS_DB_POOL_SIZE=" in warned[0].change


def test_an_unknown_max_connections_is_a_warning_not_a_guess() -> None:
    found = check_connections(facts(database=None, database_error="refused"))
    assert found[0].severity == "warning" and "refused" in found[0].message
    assert "--max-connections" in found[0].change


def test_a_pooler_without_the_transaction_setting_is_a_problem() -> None:
    # Given the server answering on 5432 while the URL says 6543: something sits in between
    pooled = load_settings(database_url="postgresql+psycopg://u@db:6543/coupon_worker")
    found = check_pooler(facts(pooled, database=server(port=5432)))
    assert found[0].severity == "problem"
    assert found[0].change.startswith("set COUPONS_DB_POOLER=transaction")
    assert check_pooler(facts(pooled, database=server(port=5432),
                              pooler_setting="transaction"))[0].severity == "ok"
    # and behind a pooler the server's max_connections does not bound the fleet
    assert check_connections(facts(pooled, workers=50, database=server(port=5432),
                                   pooler_setting="transaction"))[0].severity == "ok"


def test_a_pooler_is_recognised_by_its_port_when_the_server_is_not_asked() -> None:
    pooled = load_settings(database_url="postgresql+psycopg://u@pgbouncer:6432/coupon_worker")
    assert check_pooler(facts(pooled))[0].severity == "problem"
    assert check_pooler(facts(database=None))[0].severity == "ok"


def test_the_pooler_setting_is_read_from_the_settings() -> None:
    assert pooler_setting(load_settings(db_pooler="transaction")) == "transaction"
    assert pooler_setting(load_settings()) == "none"
    pooled = load_settings(database_url="postgresql+psycopg://u@pgbouncer:6432/coupon_worker")
    # "none" is as good as unset: behind a pooler it is a problem
    assert check_pooler(facts(pooled, pooler_setting="none"))[0].severity == "problem"


@pytest.mark.parametrize("nodes, severity", [(1, "problem"), (2, "warning"), (3, "ok"),
                                             (None, "warning")])
def test_quorum_queues_need_a_cluster(nodes: int | None, severity: str) -> None:
    quorum = load_settings(database_url=DIRECT, queue_type="quorum")
    found = check_quorum(facts(quorum, broker_nodes=nodes, broker_error="no API"))
    assert found[0].severity == severity
    if nodes == 1:
        assert "COUPONS_QUEUE_TYPE=classic" in found[0].change


def test_classic_queues_on_a_cluster_are_warned() -> None:
    assert check_quorum(facts(broker_nodes=3))[0].severity == "warning"
    assert check_quorum(facts(broker_nodes=1))[0].severity == "ok"


def test_superusers_guests_and_plain_http_are_warned() -> None:
    risky = load_settings(database_url=DIRECT, broker_url="amqp://guest:guest@mq:5672//",
                          capillary_base_url="http://capillary.internal",
                          capillary_allow_insecure_http=True)
    found = check_privileges(facts(risky, database=server(superuser=True)))
    assert [f.severity for f in found] == ["warning"] * 3
    assert "db roles" in found[0].change and "broker users" in found[1].change
    assert check_privileges(facts(database=server()))[0].severity == "ok"


def test_a_fleet_too_small_for_its_quota_is_warned() -> None:
    # 6000 calls a minute at 0.5 s each keep 50 calls in flight: 2 x 4 slots are not enough
    quota = load_settings(database_url=DIRECT, rate_limit_per_minute=6000)
    found = check_quota(facts(quota, call_latency_s=0.5))
    assert found[0].severity == "warning" and "at least 13 workers" in found[0].change
    assert check_quota(facts(quota, workers=13, call_latency_s=0.5))[0].severity == "ok"


def test_only_problems_fail_the_doctor() -> None:
    assert not has_problems(examine(facts(database=server(1000))))
    assert has_problems(examine(facts(workers=40, database=server(100))))


def test_a_threads_worker_is_one_process_whose_threads_share_its_pool() -> None:
    # Given 3 threads workers of 64 threads each, pools of 5 (5 more at a peak, then kept)
    budget = ConnectionBudget(workers=3, concurrency=64, pool_size=5, pool="threads")
    # Then 3 processes hold up to 10 each, whatever the thread count; the console 10, a tool 2
    assert budget.processes == 3
    assert budget.worst_case == 4 * 10 + 2
    assert budget.typical == 3 * 10 + 5 + 1
    # where prefork x 64 would be 195 processes
    assert ConnectionBudget(workers=3, concurrency=64, pool_size=5).processes == 195
    # And the doctor counts it that way against max_connections
    found = check_connections(facts(workers=3, concurrency=64, pool="threads",
                                    database=server(100)))
    assert found[0].severity == "ok" and "3 threads worker(s) x 1 process" in found[0].message
    assert check_connections(facts(workers=3, concurrency=64,
                                   database=server(100)))[0].severity == "problem"


def test_the_pool_is_chosen_by_capillarys_latency() -> None:
    # Prefork for hundreds of milliseconds and 64 calls in flight: threads advised
    slow = check_pool(facts(concurrency=64, call_latency_s=0.3))
    assert slow[0].severity == "warning" and "-P threads -c 64" in slow[0].change
    assert check_pool(facts(concurrency=8, call_latency_s=0.05))[0].severity == "ok"
    # Threads x 64 at 300 ms: 213 events/s, about 2 ledger connections busy of 5
    fine = check_pool(facts(concurrency=64, call_latency_s=0.3, pool="threads"))
    assert [f.severity for f in fine] == ["ok"] and "2.1 of 5" in fine[0].message
    # Threads x 64 at 50 ms asks one process for 1280 events/s: more than its core carries
    fast = check_pool(facts(concurrency=64, call_latency_s=0.05, pool="threads"))
    assert fast[0].severity == "warning" and "threads workers of" in fast[0].change
    # and a ledger pool of 1 is too small for it
    one = load_settings(database_url=DIRECT, db_pool_size=1)
    small = check_pool(facts(one, concurrency=64, call_latency_s=0.05, pool="threads"))
    assert "COUPONS_DB_POOL_SIZE=" in small[-1].change
