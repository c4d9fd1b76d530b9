"""Destructive support actions by explicit ids: the dry run names the entities, the confirmation
carries exactly those ids, and only those are touched.

A filter is only ever used to *find* entities for the operator to look at; what a discard or a
replay acts on is the list of ids the dry run showed. A dead letter that arrives between the
dry run and the confirmation, matching the same filter, is not in the list and is left alone.
The list is bounded (``MAX_IDS``): a filter naming more is refused, to be narrowed, instead of
being loaded whole into memory or acted on blind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Protocol

from worker.adapters.postgres.plans import SelectionCounts
from worker.adapters.postgres.support import Selection, Target
from worker.domain.errors import SelectionRefused
from worker.domain.model import ISSUED_STATES

#: The most entities one discard or replay may name.
MAX_IDS = 10_000
ISSUED = tuple(sorted(s.value for s in ISSUED_STATES))


class ActionPlans(Protocol):
    """Counts and bounded lists of what a selection names (``SqlActionPlans``)."""

    def count(self, selection: Selection) -> SelectionCounts: ...

    def listed(self, selection: Selection, *, limit: int) -> list[Target]: ...


@dataclass(frozen=True)
class ActionPlan:
    """What a discard or replay of a selection would touch: exactly ``targets``."""

    selection: Selection
    targets: tuple[Target, ...]
    read_back_first: int
    already_issued: int

    @property
    def total(self) -> int:
        return len(self.targets)

    @property
    def entity_ids(self) -> tuple[int, ...]:
        return tuple(t.entity_id for t in self.targets)

    @property
    def to_send(self) -> int:
        return self.total - self.read_back_first

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "to_send": self.to_send,
                "read_back_first": self.read_back_first, "already_issued": self.already_issued}


def too_many(count: int, limit: int = MAX_IDS) -> SelectionRefused:
    return SelectionRefused(f"{count} entities match; one action may name at most {limit:,}: "
                            "narrow the filter (a series, a customer, a time window)")


def plan_action(selection: Selection, plans: ActionPlans, *, limit: int = MAX_IDS,
                count_issued: bool = False) -> ActionPlan:
    """The dry run: the entities ``selection`` names now, at most ``limit`` of them (more is
    refused with ``SelectionRefused``). Reads only; ``count_issued`` also counts the issued
    ones the same filter finds (a replay leaves them alone)."""
    counts = plans.count(selection)
    if counts.total > limit:
        raise too_many(counts.total, limit)
    # Listed after counting: what arrived in between is cut at the bound, never past it.
    targets = tuple(plans.listed(selection, limit=limit))
    issued = plans.count(replace(selection, states=ISSUED)).total if count_issued else 0
    return ActionPlan(selection, targets, sum(1 for t in targets if t.needs_reconcile), issued)


_SEPARATORS = re.compile(r"[\s,]+")


def parse_ids(text: str, *, limit: int = MAX_IDS) -> tuple[int, ...]:
    """The entity ids a confirmation carries (comma- or space-separated), in order, once
    each. Refuses an empty list, anything that is not an id, and more than ``limit``."""
    words = [w for w in _SEPARATORS.split(text.strip()) if w]
    if not words:
        raise SelectionRefused("no entity ids: run the dry run and confirm its list")
    if len(words) > limit:
        raise too_many(len(words), limit)
    ids: dict[int, None] = {}
    for word in words:
        if not word.isdigit() or len(word) > 19:
            raise SelectionRefused(f"{word[:30]!r} is not an entity id")
        ids[int(word)] = None
    return tuple(ids)


def by_ids(ids: tuple[int, ...], states: tuple[str, ...]) -> Selection:
    """The selection a confirmation acts on: those ids, while still in one of ``states``."""
    return Selection(entity_ids=ids, states=states)
