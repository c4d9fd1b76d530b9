"""New Capillary credentials end a pause at once: the circuit is due for its probe and the
entities waiting it out are due, unless an operator holds the pause or a probe is out."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from coupon_devtools.fakes.ledger_state import FakeEntity
from tests.unit.conftest import World
from worker.adapters.postgres.circuit import Permit
from worker.adapters.postgres.records import CircuitState
from worker.domain.model import EntityState, Verdict
from worker.entrypoints.celery.sweeper import _probe_on_new_credentials


def _paused(world: World, *, reason: str = "http_401: Invalid username or password",
            state: str = "open") -> None:
    """The circuit opened by a 401 ten minutes long, and an entity waiting it out."""
    until = world.clock.now + timedelta(minutes=10)
    world.state.circuits["capillary"] = CircuitState(state, 1, 1, until, reason)
    world.state.events["e-1"] = {"event_id": "e-1"}
    world.state.entities[1] = FakeEntity(
        id=1, event_id="e-1", series_id=544770, customer_key="id:1",
        state=EntityState.RETRY_WAIT, last_verdict=Verdict.OUTAGE.value,
        last_error_code="http_401", next_attempt_at=until)


def _credentials(world: World, version: int) -> None:
    world.deps = replace(world.deps, credentials=lambda: (version,))


def test_rotated_credentials_make_the_probe_and_the_waiting_entities_due_now(
        world: World) -> None:
    _paused(world)
    _credentials(world, 0)
    # The sweeper's first look only remembers the versions
    seen = _probe_on_new_credentials(world.deps, None)
    assert seen == (0,)
    assert world.state.circuits["capillary"].open_until > world.clock.now
    # When the key file changes
    _credentials(world, 1)
    seen = _probe_on_new_credentials(world.deps, seen)
    # Then the pause is over now (the next permit is the probe) and the entity is due
    assert seen == (1,)
    circuit = world.state.circuits["capillary"]
    assert circuit.state == "open" and circuit.open_until == world.clock.now
    assert world.state.entities[1].next_attempt_at == world.clock.now
    assert world.deps.circuit.permit().probe  # type: ignore[union-attr]


def test_an_operators_pause_is_left_to_the_operator(world: World) -> None:
    _paused(world, reason="opened by ops: Capillary asked us to stop")
    assert world.deps.circuit.probe_now("credentials changed")
    assert world.state.circuits["capillary"].open_until > world.clock.now
    assert world.state.entities[1].next_attempt_at > world.clock.now


def test_while_a_probe_is_out_the_change_is_kept_for_after_its_answer(world: World) -> None:
    # Given a probe already out (with the credentials of before)
    _paused(world, state="half_open")
    _credentials(world, 1)
    # When the files change, nothing moves yet and the change is not forgotten
    assert _probe_on_new_credentials(world.deps, (0,)) == (0,)
    assert world.state.circuits["capillary"].state == "half_open"
    # Once the probe failed and re-opened the circuit, the next sweep makes it due
    world.state.circuits["capillary"] = replace(world.state.circuits["capillary"],
                                                state="open")
    assert _probe_on_new_credentials(world.deps, (0,)) == (1,)
    assert world.state.circuits["capillary"].open_until == world.clock.now


def test_a_closed_circuit_has_nothing_to_do(world: World) -> None:
    assert world.deps.circuit.probe_now("credentials changed")
    assert "capillary" not in world.state.circuits


def test_a_probes_success_makes_the_entities_that_lost_the_race_for_it_due(
        world: World) -> None:
    # Given a probe out, and an entity deferred until the probe's deadline
    _paused(world, state="half_open")
    # When the probe's call succeeds
    world.deps.circuit.success(Permit(probe=True))
    # Then the circuit is closed and the entity due now, not at the probe's deadline
    assert world.state.circuits["capillary"].state == "closed"
    assert world.state.entities[1].next_attempt_at == world.clock.now
