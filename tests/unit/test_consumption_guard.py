"""The consumption guard across a broker reconnect: a queue it paused is resumed later."""

from __future__ import annotations

from types import SimpleNamespace

from worker.broker.worker_steps import ConsumptionGuard
from worker.config import load_settings
from worker.policy import CONSUME, ConsumptionPause, QueueRole


class Consumer:
    """What the guard uses of Celery's consumer, recording which queues it consumes."""

    def __init__(self) -> None:
        settings = load_settings(capillary_username="u", capillary_password="p")
        self.app = SimpleNamespace(conf={"coupon_settings": settings})
        self.timer = SimpleNamespace(call_repeatedly=lambda *_a: SimpleNamespace(
            cancel=lambda: None))
        self.controller = SimpleNamespace(coupon_sweeper=SimpleNamespace(pause=CONSUME))
        # Celery keeps a cancelled queue deselected on the app, so a reconnect's new task
        # consumer leaves it out too.
        self.consuming = {settings.tasks_queue, settings.retry_queue}

    def cancel_task_queue(self, queue: str) -> None:
        self.consuming.discard(queue)

    def add_task_queue(self, queue: str) -> None:
        self.consuming.add(queue)

    def pause(self, reason: str | None, *roles: QueueRole) -> None:
        self.controller.coupon_sweeper.pause = ConsumptionPause(reason, frozenset(roles))


def test_a_queue_paused_before_a_reconnect_is_resumed_after_it() -> None:
    consumer = Consumer()
    guard = ConsumptionGuard(SimpleNamespace())
    guard.start(consumer)
    # Given the circuit opened and the guard stopped consuming fresh events
    consumer.pause("circuit open: http_503", "tasks")
    guard._check(consumer)
    assert consumer.consuming == {"coupons.retry"}
    # When the broker connection drops, and the circuit has closed by the time the
    # consumer's steps restart
    guard.stop(consumer)
    consumer.pause(None)
    guard.start(consumer)
    guard._check(consumer)
    # Then the tasks queue is consumed again
    assert consumer.consuming == {"coupons.tasks", "coupons.retry"}


def test_a_queue_still_paused_after_a_reconnect_waits_for_the_circuit() -> None:
    consumer = Consumer()
    guard = ConsumptionGuard(SimpleNamespace())
    guard.start(consumer)
    consumer.pause("database unavailable", "tasks", "retry")
    guard._check(consumer)
    guard.stop(consumer)
    guard.start(consumer)
    guard._check(consumer)
    assert consumer.consuming == set()
    consumer.pause(None)
    guard._check(consumer)
    assert consumer.consuming == {"coupons.tasks", "coupons.retry"}
