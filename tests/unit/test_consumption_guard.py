"""The consumption guard carries out the sweeper's pause decision and the bridge's back-pressure,
across broker reconnects: a queue it paused is resumed later."""

from __future__ import annotations

from types import SimpleNamespace

from worker.adapters.rabbitmq import topology
from worker.adapters.rabbitmq.links import StepLinks
from worker.config import load_settings
from worker.domain.runtime_policy import BACKLOG_MIN, BACKLOG_PER_SLOT, ConsumptionPause, QueueRole
from worker.entrypoints.celery.guard import ConsumptionGuard


class FakeBridge:
    """The bridge as the guard sees it: a high-water mark and releases."""

    def __init__(self) -> None:
        self.high_water = 0
        self.rooms: list[int] = []

    def release(self, room: int) -> None:
        self.rooms.append(room)


class Consumer:
    """What the guard uses of Celery's consumer, recording which queues it consumes."""

    def __init__(self, *, waiting: int = 0, processes: int = 2,
                 bus_intake: str = "direct") -> None:
        settings = load_settings(capillary_username="u", capillary_password="p",
                                 bus_intake=bus_intake)
        self.links = StepLinks()
        self.app = SimpleNamespace(conf={"coupon_settings": settings},
                                   coupon_container=SimpleNamespace(links=self.links))
        self.timer = SimpleNamespace(call_repeatedly=lambda *_a: SimpleNamespace(
            cancel=lambda: None))
        self.pool = SimpleNamespace(num_processes=processes)
        self.waiting = waiting
        self.declared: list[str] = []
        self.connection = SimpleNamespace(default_channel=SimpleNamespace(
            queue_declare=self._queue_declare))
        # Celery keeps a cancelled queue deselected on the app, so a reconnect's new task
        # consumer leaves it out too.
        self.consuming = {q.name for q in topology.consumed_queues(settings)}

    def _queue_declare(self, *, queue: str, passive: bool) -> tuple[str, int, int]:
        assert passive, "the guard only reads the depth, it never declares"
        self.declared.append(queue)
        return queue, self.waiting, 1

    def cancel_task_queue(self, queue: str) -> None:
        self.consuming.discard(queue)

    def add_task_queue(self, queue: str) -> None:
        self.consuming.add(queue)

    def pause(self, reason: str | None, *roles: QueueRole) -> None:
        self.links.pause = ConsumptionPause(reason, frozenset(roles))


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
    assert consumer.consuming == {"coupons.events", "coupons.tasks", "coupons.retry"}


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
    assert consumer.consuming == {"coupons.events", "coupons.tasks", "coupons.retry"}


def test_a_pause_cancels_each_queue_once_not_on_every_check() -> None:
    consumer = Consumer()
    cancelled: list[str] = []
    consumer.cancel_task_queue = cancelled.append  # type: ignore[method-assign]
    guard = ConsumptionGuard(SimpleNamespace())
    consumer.pause("circuit open: http_503", "tasks")
    for _ in range(3):
        guard._check(consumer)
    assert cancelled == ["coupons.events", "coupons.tasks"]


def test_without_a_bridge_the_guard_does_not_read_the_task_queue() -> None:
    consumer = Consumer(waiting=5)
    ConsumptionGuard(SimpleNamespace())._check(consumer)
    assert consumer.declared == []


def test_reading_the_bus_directly_the_guard_does_not_read_the_task_queue() -> None:
    # Given the bridge step, idle: the worker's consumer reads the bus itself (the default)
    consumer = Consumer(waiting=5)
    bridge = FakeBridge()
    consumer.links.bridge = bridge
    # Then the guard costs the event loop no broker round trip
    ConsumptionGuard(SimpleNamespace())._check(consumer)
    assert consumer.declared == [] and bridge.rooms == []


def test_the_bridge_gets_the_room_left_below_the_high_water_mark() -> None:
    # Given a bridge and a task queue with 10 messages waiting, on a pool of 4
    consumer = Consumer(waiting=10, processes=4, bus_intake="bridge")
    bridge = FakeBridge()
    consumer.links.bridge = bridge
    # When the guard checks
    ConsumptionGuard(SimpleNamespace())._check(consumer)
    # Then the mark follows the pool, and the bridge may forward what is left below it
    assert consumer.declared == ["coupons.tasks"]
    assert bridge.high_water == max(4 * BACKLOG_PER_SLOT, BACKLOG_MIN)
    assert bridge.rooms == [bridge.high_water - 10]


def test_a_long_task_queue_leaves_the_bridge_no_room() -> None:
    consumer = Consumer(waiting=10_000, bus_intake="bridge")
    bridge = FakeBridge()
    consumer.links.bridge = bridge
    ConsumptionGuard(SimpleNamespace())._check(consumer)
    assert bridge.rooms == [0]


def test_read_directly_the_bus_pauses_with_the_task_queue_and_resumes_with_it() -> None:
    # Given a worker reading the bus itself (the default intake)
    consumer = Consumer()
    guard = ConsumptionGuard(SimpleNamespace())
    assert consumer.consuming == {"coupons.events", "coupons.tasks", "coupons.retry"}
    # When the circuit opens, fresh events stop coming in by either way
    consumer.pause("circuit open", "tasks")
    guard._check(consumer)
    assert consumer.consuming == {"coupons.retry"}
    # And when it closes, both come back
    consumer.pause(None)
    guard._check(consumer)
    assert consumer.consuming == {"coupons.events", "coupons.tasks", "coupons.retry"}
