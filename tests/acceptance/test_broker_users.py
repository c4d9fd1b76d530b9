"""A RabbitMQ user per component, on a vhost of this test's own: the commands
``coupon-worker broker users`` prints are run as they are, then each user does its job (a real
worker consumes, the producer publishes an event that gets issued, Flower reads task events and
pings the worker, the console resubmits) and is refused what its job must not do.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp.exceptions
import pytest
import requests
from kombu import Connection, Consumer, Exchange, Producer, Queue
from sqlalchemy import Engine

from coupon_devtools.harness.processes import Spawned, free_port, spawn
from coupon_devtools.harness.rabbitmqctl import create_vhost, delete_vhost, rabbitmqctl
from tests.acceptance.helpers import example_event, publish, wait_for_state
from tests.conftest import (
    RABBIT_HOST,
    REPO_ROOT,
    WorkerProcess,
    coupon_worker_command,
    run_cli,
    settings_env,
    wait_until,
)
from worker.adapters.rabbitmq import topology
from worker.adapters.rabbitmq.celery_config import producer_app
from worker.adapters.rabbitmq.permissions import COMPONENTS, password_variable, user_name
from worker.adapters.rabbitmq.publisher import CeleryPublisher
from worker.config import Settings
from worker.domain.events import parse_event_data

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


def _delete(url: str, queue: str) -> None:
    with Connection(url) as conn:
        conn.channel().queue_delete(queue)


def _consume(url: str, queue: Queue) -> None:
    with Connection(url) as conn:
        Consumer(conn.channel(), [queue], callbacks=[lambda *_: None]).consume()
        # A refusal closes the channel at once; an allowed consumer just finds nothing.
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.5)


def test_each_component_does_its_job_with_its_own_user(
        users: Users, settings_factory: Callable[..., Settings], clean_ledger: Engine,
        sandbox: object, start_worker: Callable[..., WorkerProcess], tmp_path: Path) -> None:
    worker_settings = settings_factory(broker_url=users.url("worker"))
    # When a real worker runs as the worker user (it declares the topology, consumes, sends
    # task events and answers remote control)
    worker = start_worker(worker_settings)
    # and real Flower as Flower's user
    flower = _start_flower(settings_factory(broker_url=users.url("flower")), tmp_path)
    try:
        # and the producer user publishes an event on the bus
        producer_settings = settings_factory(broker_url=users.url("producer"))
        event = example_event(f"users-{uuid.uuid4().hex[:6]}", series=(544770,))
        publish(producer_settings, event)
        # Then it is issued
        wait_for_state(clean_ledger, event["eventId"], "completed")
        # And Flower saw the task (its own event queue) and asks the worker for its state
        wait_until(lambda: _flower_json(flower.url, "/api/tasks"), timeout_s=30,
                   message="Flower to show the task")
        workers = wait_until(lambda: _flower_json(flower.url, "/api/workers?refresh=1"),
                             timeout_s=30, message="Flower to reach the worker")
        assert any(worker.name in name for name in workers), workers
    finally:
        flower.process.stop(grace_s=10)
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


@dataclass
class _Flower:
    url: str
    process: Spawned


FLOWER_AUTH = ("support", "flower-test-login")


def _start_flower(settings: Settings, tmp_path: Path) -> _Flower:
    port = free_port()
    env = {**settings_env(settings), "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)}
    process = spawn("flower", [coupon_worker_command(), "flower", "--port", str(port)], env,
                    tmp_path, cwd=REPO_ROOT)
    flower = _Flower(f"http://127.0.0.1:{port}", process)
    wait_until(lambda: _flower_json(flower.url, "/api/workers"), timeout_s=30,
               message="Flower to answer")
    return flower


def _flower_json(url: str, path: str) -> Any:
    try:
        answer = requests.get(f"{url}{path}", auth=FLOWER_AUTH, timeout=10)
    except requests.RequestException:
        return None
    return answer.json() if answer.status_code == 200 else None


def test_each_user_is_refused_what_its_job_must_not_do(
        users: Users, settings: Settings) -> None:
    tasks, events = topology.tasks_queue(settings), topology.events_queue(settings)
    dead = topology.dead_queue(settings)
    # Given the topology, declared by the worker's user
    with Connection(users.url("worker")) as conn:
        for declared in (tasks, events, dead):
            declared(conn.channel()).declare()
    # Flower's user reads task events through a queue of its own, and nothing else:
    _consume(users.url("flower"), Queue(f"celeryev.{uuid.uuid4()}",
                                        Exchange("celeryev", type="topic"), routing_key="#",
                                        auto_delete=True))
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
    for component, name in (("producer", settings.tasks_queue), ("flower", settings.tasks_queue),
                            ("console", settings.events_queue), ("console", settings.dead_queue)):
        _refused(lambda component=component, name=name: _delete(users.url(component), name))


def test_the_bridge_intake_forwards_as_the_worker_user(
        users: Users, settings_factory: Callable[..., Settings], clean_ledger: Engine,
        sandbox: object, start_worker: Callable[..., WorkerProcess]) -> None:
    # Given a worker that forwards bus messages as tasks (through the default exchange)
    start_worker(settings_factory(broker_url=users.url("worker"), bus_intake="bridge"))
    # When the producer publishes on the bus
    event = example_event(f"bridge-{uuid.uuid4().hex[:6]}", series=(544770,))
    publish(settings_factory(broker_url=users.url("producer")), event)
    # Then the forwarded task is issued
    wait_for_state(clean_ledger, event["eventId"], "completed")
