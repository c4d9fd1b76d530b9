"""A fake ``Publisher`` for unit tests: records what would have been published."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.adapters.postgres.records import DeadLetterRecord, DueEntity
from worker.domain.events import LoyaltyEvent


@dataclass
class FakePublisher:
    """Records what would have been published."""

    retries: list[int] = field(default_factory=list)
    dead_letters: list[dict[str, object]] = field(default_factory=list)
    events: list[tuple[dict[str, object], str]] = field(default_factory=list)

    def publish_retries(self, due: Sequence[DueEntity]) -> None:
        self.retries.extend(d.entity_id for d in due)

    def publish_dead_letters(self, records: Sequence[DeadLetterRecord]) -> None:
        self.dead_letters.extend(r.as_message() for r in records)

    def submit_event(self, event: LoyaltyEvent, *, source: str) -> None:
        self.events.append((event.to_message(), source))
