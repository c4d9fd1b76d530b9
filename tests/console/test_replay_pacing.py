"""A replay job on a real ledger sends its entities evenly spaced at its velocity, and its
page shows the progress and the rate."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine
from starlette.testclient import TestClient

from tests.console.conftest import login, seed_dead
from worker.adapters.postgres.jobs import ReplayJobStore
from worker.adapters.postgres.records import DueEntity
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.usecases.issue import utcnow
from worker.usecases.replay_jobs import step_replay_jobs
from worker.usecases.support import SupportDeps


@dataclass
class Clock:
    """Time that moves only when the code under test sleeps."""

    now: datetime
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)


@dataclass
class TimedPublisher:
    clock: Clock
    sent: list[tuple[datetime, int]] = field(default_factory=list)

    def publish_retries(self, due: Sequence[DueEntity]) -> None:
        self.sent.extend((self.clock(), d.entity_id) for d in due)

    def publish_dead_letters(self, records: Sequence[object]) -> None: ...


def test_a_job_at_600_a_minute_sends_one_entity_every_100_ms_not_a_burst(
        clean_ledger: Engine) -> None:
    # Given a job over eight dead entities at 600 calls a minute
    ids = seed_dead(clean_ledger, "ev-pace", "51", list(range(1, 9)))
    clock = Clock(utcnow())
    store = ReplayJobStore(clean_ledger)
    job_id = store.create(created_by="otto", reason="r", selection={"states": ["dead"]},
                          plan={}, velocity_per_min=600, entity_ids=ids, now=clock())
    publisher = TimedPublisher(clock)
    deps = SupportDeps(uow=sql_unit_of_work_factory(clean_ledger), publisher=publisher,  # type: ignore[arg-type]
                       clock=clock, sleep=clock.sleep)
    # When a sweeper steps it with its one-second interval as the horizon
    assert step_replay_jobs(deps, store, horizon_s=1.0) == 8
    # Then each entity went at its own moment, 100 ms apart
    moments = [at for at, _ in publisher.sent]
    assert [entity for _, entity in publisher.sent] == ids
    gaps = {round((b - a).total_seconds(), 3) for a, b in itertools.pairwise(moments)}
    assert gaps == {0.1}
    assert store.get(job_id)["state"] == "done"  # type: ignore[index]


def test_the_job_page_shows_progress_and_rate(
        make_client: Callable[..., TestClient], clean_ledger: Engine) -> None:
    ids = seed_dead(clean_ledger, "ev-prog", "52", [1, 2, 3])
    now = utcnow()
    store = ReplayJobStore(clean_ledger)
    job_id = store.create(created_by="otto", reason="r", selection={"states": ["dead"]},
                          plan={"to_send": 3, "read_back_first": 0, "already_issued": 0},
                          velocity_per_min=60, entity_ids=ids, now=now)
    deps = SupportDeps(uow=sql_unit_of_work_factory(clean_ledger),
                       publisher=TimedPublisher(Clock(now)), clock=utcnow)  # type: ignore[arg-type]
    assert step_replay_jobs(deps, store, horizon_s=0.5) == 1  # one a second: one so far
    client = make_client()
    login(client, "vera")
    page = client.get(f"/jobs/{job_id}").text
    assert 'id="job-progress">1 / 3<' in page
    assert 'id="job-rate"' in page and "60 calls/min" in page
    assert "2 to go" in page
