"""The tests that stop and start PostgreSQL or RabbitMQ, on a cluster and a node of their own.

The session's first such test creates a PostgreSQL cluster and starts a RabbitMQ node, each on
free ports (``coupon_devtools.harness.private``); they are removed when the session ends. These
tests' ledger and vhost live there, so a restart never pulls a service from under another
test, and they run in the parallel run like the others. The restart and reconnect tests share
one test process, and the chaos run, the longest, has one of its own (``SHARED_PROCESS`` in
``tests/conftest.py``): a cluster and a node serve each process that runs any of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, create_engine

from coupon_devtools.harness.databases import create_migrated
from coupon_devtools.harness.private import PrivatePostgres, PrivateRabbit

LEDGER_DATABASE = "ledger"


@dataclass(frozen=True)
class PrivateServices:
    postgres: PrivatePostgres
    rabbit: PrivateRabbit


@pytest.fixture(scope="session")
def private_services(session_tag: str,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServices]:
    # The node boots (seconds of Erlang start-up) while the cluster is created.
    rabbit = PrivateRabbit.start(tmp_path_factory.mktemp("rabbitmq"), session_tag)
    try:
        postgres = PrivatePostgres.create(session_tag)
        try:
            rabbit.wait_started()
            yield PrivateServices(postgres, rabbit)
        finally:
            postgres.remove()
    finally:
        rabbit.stop()


@pytest.fixture(scope="session")
def database_url(private_services: PrivateServices) -> str:
    """The ledger on the private cluster (removed with it)."""
    url = private_services.postgres.admin_url.rsplit("/", 1)[0] + f"/{LEDGER_DATABASE}"
    create_migrated(url)
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(database_url, pool_size=5, pool_pre_ping=True)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def broker_url(private_services: PrivateServices) -> str:
    """The private node's default vhost, ``/``."""
    return private_services.rabbit.url("/")


@pytest.fixture
def rabbit_node(private_services: PrivateServices) -> str:
    return private_services.rabbit.node
