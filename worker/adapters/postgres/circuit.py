"""The fleet-wide circuit breaker, kept in the ledger so every worker and host agrees.

Closed: calls go. Open: nobody calls Capillary until ``open_until``; consumers of fresh events
pause and entities are deferred without spending attempts. When the pause is over exactly one
worker wins the probe (half-open); its success closes the circuit, its failure re-opens it for
longer. Configuration errors and auth failures open it at once; transport failures and 5xx
open it after ``failure_threshold`` in a row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.adapters.postgres.circuit_store import CircuitLedger
from worker.adapters.postgres.records import CLOSED_CIRCUIT, CircuitState
from worker.adapters.postgres.unit_of_work import UnitOfWorkFactory
from worker.domain.model import Verdict
from worker.domain.policy import CircuitPolicy

log = logging.getLogger(__name__)

CAPILLARY = "capillary"


@dataclass(frozen=True)
class Permit:
    """Leave to call Capillary; ``probe`` when this call decides whether the circuit closes."""

    probe: bool = False


class CircuitGate:
    """Reads (with a short cache) and moves the circuit breaker's state."""

    def __init__(
        self,
        uow: UnitOfWorkFactory[CircuitLedger],
        policy: CircuitPolicy,
        *,
        clock: Callable[[], datetime],
        probe_timeout_s: float,
        name: str = CAPILLARY,
        cache_s: float = 1.0,
    ) -> None:
        self._uow = uow
        self._policy = policy
        self._clock = clock
        self._probe_timeout = timedelta(seconds=probe_timeout_s)
        self._name = name
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: CircuitState = CLOSED_CIRCUIT
        self._read_at = float("-inf")
        self._refreshing = False
        self._generation = 0

    @property
    def policy_open_s(self) -> float:
        """How long an outage verdict defers an entity (the circuit's base pause)."""
        return self._policy.open_s

    def state(self, *, fresh: bool = False) -> CircuitState:
        """The circuit as last read from the ledger (at most ``cache_s`` old, give or take
        the one read under way)."""
        with self._lock:
            due = fresh or time.monotonic() - self._read_at >= self._cache_s
            never_read = self._read_at == float("-inf")
            if not due or (self._refreshing and not fresh and not never_read):
                # Another thread is reading it: every thread of the process waiting on that
                # one query, once a second, stalled them all behind a busy database.
                return self._cached
            if fresh or never_read:
                with self._uow() as uow:
                    self._cached = uow.ledger.circuit(self._name)
                self._read_at = time.monotonic()
                self._generation += 1
                return self._cached
            self._refreshing = True
            generation = self._generation
        try:
            with self._uow() as uow:
                state = uow.ledger.circuit(self._name)
        finally:
            with self._lock:
                self._refreshing = False
        with self._lock:
            # What this process recorded meanwhile is newer than what the read saw.
            if self._generation == generation:
                self._cached, self._read_at = state, time.monotonic()
            return self._cached

    def _remember(self, state: CircuitState) -> None:
        with self._lock:
            self._cached = state
            self._read_at = time.monotonic()
            self._generation += 1

    def permit(self) -> Permit | CircuitState:
        """A Permit when a call may go now, else the (open) state that forbids it."""
        state = self.state()
        if state.state == "closed":
            return Permit()
        now = self._clock()
        if state.open_until is not None and now < state.open_until:
            return state
        with self._uow() as uow:
            won = uow.ledger.try_probe(self._name, now=now,
                                       probe_until=now + self._probe_timeout)
            uow.commit()
        if won:
            log.warning("circuit.probe", extra={"circuit": self._name, "reason": state.reason})
            return Permit(probe=True)
        return self.state(fresh=True)

    def success(self, permit: Permit) -> None:
        """A call got a real answer from Capillary."""
        cached = self.state()
        if not permit.probe and cached.state == "closed" and cached.consecutive_failures == 0:
            return
        now = self._clock()
        with self._uow() as uow:
            uow.ledger.save_circuit(self._name, CLOSED_CIRCUIT, now=now)
            uow.commit()
        self._remember(CLOSED_CIRCUIT)
        if cached.state != "closed" or permit.probe:
            log.warning("circuit.closed", extra={"circuit": self._name})

    def failure(self, permit: Permit, verdict: Verdict, reason: str) -> bool:
        """A call failed in a way that speaks of Capillary's health; True if it opened."""
        now = self._clock()
        with self._uow() as uow:
            state = uow.ledger.count_failure(self._name, now=now)
            already_open = state.state == "open" and state.open_until is not None \
                and now < state.open_until
            if already_open or not (
                permit.probe or self._policy.opens_after(verdict, state.consecutive_failures)
            ):
                uow.commit()
                self._remember(state)
                return False
            times = state.times_opened + 1
            opened = CircuitState("open", state.consecutive_failures, times,
                                  now + self._policy.open_for(times), reason)
            uow.ledger.save_circuit(self._name, opened, now=now)
            uow.commit()
        self._remember(opened)
        log.error(
            "circuit.opened",
            extra={"circuit": self._name, "reason": reason, "verdict": verdict.value,
                   "open_until": opened.open_until, "times_opened": times,
                   "consecutive_failures": opened.consecutive_failures},
        )
        return True

    def close(self) -> None:
        """Close the circuit by hand (an operator fixed the configuration)."""
        with self._uow() as uow:
            uow.ledger.save_circuit(self._name, CLOSED_CIRCUIT, now=self._clock())
            uow.commit()
        self._remember(CLOSED_CIRCUIT)
