"""A RabbitMQ user per component, on a vhost of this test's own: the commands
``coupon-worker broker users`` prints are run as they are, then each user does its job (a real
worker consumes, the producer publishes an event that gets issued, Flower reads task events and
pings the worker, the console resubmits) and is refused what its job must not do.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import amqp.exceptions
import pytest
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue
from sqlalchemy import Engine

from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost, rabbitmqctl
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import RABBIT_HOST, WorkerProcess, run_cli
from worker.broker import topology
from worker.broker.celery_config import producer_app
from worker.broker.permissions import COMPONENTS, password_variable, user_name
from worker.broker.publisher import CeleryPublisher
from worker.config import Settings
from worker.events import parse_event_data

REFUSED = (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed)


@dataclass(frozen=True)
class Users:
    vhost: str
    prefix: str

    def url(self, component: str) -> str:
        return (f"amqp://{user_name(component, self.prefix)}:pw-{component}"  # type: ignore[arg-type]
                f"@{RABBIT_HOST}/{self.vhost}")


@pytest.fixture
def users(settings: Settings) -> Iterator[Users]:
    tag = uuid.uuid4().hex[:8]
    found = Users(f"cw-users-{tag}", f"cwt{tag}")
    create_vhost(found.vhost)
    try:
        # Given the users, made by running the printed commands as they are
        printed = run_cli(settings, "broker", "users", "--vhost", found.vhost,
                          "--prefix", found.prefix)
        assert printed.exit_code == 0, printed.output
        passwords = {password_variable(c): f"pw-{c}" for c in COMPONENTS}
        done = subprocess.run(["sh", "-c", printed.stdout], env={"PATH": "/usr/sbin:/usr/bin:/bin",
                              **passwords}, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr
        yield found
    finally:
        delete_vhost(found.vhost)
        for component in COMPONENTS:
            rabbitmqctl("delete_user", user_name(component, found.prefix),
                        allowed_error="does not exist")


def _refused(action: Callable[[], object]) -> None:
    with pytest.raises(REFUSED) as refused:
        action()
    assert "ACCESS_REFUSED" in str(refused.value) or "access" in str(refused.value).lower()


def _publish(url: str, exchange: str, *, declare: list[Queue] | None = None) -> None:
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        Producer(conn.channel()).publish(b"{}", exchange=Exchange(exchange, type="direct"),
                                         routing_key=exchange, declare=declare or [])


def _consume(url: str, queue: Queue) -> None:
    with Connection(url) as conn:
        Consumer(conn.channel(), [queue], callbacks=[lambda *_: None]).consume()
        conn.drain_events(timeout=0.5)


def test_each_component_does_its_job_with_its_own_user(
        users: Users, settings_factory: Callable[..., Settings], clean_ledger: Engine,
        sandbox: object, start_worker: Callable[..., WorkerProcess]) -> None:
    worker_settings = settings_factory(broker_url=users.url("worker"))
    # When a real worker runs as the worker user (it declares the topology, consumes, sends
    # task events and answers remote control)
    worker = start_worker(worker_settings)
    # and the producer user publishes an event on the bus
    producer_settings = settings_factory(broker_url=users.url("producer"))
    event = example_event(f"users-{uuid.uuid4().hex[:6]}", series=(544770,))
    publish(producer_settings, event)
    # Then it is issued
    wait_for_state(clean_ledger, event["eventId"], "completed")
    # And Flower's user reads task events from a queue of its own and pings the workers
    flower_settings = settings_factory(broker_url=users.url("flower"))
    flower = Celery(broker=flower_settings.broker_url)
    try:
        replies = flower.control.ping(timeout=5.0)
    finally:
        flower.close()
    assert any(worker.name in name for reply in replies for name in reply), replies
    events_queue = Queue(f"celeryev.{uuid.uuid4()}", Exchange("celeryev", type="topic"),
                         routing_key="#", auto_delete=True)
    _consume(users.url("flower"), events_queue)
    # And the console's user resubmits an event as a task, which is issued too
    console_settings = settings_factory(broker_url=users.url("console"))
    resubmitted = parse_event_data(example_event(f"resub-{uuid.uuid4().hex[:6]}",
                                                 series=(553379,)))
    app = producer_app(console_settings)
    try:
        CeleryPublisher(app, console_settings).submit_event(resubmitted, source="console")
    finally:
        app.close()
    wait_for_state(clean_ledger, resubmitted.eventId, "completed")


def test_each_user_is_refused_what_its_job_must_not_do(
        users: Users, settings: Settings) -> None:
    tasks, events = topology.tasks_queue(settings), topology.events_queue(settings)
    dead = topology.dead_queue(settings)
    # Given the topology, declared by the worker's user
    with Connection(users.url("worker")) as conn:
        for queue in (tasks, events, dead):
            queue(conn.channel()).declare()
    # Flower's user publishes no coupon task, reads no project queue
    _refused(lambda: _publish(users.url("flower"), settings.tasks_queue))
    _refused(lambda: _publish(users.url("flower"), settings.events_queue))
    _refused(lambda: _consume(users.url("flower"), tasks))
    # the producer's user publishes to the events exchange only
    _publish(users.url("producer"), settings.events_queue, declare=[events])
    _refused(lambda: _publish(users.url("producer"), settings.tasks_queue))
    _refused(lambda: _consume(users.url("producer"), tasks))
    _refused(lambda: _publish(users.url("producer"), settings.dead_queue))
    # the console's user reads neither the bus nor the dead letters
    _refused(lambda: _consume(users.url("console"), events))
    _refused(lambda: _consume(users.url("console"), dead))
    _refused(lambda: _publish(users.url("console"), settings.events_queue))
    # nobody deletes a queue it does not declare (the console declares tasks and retries)
    for component, queue in (("producer", settings.tasks_queue), ("flower", settings.tasks_queue),
                             ("console", settings.events_queue),
                             ("console", settings.dead_queue)):
        with Connection(users.url(component)) as conn:
            _refused(lambda conn=conn, queue=queue: conn.channel().queue_delete(queue))
