"""The outside measurement of a cold run: what the sandbox Capillary answered, on its own clock.

Both systems' own completion records are inside the thing measured: ours is the ledger's
``updated_at``, written by the worker after Capillary answered; the bare task has none and is
read from this same log. The sandbox is the one party both call and neither controls: it notes
the moment it answers each bulk-issue call, before the answer is on the wire. So "events the
sandbox answered 200 for this batch" over "its last such answer minus the bench's spawn time"
is a rate no worker's record can flatter, and the targets table's ratios must agree with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coupon_devtools.bench.events import Batch
from coupon_devtools.bench.stack import Stack


@dataclass(frozen=True)
class SandboxAnswers:
    """The batch's events the sandbox answered 200 for, and when it gave the last answer."""

    issued: int
    last_answer: float | None


def tally_answers(calls: Iterable[Mapping[str, Any]], batch: Batch) -> SandboxAnswers:
    """Count each of the batch's events once, however many times it was answered 200 (a
    retried call issues nothing twice on Capillary's side either)."""
    answered: dict[int, float] = {}
    for call in calls:
        if call["path"] != "bulk" or call["status"] != 200 or call["customerId"] is None:
            continue
        index = batch.index_of_customer(str(call["customerId"]))
        if index is not None:
            t = float(call["t"])
            answered[index] = max(t, answered.get(index, t))
    return SandboxAnswers(len(answered), max(answered.values()) if answered else None)


def sandbox_answers(stack: Stack, batch: Batch, *, since: float) -> SandboxAnswers:
    """The sandbox's own log of the batch's bulk-issue calls answered at or after ``since``."""
    return tally_answers(stack.admin.calls(since), batch)
