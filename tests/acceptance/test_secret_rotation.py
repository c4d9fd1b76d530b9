"""A rotated Capillary key file ends an outage with no restart (docs/secrets.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, text

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import (
    circuit,
    example_event,
    publish,
    queue_ready,
    wait_for_circuit_opened,
    wait_for_consumers,
    wait_for_state,
)
from tests.conftest import SANDBOX_PASSWORD, WorkerProcess, wait_until
from worker.config import Settings


def _rewrite(path: Path, text: str) -> None:
    # As Docker or Kubernetes update a secret: a whole new file moved into place.
    staged = path.with_name(path.name + ".new")
    staged.write_text(text, encoding="utf-8")
    staged.replace(path)


def _deferred(engine: Engine, event_id: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM entity_history h JOIN entities e ON e.id = h.entity_id "
            "WHERE e.event_id = :e AND h.kind = 'deferred'"), {"e": event_id}).scalar())


def test_writing_the_right_key_into_the_file_resumes_issuance_within_seconds(
    settings_factory: Callable[..., Settings], clean_ledger: Engine, sandbox: SandboxAdmin,
    start_worker: Callable[..., WorkerProcess], tmp_path: Path,
) -> None:
    # Given a worker whose Capillary password is a file holding a wrong one, and a pause long
    # enough (ten minutes) that only the rotation can end it within the test
    key_file = tmp_path / "capillary-password"
    key_file.write_text("wrong-password\n", encoding="utf-8")
    settings = settings_factory(circuit_open_s=600.0)
    start_worker(settings, env={"CAPILLARY_PASSWORD": None,
                                "CAPILLARY_PASSWORD_FILE": str(key_file)})
    publish(settings, example_event("rotation-1", series=(544770,), customer="566885001"))
    wait_for_circuit_opened(clean_ledger)
    wait_until(lambda: _deferred(clean_ledger, "rotation-1"), message="rotation-1 deferred")
    wait_for_consumers(settings, settings.tasks_queue, lambda n: n == 0,
                       what="fresh events to stop being consumed")
    # Events keep arriving and wait in RabbitMQ while the circuit is open
    publish(settings, example_event("rotation-2", series=(553379,), customer="566885002"))
    wait_until(lambda: queue_ready(settings, settings.events_queue) == 1,
               message="rotation-2 to wait on the bus")
    assert circuit(clean_ledger)[0] == "open"
    assert sandbox.ledger() == []

    # When the right key is written into the file, with no restart
    rotated_at = time.monotonic()
    _rewrite(key_file, SANDBOX_PASSWORD + "\n")

    # Then issuance resumes within seconds, and each entity has exactly one coupon
    wait_for_state(clean_ledger, "rotation-1", "completed", timeout_s=20)
    wait_for_state(clean_ledger, "rotation-2", "completed", timeout_s=20)
    resumed_s = time.monotonic() - rotated_at
    assert resumed_s < 15, f"issuance resumed {resumed_s:.1f} s after the rotation"
    assert circuit(clean_ledger)[0] == "closed"
    issued = sandbox.ledger()
    assert sorted((c["customerId"], c["seriesId"]) for c in issued) == [
        ("566885001", 544770), ("566885002", 553379)], issued
