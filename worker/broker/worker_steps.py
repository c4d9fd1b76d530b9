"""What runs inside a worker besides the tasks: the bus bridge, the sweeper, the guard, metrics.

- ``EventsBridge`` (consumer step): reads plain JSON from ``coupons.events`` and forwards each
  message, bytes untouched, as a ``coupons.ingest`` task; the raw message is acknowledged only
  once the broker confirmed the task message, so nothing is lost between the two. A body over
  ``COUPONS_MAX_EVENT_BYTES`` is not forwarded but recorded as rejected right here.
- ``Sweeper`` (worker step, a thread of the main process): every few seconds recovers crashed
  claims, dispatches due retries to ``coupons.retry`` and publishes dead letters.
- ``ConsumptionGuard`` (consumer step, on the event loop): stops consuming fresh events while
  the circuit is open or the database is down, and resumes when they are back; messages stay in
  RabbitMQ meanwhile.
- ``MetricsServer`` (worker step): the Prometheus endpoint.
- ``TaskConsumer`` (Celery's consumer): also records a task message Celery cannot decode.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections import deque
from typing import Any

from celery import Celery, bootsteps, signals
from kombu import Consumer, Message

from worker import services
from worker.broker import topology
from worker.broker.celery_config import settings_of
from worker.broker.consumer import FleetConsumer
from worker.broker.publisher import BROKER_ERRORS, event_argsrepr
from worker.config import Settings, load_settings
from worker.errors import LedgerUnavailable
from worker.events import EVENT_ID_MAX_CHARS, TOO_DEEP, event_id_in_prefix, oversize_reason
from worker.logs import configure_logging
from worker.metrics import exposition_registry, serve_metrics
from worker.names import TASK_INGEST
from worker.policy import (
    BACKLOG_MIN,
    CONSUME,
    PUBLISH_RETRY_POLICY,
    ConsumptionPause,
    QueueRole,
    bridge_high_water,
    bridge_room,
    consumption_for_circuit,
    consumption_for_ledger_down,
)
from worker.sanitize import printable
from worker.views import entity_state_counts

log = logging.getLogger(__name__)

GUARD_INTERVAL_S = 0.25
_RUN = bootsteps.RUN  # type: ignore[attr-defined]  # not in the stubs
BRIDGE_PREFETCH = 20
# Flower shows these labels; a sender decides what is in them, so they are short and printable.
LABEL_MAX_CHARS = 80
SERIES_LABEL_MAX_CHARS = 120


def _settings(parent: Any) -> Settings:
    return settings_of(parent.app)


def _peek(body: bytes, max_bytes: int) -> tuple[str | None, str | None, str | None]:
    """Event id, customer and series of a message, as printable labels for Flower.

    None where unreadable. The task validates the message and records whatever is wrong with
    it; this peek only has to never raise (deep nesting used to raise RecursionError here,
    outside any handler, and the message was never recorded).
    """
    if len(body) > max_bytes:
        return None, None, None
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            return None, None, None
        candidate = data.get("eventId")
        event_id = (printable(candidate) if isinstance(candidate, str)
                    and 0 < len(candidate) <= EVENT_ID_MAX_CHARS else None)
        customer = data.get("customer")
        label = None
        if isinstance(customer, dict):
            for name in ("id", "mobile", "email", "externalId"):
                value = customer.get(name)
                if isinstance(value, str | int) and value:
                    label = printable(f"{name}:{value}", limit=LABEL_MAX_CHARS)
                    break
        series = data.get("seriesIds")
        series_label = (printable(json.dumps(series), limit=SERIES_LABEL_MAX_CHARS)
                        if series is not None else None)
    except (ValueError, TypeError, RecursionError):
        return None, None, None
    return event_id, label, series_label


class EventsBridge(bootsteps.ConsumerStep):
    """Forwards plain-JSON bus messages to the task queue, untouched.

    Back-pressure: while the task queue holds more than its high-water mark, messages are held
    here unacknowledged instead of forwarded; the consumer's prefetch bounds how many, so the
    rest of a backlog waits on the bus. ``ConsumptionGuard`` releases them as the pool drains.
    """

    def get_consumers(self, channel: Any) -> list[Consumer]:
        settings = _settings(self._consumer)
        self._max_bytes = settings.max_event_bytes
        queue = topology.events_queue(settings)
        return [
            Consumer(channel, queues=[queue], on_message=self._on_message,
                     prefetch_count=BRIDGE_PREFETCH, no_ack=False)
        ]

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._consumer = parent
        self._max_bytes = 65_536
        self._held: deque[Message] = deque()
        self._last_held_tag: object = None
        #: Task messages forwarded since the guard last read the task queue's depth.
        self.forwarded = 0
        self.high_water = BACKLOG_MIN
        parent.coupon_bridge = self

    def stop(self, c: Any) -> None:
        self._held.clear()  # unacknowledged: the broker redelivers them
        super().stop(c)

    def _on_message(self, message: Message) -> None:
        if self._held or self.forwarded >= self.high_water:
            self._held.append(message)
            return
        if not self._settle(message):
            self._held.append(message)

    def release(self, room: int) -> None:
        """Forward held messages while the task queue has ``room``."""
        self.forwarded = 0
        while self._held and self.forwarded < room:
            if not self._settle(self._held[0]):
                return  # still first in line: tried again on the next release
            self._held.popleft()

    def _settle(self, message: Message) -> bool:
        """Forward, record or hand back one message; False when it must wait, held."""
        try:
            return self._forward(message)
        except Exception:
            # No message may end the consumer: it would come back to the next worker and end
            # that one too. Held, unacknowledged and in order, it waits for the next release.
            log.exception("bridge.forward_error")
            return False

    def _forward(self, message: Message) -> bool:
        body = message.body if isinstance(message.body, bytes) \
            else str(message.body).encode("utf-8", "surrogatepass")
        if len(body) > self._max_bytes:
            return self._record_oversize(message, body)
        try:
            text, encoding = body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(body).decode("ascii"), "base64"
        event_id, customer, series = _peek(body, self._max_bytes)
        app: Celery = self._consumer.app
        try:
            app.send_task(
                TASK_INGEST,
                kwargs={"body": text, "encoding": encoding, "content_type": message.content_type,
                        "source": "bus", "event_id": event_id},
                argsrepr="()",
                kwargsrepr=event_argsrepr(event_id, customer, series),
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            )
        except BROKER_ERRORS:
            log.exception("bridge.forward_failed", extra={"event_id": event_id})
            message.reject(requeue=True)
            return True
        message.ack()
        self.forwarded += 1
        return True

    def _record_oversize(self, message: Message, body: bytes) -> bool:
        """Record a body over the size limit as rejected, here, instead of forwarding it.

        Forwarding would copy the whole body into the task queue, through the consumer's
        decoder and the pool's pipe, only to be refused there; a small marker task instead
        would lose the bytes support needs to fix and resubmit the event. One insert on this
        loop keeps them whole, for messages that should not exist. If the ledger cannot take
        it now, the message stays held (unacknowledged, in order) and is tried again on the
        next release, the way the bus waits while the database is down.
        """
        deps = self._consumer.app.coupon_container.deps()
        try:
            services.record_rejection(
                body, oversize_reason(len(body), self._max_bytes), source="bus", deps=deps,
                event_id=event_id_in_prefix(body), content_type=message.content_type)
        except LedgerUnavailable as exc:
            if self._last_held_tag != message.delivery_tag:  # once per message, not per retry
                self._last_held_tag = message.delivery_tag
                log.error("bridge.oversize_held",
                          extra={"size_bytes": len(body), "error": str(exc)})
            return False
        message.ack()
        return True


class TaskConsumer(FleetConsumer):
    """Celery's consumer, keeping the task messages it cannot decode as rejections.

    Celery acknowledges such a message and only logs it (a ``coupons.issue`` whose event is
    nested past the interpreter's recursion limit, or a hand-made message that is not JSON),
    so the payload would be gone. It is recorded instead, from this loop, like an oversize
    bus body, and acknowledged; should the ledger refuse, Celery's own handling (log with the
    body, acknowledge) follows.
    """

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, RecursionError):
            cause = cause.__cause__ or cause.__context__
        detail = TOO_DEEP if cause is not None else printable(str(exc), limit=300)
        body = message.body if isinstance(message.body, bytes) \
            else str(message.body).encode("utf-8", "surrogatepass")
        try:
            services.record_rejection(
                body, f"task message cannot be decoded: {detail}", source="task",
                deps=self.app.coupon_container.deps(),  # type: ignore[attr-defined]
                content_type=message.content_type)
        except Exception:
            log.exception("task.undecodable_not_recorded", extra={"size_bytes": len(body)})
            super().on_decode_error(message, exc)
            return
        message.ack()


class Sweeper(bootsteps.StartStopStep):
    """Runs ``services.sweep`` every ``COUPONS_SWEEP_INTERVAL_SECONDS`` in the main process.

    The pool forks children while this thread runs (at start and whenever a child is
    replaced). A fork copies locks held by other threads in their held state, and a module
    import holds one, so every module the loop needs is imported here, in the main thread,
    before the thread starts (``worker.services`` at this module's import, the dependencies by
    building them once in ``start``); the loop itself then never imports.
    """

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        parent.coupon_sweeper = self
        self._worker = parent
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: What the guard should stop consuming now, as ``worker.policy`` decided it.
        self.pause: ConsumptionPause = CONSUME

    def start(self, parent: Any) -> None:
        if not _settings(parent).run_sweeper:
            log.info("sweeper.disabled")
            return
        try:
            parent.app.coupon_container.deps()
        except Exception:
            log.exception("sweeper.warm_up_failed")
        self._thread = threading.Thread(target=self._loop, name="coupon-sweeper", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _worker_running(self) -> bool:
        # A worker that is stopping, or failed before it fully started (Celery then skips the
        # steps' stop), must not keep sweeping: that would make a dead worker look busy.
        blueprint = getattr(self._worker, "blueprint", None)
        return bool(getattr(blueprint, "state", None) == _RUN)

    def _loop(self) -> None:
        container = self._worker.app.coupon_container
        interval_s = container.settings.sweep_interval_s
        while not self._stop.is_set() and self._worker_running():
            try:
                deps = container.deps()
                report = services.sweep(deps, requeue_after_s=container.settings.requeue_after_s)
                circuit = deps.circuit.state()
                self.pause = consumption_for_circuit(
                    circuit_state=circuit.state, reason=circuit.reason,
                    open_until=circuit.open_until, now=deps.clock())
                if report.dispatched or report.leases_expired or report.dead_letters_published:
                    log.info("sweep.done", extra=report.__dict__)
            except LedgerUnavailable as exc:
                self.pause = consumption_for_ledger_down(str(exc))
                log.error("sweep.ledger_unavailable", extra={"error": str(exc)})
            except Exception:
                log.exception("sweep.failed")
            self._stop.wait(interval_s)


class ConsumptionGuard(bootsteps.StartStopStep):
    """Cancels and restores queue consumers as the sweeper's pause flags say."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tref: Any = None
        self._paused: set[str] = set()

    def start(self, c: Any) -> None:
        # Not forgotten on a restart (a broker reconnect): Celery keeps a cancelled queue
        # deselected, so the new task consumer leaves it out too, and only this step's
        # add_task_queue brings it back once the pause is over.
        self._tref = c.timer.call_repeatedly(GUARD_INTERVAL_S, self._check, (c,))

    def stop(self, c: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def _check(self, c: Any) -> None:
        self._apply_backpressure(c)
        sweeper = getattr(c.controller, "coupon_sweeper", None)
        if sweeper is None:
            return
        settings = _settings(c)
        pause: ConsumptionPause = sweeper.pause
        queue_of: dict[QueueRole, str] = {"tasks": settings.tasks_queue,
                                          "retry": settings.retry_queue}
        wanted = {queue_of[role] for role in pause.roles}
        for queue in sorted(wanted - self._paused):
            log.error("consumer.paused", extra={"queue": queue, "reason": pause.reason})
            c.cancel_task_queue(queue)
        for queue in sorted(self._paused - wanted):
            log.warning("consumer.resumed", extra={"queue": queue})
            c.add_task_queue(queue)
        self._paused = wanted


    def _apply_backpressure(self, c: Any) -> None:
        """Let the bridge forward only while the task queue is short (``bridge_high_water``)."""
        bridge = getattr(c, "coupon_bridge", None)
        if bridge is None:
            return
        settings = _settings(c)
        try:
            _name, waiting, _consumers = c.connection.default_channel.queue_declare(
                queue=settings.tasks_queue, passive=True)
        except BROKER_ERRORS:
            return
        bridge.high_water = bridge_high_water(c.pool.num_processes)
        bridge.release(room=bridge_room(bridge.high_water, waiting))


class MetricsServer(bootsteps.StartStopStep):
    """Serves Prometheus metrics from the worker's main process."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._worker = parent
        self._server: Any = None

    def start(self, parent: Any) -> None:
        settings = _settings(parent)
        if not settings.metrics_port:
            return
        container = parent.app.coupon_container

        def backlog() -> dict[str, int]:
            return entity_state_counts(container.engine)

        registry = exposition_registry(container.metrics.registry, backlog)
        try:
            self._server = serve_metrics(settings.metrics_port, registry)
        except OSError as exc:
            log.error("metrics.unavailable", extra={"port": settings.metrics_port,
                                                    "error": str(exc)})
            return
        log.info("metrics.serving", extra={"port": settings.metrics_port})

    def stop(self, parent: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


_MULTIPROC_OWNED: list[str] = []


def prepare_metrics_dir() -> None:
    """Give every process of this worker one directory for its metric samples.

    Must run before ``prometheus_client`` is first imported (it picks its storage then), which
    is why ``coupon-worker worker`` calls it before Celery's command line loads its plugins.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = tempfile.mkdtemp(prefix="coupon-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    _MULTIPROC_OWNED.append(path)


PREFORK_POOL = "celery.concurrency.prefork:TaskPool"


def _require_prefork(sender: Any = None, **_: Any) -> None:
    """Refuse a pool that cannot enforce the hard time limit (threads, solo, gevent…).

    The limit is what keeps a whole attempt inside its lease; without it a stalled attempt could
    outlive its claim while another worker calls Capillary for the same entity.
    """
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else f"{getattr(pool, '__module__', '')}:" \
        f"{getattr(pool, '__name__', '')}"
    if "prefork" not in name:
        log.critical("worker.pool_refused", extra={"pool": name})
        raise SystemExit(f"coupon-worker runs on the prefork pool only, not {name}: the hard "
                         "time limit that keeps an attempt inside its lease needs it")


def _check_metrics_dir(sender: Any = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    if "prometheus_client" not in sys.modules:
        prepare_metrics_dir()
        return
    # Celery's own command line imports Flower's plugin, and with it prometheus_client.
    log.warning("metrics.single_process",
                extra={"hint": "pool processes' metrics are not served: start with "
                               "`coupon-worker worker` or set PROMETHEUS_MULTIPROC_DIR"})


def _remove_metrics_dir(**_: Any) -> None:
    for path in _MULTIPROC_OWNED:
        shutil.rmtree(path, ignore_errors=True)
    _MULTIPROC_OWNED.clear()


def _setup_logging(**_: Any) -> None:
    """Celery leaves logging alone when this signal has a receiver: ours is structured."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)


def install(app: Celery) -> None:
    """Add the steps and signal handlers to ``app``."""
    app.steps["consumer"].add(EventsBridge)
    app.steps["consumer"].add(ConsumptionGuard)
    app.steps["worker"].add(Sweeper)
    app.steps["worker"].add(MetricsServer)
    signals.worker_init.connect(_require_prefork, weak=False)
    signals.worker_init.connect(_check_metrics_dir, weak=False)
    signals.setup_logging.connect(_setup_logging, weak=False)
    signals.worker_shutdown.connect(_remove_metrics_dir, weak=False)
