"""The console lets go of its database pool when it exits (``coupon-worker console``)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, text

from coupon_devtools.fakes.broker import FakePublisher
from worker.adapters.postgres.unit_of_work import make_engine, sql_unit_of_work_factory
from worker.config import Settings
from worker.entrypoints.cli.webconsole import close_console
from worker.entrypoints.console.app import create_app
from worker.entrypoints.console.config import ConsoleSettings
from worker.usecases.deps import utcnow
from worker.usecases.support import SupportDeps


def test_the_console_disposes_its_database_pool_when_it_exits(
        settings: Settings, clean_ledger: Engine,
        console_settings: Callable[..., ConsoleSettings]) -> None:
    # Given a console whose pages used the ledger
    engine = make_engine(settings.database_url, pool_size=1)
    publisher = FakePublisher()
    app = create_app(settings, console_settings(), engine=engine, submitter=publisher,
                     support=SupportDeps(uow=sql_unit_of_work_factory(engine),
                                         publisher=publisher, clock=utcnow))
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    pool = engine.pool
    assert pool.checkedin() == 1

    # When the console exits
    close_console(app)

    # Then its connections are closed
    assert pool.checkedin() == 0
