"""Watching the ledger, and comparing it with the sandbox's ground truth, coupon by coupon."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.domain.model import ISSUE_REF_HEX_CHARS, ISSUE_REF_PREFIX, TERMINAL_STATES, issue_ref

if TYPE_CHECKING:
    from sqlalchemy import Engine




@dataclass(frozen=True)
class LedgerState:
    events: int
    entities: Mapping[str, int]
    verifying: int

    @property
    def busy(self) -> int:
        return sum(n for state, n in self.entities.items() if state not in TERMINAL_STATES)

    def at_rest(self, events: int) -> bool:
        return self.events >= events and self.busy == 0 and self.verifying == 0


def ledger_state(engine: Engine) -> LedgerState | None:
    """Where the ledger stands, or None while PostgreSQL does not answer."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from worker.adapters.postgres import models as m

    try:
        with engine.connect() as conn:
            events = conn.execute(select(func.count()).select_from(m.Event)).scalar_one()
            states = dict(conn.execute(select(m.Entity.state, func.count())
                                       .group_by(m.Entity.state)).tuples().all())
            verifying = conn.execute(select(func.count()).select_from(m.Entity).where(
                m.Entity.state == "issued", m.Entity.verify_after.is_not(None))).scalar_one()
    except SQLAlchemyError:
        return None
    return LedgerState(int(events), {str(k): int(v) for k, v in states.items()}, int(verifying))


@dataclass(frozen=True)
class Recorded:
    """One entity as our ledger has it."""

    state: str
    codes: tuple[str, ...] = ()
    reason: str | None = None


@dataclass
class Comparison:
    """The sandbox's ground truth against the expected entities and our ledger."""

    expected: int = 0
    issued: int = 0  # entities with at least one coupon
    missing: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    detected: int = 0  # issued twice, and the ledger says duplicate_issued
    strays: list[str] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    dead: Counter[str] = field(default_factory=Counter)

    @property
    def exactly_once(self) -> bool:
        return not (self.missing or self.twice or self.strays)


_REF = re.compile(rf"\[{re.escape(ISSUE_REF_PREFIX)}([0-9a-f]{{{ISSUE_REF_HEX_CHARS}}})")


def compare(expected: Mapping[str, tuple[str, Sequence[int]]],
            issued: Iterable[Mapping[str, Any]],
            ledger: Mapping[tuple[str, int], Recorded]) -> Comparison:
    """Check that the sandbox issued every (event, series) of ``expected`` (event id ->
    customer id, series) exactly once, to the right customer, and that our ledger says the same.

    A sandbox coupon is attributed to an event by the reference in its notes (see
    :func:`worker.domain.model.issue_ref`); coupons of events not in ``expected`` are ignored.
    """
    by_ref = {issue_ref(event_id): event_id for event_id in expected}
    found: dict[tuple[str, int], list[str]] = {}
    result = Comparison()
    for coupon in issued:
        notes = str((coupon.get("metadata") or {}).get("notes") or "")
        match = _REF.search(notes)
        event_id = by_ref.get(f"{ISSUE_REF_PREFIX}{match.group(1)}") if match else None
        if event_id is None:
            continue
        customer, allowed = expected[event_id]
        key = (event_id, int(coupon["seriesId"]))
        if str(coupon["customerId"]) != customer or key[1] not in allowed:
            result.strays.append(f"coupon {coupon['code']} carries event {event_id}'s reference "
                                 f"but went to customer {coupon['customerId']}, series {key[1]}")
            continue
        found.setdefault(key, []).append(str(coupon["code"]))
    for event_id, (_customer, series_ids) in sorted(expected.items()):
        for series in series_ids:
            key = (event_id, series)
            codes = found.get(key, [])
            ours = ledger.get(key, Recorded("absent"))
            result.expected += 1
            if ours.state == "dead":
                result.dead[ours.reason or "?"] += 1
            _judge(result, f"event {event_id} series {series}", codes, ours)
    return result


def _judge(result: Comparison, what: str, codes: Sequence[str], ours: Recorded) -> None:
    if codes:
        result.issued += 1
    if not codes:
        result.missing.append(f"{what}: never issued; the ledger says {ours.state}"
                              + (f" ({ours.reason})" if ours.reason else ""))
        if ours.codes:
            result.disagreements.append(f"{what}: the ledger records {', '.join(ours.codes)}, "
                                        "which the sandbox never issued")
    elif len(codes) > 1:
        detected = ours.state == "duplicate_issued" and set(codes) <= set(ours.codes)
        result.detected += detected
        result.twice.append(f"{what}: issued {len(codes)} times ({', '.join(codes)}); the "
                            f"ledger says {ours.state}" + (" (detected)" if detected else ""))
        if not detected:
            result.disagreements.append(f"{what}: the sandbox issued {', '.join(codes)}; the "
                                        f"ledger says {ours.state} with "
                                        f"{', '.join(ours.codes) or 'no coupon'}")
    elif ours.state != "issued" or ours.codes != tuple(codes):
        result.disagreements.append(f"{what}: the sandbox issued {codes[0]}; the ledger says "
                                    f"{ours.state} with {', '.join(ours.codes) or 'no coupon'}")


def read_ledger(engine: Engine) -> dict[tuple[str, int], Recorded]:
    from sqlalchemy import select

    from worker.adapters.postgres import models as m

    codes: dict[tuple[str, int], list[str]] = {}
    with engine.connect() as conn:
        for event_id, series, code in conn.execute(select(
                m.IssuedCoupon.event_id, m.IssuedCoupon.series_id, m.IssuedCoupon.code)
                .order_by(m.IssuedCoupon.id)):
            codes.setdefault((str(event_id), int(series)), []).append(str(code))
        rows = conn.execute(select(m.Entity.event_id, m.Entity.series_id, m.Entity.state,
                                   m.Entity.last_error_code)).all()
    return {(str(e), int(s)): Recorded(str(state), tuple(codes.get((str(e), int(s)), ())),
                                       str(code) if state == "dead" else None)
            for e, s, state, code in rows}


def consumers(vhost: str, queues: Sequence[str], node: str | None = None) -> dict[str, int]:
    """How many consumers each of ``queues`` has in ``vhost`` (a live worker has one each), as
    ``node`` counts them (default: rabbitmqctl's own node)."""
    from coupon_devtools.harness.rabbitmqctl import rabbitmqctl

    listed = rabbitmqctl("list_queues", "-p", vhost, "name", "consumers", "--no-table-headers",
                         node=node)
    counts = {}
    for line in listed.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in queues:
            counts[parts[0]] = int(parts[1])
    return {queue: counts.get(queue, 0) for queue in queues}
