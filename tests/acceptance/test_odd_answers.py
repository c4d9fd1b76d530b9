"""Answers Capillary may give that the ledger cannot store as they are."""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from sqlalchemy import Engine, text

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import WorkerProcess
from worker.config import Settings


def issue_one(settings: Settings, clean_ledger: Engine,
              start_worker: Callable[..., WorkerProcess], event_id: str, series: int,
              state: str) -> None:
    """Start a worker, publish one event for ``series`` and wait for it to reach ``state``."""
    start_worker(settings)
    publish(settings, example_event(event_id, series=(series,)))
    wait_for_state(clean_ledger, event_id, state)


def test_a_coupon_whose_text_postgresql_refuses_is_recorded_escaped(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a series whose coupons carry a NUL and a lone surrogate in their text (typed in
    # by whoever set the campaign up; PostgreSQL stores neither, in text or in jsonb)
    sandbox.set_series(544770, description="Gold\x00tier \ud800", discountCode="G\x00LD")
    # When an event asks for it, the coupon is recorded, its text escaped
    issue_one(settings, clean_ledger, start_worker, "odd-text", 544770, "completed")
    with clean_ledger.connect() as conn:
        row = conn.execute(text(
            "SELECT description, discount_code, raw->>'description' FROM coupons "
            "WHERE event_id = 'odd-text'")).one()
        rejected = conn.execute(text("SELECT count(*) FROM rejected_events")).scalar()
    assert rejected == 0
    assert row == ("Gold\\x00tier \\ud800", "G\\x00LD", "Gold\\x00tier \\ud800")
    assert sandbox.stats()["calls"]["bulk"] == 1


def test_an_error_message_postgresql_refuses_is_recorded_escaped(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a series Capillary refuses, its message holding a NUL
    sandbox.set_series(707001, behaviour="error", errorCode=707,
                       errorMessage="Invalid\x00series \udfff")
    # Then the refusal is recorded (dead, as any 707), the message escaped
    issue_one(settings, clean_ledger, start_worker, "odd-error", 707001, "failed")
    with clean_ledger.connect() as conn:
        message = conn.execute(text(
            "SELECT last_error_message FROM entities WHERE event_id = 'odd-error'")).scalar()
    assert message == "Invalid\\x00series \\udfff"


def test_a_coupon_with_numbers_past_the_ledgers_columns_is_recorded_without_them(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a Capillary whose answer carries an id past 2^63, a series id past 2^31, a value
    # of 1e400 and NaN (Python reads the last two as infinite and not-a-number)
    sandbox.add_fault(kind="odd_numbers_after", times=1)
    # Then the coupon is recorded: those columns empty or the series asked for, the raw
    # answer keeping what it said
    issue_one(settings, clean_ledger, start_worker, "odd-numbers", 544770, "completed")
    with clean_ledger.connect() as conn:
        row = conn.execute(text(
            "SELECT capillary_coupon_id, series_id, discount_value, discount_upto, "
            "raw->>'discountValue', raw->>'discountUpto', raw->>'id' FROM coupons "
            "WHERE event_id = 'odd-numbers'")).one()
    assert row == (None, 544770, None, None, "1e400", "NaN", "92233720368547758070")
    assert sandbox.stats()["calls"]["bulk"] == 1


def test_a_refusal_with_a_message_too_long_to_index_is_recorded_cut(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given a refusal whose message is a page of text that does not compress (a gateway's)
    message = "".join(random.Random(7).choices(string.ascii_letters, k=20_000))
    sandbox.set_series(707001, behaviour="error", errorCode=707, errorMessage=message)
    # Then the entity is dead as any 707, its message cut to what the ledger indexes
    issue_one(settings, clean_ledger, start_worker, "long-error", 707001, "failed")
    with clean_ledger.connect() as conn:
        stored = conn.execute(text(
            "SELECT last_error_message FROM entities WHERE event_id = 'long-error'")).scalar()
    assert stored == message[:499] + "…"
