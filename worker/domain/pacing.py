"""Even spacing for a replay: a token bucket of one token, refilled at the chosen velocity.

A replay at 600 calls a minute sends one entity every 100 ms, never ten at once on each sweep.
The bucket holds a single token, so time the job spent behind (workers down, a paused job, a
slow sweep) is not made up in a burst: the next item goes at once, and the rest keep the pace.
Pure: the moments are computed here, the caller waits for them.
"""

from __future__ import annotations

from datetime import datetime, timedelta


def interval_of(velocity_per_min: int) -> timedelta:
    """The time between two items at ``velocity_per_min``."""
    return timedelta(seconds=60.0 / max(1, velocity_per_min))


def even_slots(next_at: datetime, now: datetime, *, interval: timedelta, horizon: timedelta,
               max_items: int) -> list[datetime]:
    """The moments at which the items of the coming ``horizon`` may go, ``interval`` apart.

    The first is ``next_at``, or ``now`` when the job is behind (the one token the bucket
    holds); the last is before ``now + horizon``; at most ``max_items`` of them, at least one
    when ``next_at`` has come.
    """
    if next_at > now:
        return []
    slot = next_at if next_at >= now - interval else now
    slots: list[datetime] = []
    while len(slots) < max_items and (not slots or slot < now + horizon):
        slots.append(slot)
        slot += interval
    return slots
