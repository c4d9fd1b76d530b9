"""Capillary as it really answers, end to end: the real worker in a subprocess, the real
broker, database and (stricter) sandbox, and the support command line."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import Engine

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import WorkerProcess, run_cli
from worker.config import Settings

ISSUED, REFUSED = 544770, 700712


def test_a_400_saying_issued_and_refused_records_the_issued_once_and_never_replays_it(
    settings: Settings, clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Given Capillary answering 400 with per-entry results: one series issued, one refused
    start_worker(settings)
    sandbox.set_series(REFUSED, behaviour="expired")
    sandbox.add_fault(kind="status_after", status=400, times=1)
    publish(settings, example_event("answered-400", series=(ISSUED, REFUSED)))
    # Then the issued series is recorded with its coupon, the refused one is dead (712)
    failed = wait_for_state(clean_ledger, "answered-400", "failed")
    states = {e["series_id"]: (e["state"], e["last_error_code"]) for e in failed["entities"]}
    assert states == {ISSUED: ("issued", None), REFUSED: ("dead", "712")}
    truth = sandbox.ledger(series=ISSUED)
    assert [c["code"] for c in failed["coupons"]] == [c["code"] for c in truth]
    assert len(truth) == 1
    # When support replays the event once the series is renewed
    sandbox.set_series(REFUSED, behaviour="valid")
    replayed = json.loads(run_cli(settings, "events", "replay", "answered-400", "--reason",
                                  "series renewed", "--json").stdout)
    assert [r["series_id"] for r in replayed["results"]] == [REFUSED]
    done = wait_for_state(clean_ledger, "answered-400", "completed")
    # Then only the refused series was sent again: the issued one holds its one coupon
    bulk = [sorted(c["seriesIds"]) for c in sandbox.calls() if c["path"] == "bulk"]
    assert bulk == [[ISSUED, REFUSED], [REFUSED]]
    assert len(sandbox.ledger(series=ISSUED)) == 1 and len(done["coupons"]) == 2
