"""The console on a real ledger: users of each role, an app wired to this test's database."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from coupon_devtools.fakes.broker import FakePublisher
from worker.adapters.postgres.records import Transition
from worker.adapters.postgres.unit_of_work import sql_unit_of_work_factory
from worker.config import Settings
from worker.domain.events import parse_event_data
from worker.domain.model import EntityState
from worker.entrypoints.console.app import create_app
from worker.entrypoints.console.auth import hash_password
from worker.entrypoints.console.config import ConsoleSettings, load_console_settings
from worker.usecases.issue import utcnow
from worker.usecases.support import SupportDeps

PASSWORDS = {"vera": "viewer-pass-1", "otto": "operator-pass-1", "ada": "admin-pass-1"}
ROLES = {"vera": "viewer", "otto": "operator", "ada": "admin"}


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("console") / "users.json"
    path.write_text(json.dumps({"users": [
        {"name": n, "role": ROLES[n], "password_hash": hash_password(p)}
        for n, p in PASSWORDS.items()]}))
    return path


@pytest.fixture
def console_settings(users_file: Path) -> Callable[..., ConsoleSettings]:
    def make(**overrides: object) -> ConsoleSettings:
        values: dict[str, object] = {"secret": "console-test-secret-0123456789abcdefghij",
                                     "users": str(users_file),
                                     "flower_url": "http://flower.test"}
        values.update(overrides)
        return load_console_settings(**values)

    return make


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def make_client(settings: Settings, clean_ledger: Engine, publisher: FakePublisher,
                console_settings: Callable[..., ConsoleSettings]) -> Callable[..., TestClient]:
    def make(client_address: str = "testclient", **overrides: object) -> TestClient:
        """A client of a console with ``overrides`` for its settings, whose requests come from
        ``client_address`` (the peer the console sees)."""
        support = SupportDeps(uow=sql_unit_of_work_factory(clean_ledger), publisher=publisher,
                              clock=utcnow)
        app = create_app(settings, console_settings(**overrides), engine=clean_ledger,
                         support=support, submitter=publisher)
        return TestClient(app, follow_redirects=False, client=(client_address, 50000))

    return make


CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def login(client: TestClient, name: str) -> str:
    """Log ``name`` in; the session's CSRF token."""
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"username": name, "password": PASSWORDS[name],
                                           "csrf_token": token})
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/").text)


def seed_dead(engine: Engine, event_id: str, customer: str, series: list[int],
              code: str = "712", message: str = "series expired",
              worker: str = "w") -> list[int]:
    """An event whose entities are all dead with ``code``."""
    uow = sql_unit_of_work_factory(engine)
    now = datetime.now(UTC)
    with uow() as u:
        u.ledger.ingest(parse_event_data({"eventId": event_id, "customer": {"id": customer},
                                          "seriesIds": series}), source="bus", now=now)
        claim = u.ledger.claim_event(event_id, token="t", worker=worker, now=now,
                                     lease_s=60, settle_window_s=120)
        u.ledger.record(claim, calls=[], worker=worker, now=now, transitions=[
            Transition(e.entity_id, EntityState.DEAD, "dead", 1, error_code=code,
                       error_message=message, dead_reason=message,
                       next_attempt_at=now + timedelta(hours=1))
            for e in claim.entities])
        u.commit()
    return [e.entity_id for e in claim.entities]


IDS = re.compile(r'name="ids" id="confirm-ids" value="([^"]*)"')


def planned_ids(html: str) -> str:
    """The ids a dry run page's confirmation form carries."""
    found = IDS.search(html)
    assert found, "no confirmation form with ids on the page"
    return found.group(1)


def seed_waiting(engine: Engine, event_id: str, customer: str, series: list[int], *,
                 in_s: float = 3600, unknown: bool = False, code: str = "read_timeout",
                 message: str = "no answer within 10 s") -> list[int]:
    """An event whose entities wait (``retry_wait``) for an attempt ``in_s`` from now: a retry,
    or with ``unknown`` an unknown outcome settling."""
    uow = sql_unit_of_work_factory(engine)
    now = datetime.now(UTC)
    with uow() as u:
        u.ledger.ingest(parse_event_data({"eventId": event_id, "customer": {"id": customer},
                                          "seriesIds": series}), source="bus", now=now)
        claim = u.ledger.claim_event(event_id, token="t", worker="w", now=now,
                                     lease_s=60, settle_window_s=120)
        u.ledger.record(claim, calls=[], worker="w", now=now, transitions=[
            Transition(e.entity_id, EntityState.RETRY_WAIT, "retry_scheduled", 1,
                       next_attempt_at=now + timedelta(seconds=in_s), needs_reconcile=unknown,
                       verdict="ambiguous" if unknown else "retryable", error_code=code,
                       error_message=message, settle_window_s=120 if unknown else None)
            for e in claim.entities])
        u.commit()
    return [e.entity_id for e in claim.entities]
