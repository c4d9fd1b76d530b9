"""The two systems under test, coupon-worker and the bare Celery baseline, and how a batch
is published to either and waited for."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import text

from coupon_devtools.bench.defaults import POLL_S, STAGES, STALL_TIMEOUT_S, BenchError, Pool, Via
from coupon_devtools.bench.events import Batch, Percentiles
from coupon_devtools.bench.stack import Stack
from coupon_devtools.harness.processes import Spawned, cli_command


class System(Protocol):
    """Something that turns published events into bulk-issue calls."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def roots(self) -> list[int]: ...

    def processes(self) -> list[Spawned]: ...

    def prepare(self, batch: Batch) -> list[tuple[bytes, dict[str, Any]]]: ...

    def target_queue(self) -> Any: ...

    def done(self, batch: Batch) -> int: ...

    def completion_times(self, batch: Batch) -> dict[int, float]: ...

    def stages(self, batch: Batch) -> dict[str, Percentiles]: ...


@dataclass
class WorkerShape:
    """How many worker processes, each with how many pool slots of which kind."""

    workers: int
    concurrency: int
    pool: Pool


class _Processes:
    """The worker processes a system runs, started by ``start`` and stopped here."""

    stack: Stack
    _processes: list[Spawned]

    def stop(self) -> None:
        self.stack.stop_processes(self._processes)
        self._processes = []

    def roots(self) -> list[int]:
        return [p.pid for p in self._processes]

    def processes(self) -> list[Spawned]:
        return list(self._processes)


class Ours(_Processes):
    """``coupon-worker worker`` processes, fed on the events bus (or as tasks)."""

    name = "coupon-worker"

    def __init__(self, stack: Stack, shape: WorkerShape, *, via: Via = "bus",
                 rate_limit_per_minute: int | None = None, rate_limit_burst: int | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.stack = stack
        self.shape = shape
        self.via = via
        self.rate_limit_per_minute = rate_limit_per_minute
        self.rate_limit_burst = rate_limit_burst
        self.extra_env = dict(extra_env or {})
        self._processes: list[Spawned] = []
        self._app: Any = None

    def env(self) -> dict[str, str]:
        env = self.stack.base_env()
        if self.rate_limit_per_minute:
            env["COUPONS_RATE_LIMIT_PER_MINUTE"] = str(self.rate_limit_per_minute)
        if self.rate_limit_burst:
            env["COUPONS_RATE_LIMIT_BURST"] = str(self.rate_limit_burst)
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        shape = self.shape
        tag = uuid.uuid4().hex[:6]

        def argv(i: int) -> list[str]:
            return [*cli_command(), "worker", "-c", str(shape.concurrency), "-P", shape.pool,
                    "-n", f"bench{i}-{tag}@%h"]

        self._processes = self.stack.start_processes(
            "ours", argv, shape.workers, self.env(),
            {"coupons.tasks": shape.workers, "coupons.events": shape.workers})

    def target_queue(self) -> Any:
        from worker.adapters.rabbitmq import topology

        settings = self.stack.settings
        assert settings is not None
        if self.via == "bus":
            return topology.events_queue(settings)
        return topology.tasks_queue(settings)

    def prepare(self, batch: Batch) -> list[tuple[bytes, dict[str, Any]]]:
        if self.via == "bus":
            return [(json.dumps(e).encode("utf-8"), {}) for e in batch.events]
        from worker.adapters.rabbitmq.publisher import event_argsrepr
        from worker.entrypoints.celery.app import TASK_ISSUE, create_app

        if self._app is None:
            self._app = create_app(self.stack.settings)
        return [
            _task_message(self._app, TASK_ISSUE, {"event": e, "source": "task"},
                          kwargsrepr=event_argsrepr(e["eventId"], e["customer"]["id"],
                                                    e["seriesIds"]))
            for e in batch.events
        ]

    def done(self, batch: Batch) -> int:
        with self.stack.engine.connect() as conn:
            count = conn.execute(
                text("SELECT count(*) FROM events WHERE event_id LIKE :p "
                     "AND state <> 'processing'"), {"p": batch.prefix + "%"}).scalar()
        return int(count or 0)

    def completion_times(self, batch: Batch) -> dict[int, float]:
        with self.stack.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT event_id, EXTRACT(EPOCH FROM updated_at) FROM events "
                     "WHERE event_id LIKE :p AND state = 'completed'"),
                {"p": batch.prefix + "%"}).all()
        return {int(r[0].rsplit("-", 1)[1]): float(r[1]) for r in rows}

    def stages(self, batch: Batch) -> dict[str, Percentiles]:
        """Where an event's time goes, from the ledger's own timestamps."""
        with self.stack.engine.connect() as conn:
            rows = conn.execute(text(
                """
                SELECT e.event_id, EXTRACT(EPOCH FROM e.received_at),
                       EXTRACT(EPOCH FROM a.started_at), a.latency_ms / 1000.0,
                       EXTRACT(EPOCH FROM e.updated_at)
                  FROM events e JOIN api_calls a
                    ON a.event_id = e.event_id AND a.operation = 'bulk_issue'
                 WHERE e.event_id LIKE :p AND e.state = 'completed'
                """), {"p": batch.prefix + "%"}).all()
        parts: dict[str, list[float]] = {name: [] for name in STAGES}
        for row in rows:
            published = batch.published_at[int(row[0].rsplit("-", 1)[1])]
            received, started, call_s, recorded = (float(v) for v in row[1:])
            for name, value in zip(STAGES, (received - published, started - received, call_s,
                                            recorded - started - call_s), strict=True):
                parts[name].append(value)
        return {name: Percentiles.of(values) for name, values in parts.items()}


class Baseline(_Processes):
    """``celery -A coupon_devtools.bench.baseline worker``: the bare task, fed Celery messages."""

    name = "baseline"

    def __init__(self, stack: Stack, shape: WorkerShape) -> None:
        self.stack = stack
        self.shape = shape
        self._processes: list[Spawned] = []
        self._app: Any = None
        self._calls_seen = 0

    def start(self) -> None:
        from coupon_devtools.bench.baseline import BASELINE_QUEUE

        shape = self.shape
        tag = uuid.uuid4().hex[:6]

        def argv(i: int) -> list[str]:
            return [sys.executable, "-m", "celery", "-A", "coupon_devtools.bench.baseline",
                    "worker",
                    "-Q", BASELINE_QUEUE, "-c", str(shape.concurrency), "-P", shape.pool,
                    "-n", f"baseline{i}-{tag}@%h", "--without-gossip", "--without-mingle",
                    f"--loglevel={self.stack.log_level}"]

        self._processes = self.stack.start_processes(
            "baseline", argv, shape.workers, self.stack.base_env(),
            {BASELINE_QUEUE: shape.workers})

    def target_queue(self) -> Any:
        from coupon_devtools.bench.baseline import baseline_queue

        return baseline_queue()

    def prepare(self, batch: Batch) -> list[tuple[bytes, dict[str, Any]]]:
        from coupon_devtools.bench.baseline import TASK_BASELINE_ISSUE, create_app

        if self._app is None:
            self._app = create_app(self.stack.base_env())
        return [_task_message(self._app, TASK_BASELINE_ISSUE, {"event": e},
                              kwargsrepr=f"event={e['eventId']}") for e in batch.events]

    def done(self, batch: Batch) -> int:
        stats = self.stack.admin.stats()
        return int(stats["calls"]["bulk"]) - self._calls_seen

    def mark(self) -> None:
        """Count only calls from now on (the sandbox's counters are cumulative)."""
        self._calls_seen = int(self.stack.admin.stats()["calls"]["bulk"])

    def completion_times(self, batch: Batch) -> dict[int, float]:
        since = min(batch.published_at) if batch.published_at else None
        times: dict[int, float] = {}
        for call in self.stack.admin.calls(since):
            if call["path"] != "bulk" or call["status"] != 200:
                continue
            index = batch.index_of_customer(str(call["customerId"]))
            if index is not None:
                times[index] = float(call["t"])
        return times

    def stages(self, batch: Batch) -> dict[str, Percentiles]:
        return {}


def _task_message(app: Any, task: str, kwargs: dict[str, Any], *, kwargsrepr: str
                  ) -> tuple[bytes, dict[str, Any]]:
    """A Celery protocol-2 message, serialized up front: (JSON body, publish options)."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, args=(), kwargs=kwargs, argsrepr="()",
                                  kwargsrepr=kwargsrepr, ignore_result=True)
    options = {"headers": message.headers, **message.properties}
    return json.dumps(message.body).encode("utf-8"), options


def publish(stack: Stack, system: System, batch: Batch, *, pace_per_s: float | None = None
            ) -> None:
    """Publish a batch, one broker-confirmed message at a time; stamps ``published_at``."""
    from worker.adapters.rabbitmq.publisher import PUBLISH_RETRY_POLICY

    messages = system.prepare(batch)
    queue = system.target_queue()
    batch.published_at = []
    with stack.connection() as conn:
        producer = conn.Producer()
        start = time.monotonic()
        for i, (body, options) in enumerate(messages):
            if pace_per_s:
                delay = start + i / pace_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            batch.published_at.append(time.time())
            producer.publish(
                body, exchange=queue.exchange, routing_key=queue.routing_key,
                declare=[queue], content_type="application/json", content_encoding="utf-8",
                delivery_mode=2, retry=True, retry_policy=PUBLISH_RETRY_POLICY, **options,
            )


def publish_fast(stack: Stack, queue: Any, bodies: Iterator[bytes]) -> int:
    """Fill a queue quickly (no publisher confirms): for backlogs that are not measured."""
    count = 0
    with stack.connection(confirm=False) as conn:
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                             declare=[queue] if count == 0 else [],
                             content_type="application/json", content_encoding="utf-8",
                             delivery_mode=2)
            count += 1
    return count


def wait_done(system: System, batch: Batch, *, timeout_s: float | None = None) -> None:
    """Wait until every event of the batch completed; fails when progress stalls."""
    last, last_change = -1, time.monotonic()
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while True:
        done = system.done(batch)
        if done >= len(batch):
            return
        now = time.monotonic()
        if done != last:
            last, last_change = done, now
        dead = [p for p in system.processes() if not p.alive()]
        stalled = now - last_change > STALL_TIMEOUT_S
        if dead or stalled or (deadline is not None and now > deadline):
            running = system.processes()
            culprit = dead[0] if dead else running[0] if running else None
            tail = f"\n{culprit.name} log ({culprit.log_path}):\n{culprit.log_tail()}" \
                if culprit else ""
            why = "a worker died" if dead else "no progress" if stalled else "timed out"
            raise BenchError(f"{system.name}: {why} with {done}/{len(batch)} events done{tail}")
        time.sleep(POLL_S)
