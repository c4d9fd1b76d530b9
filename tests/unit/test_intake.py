"""Bus intake read directly: a raw bus message becomes the ``coupons.ingest`` task it stands for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery

from tests.unit.conftest import World
from tests.unit.test_bridge import FakeContainer, FakeMessage
from worker.adapters.rabbitmq.names import TASK_INGEST
from worker.config import load_settings
from worker.entrypoints.celery.app import create_app
from worker.entrypoints.celery.intake import as_ingest_task, is_bus_message
from worker.entrypoints.celery.tasks import decode_body

MAX = 8192


@dataclass
class BusMessage(FakeMessage):
    headers: dict[str, Any] | None = None
    content_encoding: str | None = None
    delivery_info: dict[str, Any] | None = None
    _decoded_cache: Any = None


@pytest.fixture
def app(world: World) -> Celery:
    app = create_app(load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    app.coupon_container = FakeContainer(world)  # type: ignore[attr-defined]
    return app


def _kwargs(message: BusMessage) -> dict[str, Any]:
    _args, kwargs, _embed = json.loads(message.body)
    return kwargs  # type: ignore[no-any-return]


@pytest.mark.parametrize("raw", [b'{"eventId": "e-1", "customer": {"id": "7"}}', b"\xff\xfe",
                                 b"[" * 5000, b"not json"])
def test_a_bus_message_becomes_an_ingest_task_with_its_bytes_untouched(
        app: Celery, raw: bytes) -> None:
    # Given a raw message from the bus, whatever it holds
    message = BusMessage(raw, 1, headers={"x-producer": "loyalty"},
                         delivery_info={"routing_key": "coupons.events"})
    assert is_bus_message(message, "coupons.events")  # type: ignore[arg-type]
    # When it is taken in
    assert as_ingest_task(message, app, max_bytes=MAX) is True  # type: ignore[arg-type]
    # Then it is a coupons.ingest task message, whose task gets the exact bytes back
    assert message.headers is not None and message.headers["task"] == TASK_INGEST
    assert message.headers["x-producer"] == "loyalty" and message.headers["id"]
    kwargs = _kwargs(message)
    assert decode_body(kwargs["body"], kwargs["encoding"]) == raw
    assert kwargs["source"] == "bus" and message.settled is None, "acked late, by the task"


def test_flower_sees_the_event_ids_never_the_payload(app: Celery) -> None:
    message = BusMessage(b'{"eventId": "e-9", "customer": {"id": "7"}, "seriesIds": [1],'
                         b' "metadata": {"notes": "secret"}}', 1, headers={},
                         delivery_info={"routing_key": "coupons.events"})
    as_ingest_task(message, app, max_bytes=MAX)  # type: ignore[arg-type]
    assert message.headers is not None
    assert message.headers["kwargsrepr"] == "event=e-9 customer=id:7 series=[1]"
    assert _kwargs(message)["event_id"] == "e-9"


def test_only_messages_from_the_bus_are_taken_in() -> None:
    task = BusMessage(b"{}", 1, delivery_info={"routing_key": "coupons.tasks"})
    assert not is_bus_message(task, "coupons.events")  # type: ignore[arg-type]


def test_an_oversize_body_is_recorded_here_and_acknowledged(app: Celery, world: World) -> None:
    huge = b'{"eventId": "big-1", "pad": "' + b"x" * 9000 + b'"}'
    message = BusMessage(huge, 1, headers={}, delivery_info={"routing_key": "coupons.events"})
    assert as_ingest_task(message, app, max_bytes=MAX) is False  # type: ignore[arg-type]
    assert message.settled == "acked"
    rejection, = world.state.rejections
    assert rejection["raw"] == huge and rejection["event_id"] == "big-1"
    assert rejection["reason"] == f"body is {len(huge)} bytes, over the 8192-byte limit"


def test_an_oversize_body_goes_back_to_the_bus_while_the_ledger_is_down(
        app: Celery, world: World) -> None:
    app.coupon_container.down = True  # type: ignore[attr-defined]
    message = BusMessage(b"x" * 9000, 1, headers={},
                         delivery_info={"routing_key": "coupons.events"})
    assert as_ingest_task(message, app, max_bytes=MAX) is False  # type: ignore[arg-type]
    assert message.settled == "requeued" and world.state.rejections == []
