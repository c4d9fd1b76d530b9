"""The circuit breaker by hand: what an operator reaches for during an incident.

``open_circuit``: Capillary asked us to stop, or a key is being rotated; nobody calls it until
the time given, then one worker probes as after any opening. ``close_circuit``: the cause is
fixed; the fleet calls again within a second (the workers' cached reading), instead of at its
next probe. Each is audited in ``operator_actions``, in the transaction that moves the switch.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from worker.adapters.postgres.circuit import CAPILLARY
from worker.adapters.postgres.records import CLOSED_CIRCUIT, CircuitState
from worker.domain.runtime_policy import CIRCUIT_OPEN_CODE
from worker.domain.text import printable
from worker.usecases.support import SupportDeps

log = logging.getLogger("worker.support")


def _who_and_why(reason: str, operator: str) -> tuple[str, str]:
    """The audit's reason (required) and operator, as storable text."""
    if not reason.strip():
        raise ValueError("a reason is required")
    return printable(reason, limit=500), printable(operator, limit=200)


def circuit_state(deps: SupportDeps, name: str = CAPILLARY) -> CircuitState:
    """The circuit as the ledger holds it now."""
    with deps.uow() as uow:
        return uow.ledger.circuit(name)


def open_circuit(deps: SupportDeps, *, for_s: float, reason: str, operator: str,
                 name: str = CAPILLARY) -> CircuitState:
    """Open the circuit for ``for_s`` seconds; nothing is sent to Capillary meanwhile."""
    if for_s <= 0:
        raise ValueError("the circuit opens for a positive time")
    reason, operator = _who_and_why(reason, operator)
    now = deps.clock()
    with deps.uow() as uow:
        current = uow.ledger.circuit(name)
        opened = CircuitState("open", current.consecutive_failures, current.times_opened,
                              now + timedelta(seconds=for_s), f"opened by {operator}: {reason}")
        uow.ledger.save_circuit(name, opened, now=now)
        uow.ledger.audit(action="circuit_open", operator=operator, reason=reason,
                         outcome=f"open until {opened.open_until:%Y-%m-%dT%H:%M:%SZ}", now=now,
                         details={"circuit": name, "for_s": for_s, "was": current.state})
        uow.commit()
    log.warning("circuit.opened_by_hand", extra={"circuit": name, "operator": operator,
                                                  "reason": reason, "for_s": for_s})
    return opened


def close_circuit(deps: SupportDeps, *, reason: str, operator: str,
                  name: str = CAPILLARY) -> CircuitState:
    """Close the circuit now: the fleet calls Capillary again."""
    reason, operator = _who_and_why(reason, operator)
    now = deps.clock()
    with deps.uow() as uow:
        current = uow.ledger.circuit(name)
        uow.ledger.save_circuit(name, CLOSED_CIRCUIT, now=now)
        # Entities deferred while it was open would otherwise wait for the time the opening
        # gave them; the rate limit paces them when they all come due at once.
        resumed = uow.ledger.resume_deferred(CIRCUIT_OPEN_CODE, now=now)
        uow.ledger.audit(action="circuit_close", operator=operator, reason=reason,
                         outcome=f"closed; {resumed} waiting entities due now", now=now,
                         details={"circuit": name, "was": current.state,
                                  "was_reason": current.reason})
        uow.commit()
    log.warning("circuit.closed_by_hand", extra={"circuit": name, "operator": operator,
                                                  "reason": reason, "was": current.state,
                                                  "resumed": resumed})
    return CLOSED_CIRCUIT
