"""The bus bridge: no message may end its consumer, an oversize body is recorded in place, and
its peek for Flower never raises."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import kombu.exceptions
import pytest

from tests.unit.conftest import World
from worker.adapters.rabbitmq.links import StepLinks
from worker.domain.errors import LedgerUnavailable
from worker.entrypoints.celery.bridge import EventsBridge, _peek

MAX = 65_536


@pytest.mark.parametrize(
    "body",
    [b"[" * 5000, b"{" * 5000, b'{"a":' * 5000, b"\xff\xfe", b"null", b"[1]",
     b'{"seriesIds": [' + b"9" * 5000 + b"]}", b"x" * (MAX + 1)],
)
def test_a_peek_at_poison_is_empty_not_an_error(body: bytes) -> None:
    assert _peek(body, MAX) == (None, None, None)


def test_a_peek_shows_printable_labels_only() -> None:
    body = json.dumps({"eventId": "e\x1b[31m\n\x00\ud800", "customer": {"id": "1\n2"},
                       "seriesIds": [1, 2]}).encode()
    event_id, customer, series = _peek(body, MAX)
    assert event_id == "e\\x1b[31m\\n\\x00\\ud800"
    assert customer == "id:1\\n2"
    assert series == "[1, 2]"


def test_a_peek_cuts_long_labels() -> None:
    body = json.dumps({"eventId": "e" * 5000, "customer": {"id": "c" * 5000},
                       "seriesIds": list(range(5000))}).encode()
    event_id, customer, series = _peek(body, MAX)
    assert event_id is None  # longer than any valid event id: not a label worth showing
    assert customer is not None and len(customer) <= 80
    assert series is not None and len(series) <= 120


# -- the bridge itself, with fakes of its parent, app and messages -----------------------------

@dataclass
class FakeMessage:
    body: bytes
    delivery_tag: int
    content_type: str = "application/json"
    settled: str | None = None

    def ack(self) -> None:
        self.settled = "acked"

    def reject(self, requeue: bool) -> None:
        self.settled = "requeued" if requeue else "dropped"


@dataclass
class FakeApp:
    coupon_container: Any
    sent: list[dict[str, Any]] = field(default_factory=list)
    fail_with: Exception | None = None
    #: Called while the publish waits for its confirm (``send_task`` returns once confirmed).
    during_publish: Any = None

    def send_task(self, name: str, **options: Any) -> None:
        if self.during_publish is not None:
            self.during_publish()
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(options["kwargs"])


@dataclass
class FakeContainer:
    world: World
    down: bool = False
    links: StepLinks = field(default_factory=StepLinks)

    def deps(self) -> Any:
        if self.down:
            raise LedgerUnavailable("database unavailable: connection refused")
        return self.world.deps


@dataclass
class FakeConsumer:
    app: FakeApp


def bridge(world: World, max_bytes: int = 1024) -> tuple[EventsBridge, FakeApp, FakeContainer]:
    container = FakeContainer(world)
    app = FakeApp(container)
    step = EventsBridge(FakeConsumer(app))
    step._max_bytes = max_bytes
    return step, app, container


def test_poison_is_forwarded_for_the_pool_to_record_and_the_next_message_follows(
        world: World) -> None:
    step, app, _ = bridge(world, max_bytes=MAX)
    messages = [FakeMessage(b"[" * 5000, 1), FakeMessage(b"\xff", 2),
                FakeMessage(b'{"eventId": "ok"}', 3)]
    for message in messages:
        step._on_message(message)
    assert [m.settled for m in messages] == ["acked"] * 3
    assert [kw["encoding"] for kw in app.sent] == ["utf-8", "base64", "utf-8"]
    assert [kw["event_id"] for kw in app.sent] == [None, None, "ok"]


def test_an_oversize_body_is_recorded_in_the_bridge_not_forwarded(world: World) -> None:
    step, app, _ = bridge(world)
    huge = b'{"eventId": "big-1", "pad": "' + b"x" * 2000 + b'"}'
    step._on_message(FakeMessage(huge, 1))
    assert app.sent == []
    rejection, = world.state.rejections
    assert rejection["raw"] == huge and rejection["event_id"] == "big-1"
    assert rejection["reason"] == f"body is {len(huge)} bytes, over the 1024-byte limit"


def test_an_oversize_body_waits_held_while_the_ledger_is_down(world: World) -> None:
    step, app, container = bridge(world)
    container.down = True
    huge, after = FakeMessage(b"x" * 2000, 1), FakeMessage(b'{"eventId": "next"}', 2)
    step._on_message(huge)
    step._on_message(after)
    step.release(room=10)
    assert (huge.settled, after.settled) == (None, None), "held, in order, unacknowledged"
    assert world.state.rejections == [] and app.sent == []
    container.down = False
    step.release(room=10)
    assert (huge.settled, after.settled) == ("acked", "acked")
    assert len(world.state.rejections) == 1 and [kw["event_id"] for kw in app.sent] == ["next"]


def test_an_unexpected_error_holds_the_message_instead_of_ending_the_consumer(
        world: World) -> None:
    step, app, _ = bridge(world)
    app.fail_with = RuntimeError("a bug")
    message = FakeMessage(b'{"eventId": "e"}', 1)
    step._on_message(message)  # does not raise
    assert message.settled is None
    app.fail_with = None
    step.release(room=10)
    assert message.settled == "acked"


def test_the_bridge_registers_itself_for_the_guard(world: World) -> None:
    step, _app, container = bridge(world)
    assert container.links.bridge is step


def test_past_its_high_water_mark_the_bridge_holds_messages_until_released(
        world: World) -> None:
    # Given a bridge allowed to forward two messages before the guard reads the queue again
    step, app, _ = bridge(world)
    step.high_water = 2
    messages = [FakeMessage(json.dumps({"eventId": f"e-{i}"}).encode(), i) for i in range(5)]
    # When five arrive
    for message in messages:
        step._on_message(message)
    # Then two are forwarded and three are held, unacknowledged
    assert [m.settled for m in messages] == ["acked", "acked", None, None, None]
    # When the guard finds room for two more, then for the rest
    step.release(room=2)
    assert [m.settled for m in messages] == ["acked"] * 4 + [None]
    step.release(room=10)
    # Then they go in their order of arrival
    assert [kw["event_id"] for kw in app.sent] == [f"e-{i}" for i in range(5)]


def test_a_bus_message_is_acknowledged_only_once_its_task_is_confirmed(world: World) -> None:
    # With publisher confirms, send_task returns once RabbitMQ confirmed the task message, and
    # raises when it refused it (kombu raises OperationalError from a basic.nack).
    step, app, _ = bridge(world, max_bytes=MAX)
    confirmed, refused = FakeMessage(b'{"eventId": "a"}', 1), FakeMessage(b'{"eventId": "b"}', 2)
    while_publishing: list[str | None] = []
    app.during_publish = lambda: while_publishing.append(confirmed.settled)
    step._on_message(confirmed)
    assert while_publishing == [None], "not acknowledged before the confirm"
    assert confirmed.settled == "acked"
    # A refused task: the bus message is held, never acknowledged, and not handed straight
    # back either (it would come back at once and be refused again, in a tight loop)
    app.during_publish = None
    app.fail_with = kombu.exceptions.OperationalError("basic.nack")
    step._on_message(refused)
    step.release(room=10)
    assert refused.settled is None
    assert [kw["event_id"] for kw in app.sent] == ["a"]
    # Once the broker takes it, the next release forwards it, then acknowledges it
    app.fail_with = None
    step.release(room=10)
    assert refused.settled == "acked"
    assert [kw["event_id"] for kw in app.sent] == ["a", "b"]
