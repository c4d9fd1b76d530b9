"""A real worker with traces on, exporting over OTLP/HTTP to a receiver of this test's: the
trace a producer starts in a bus message's ``traceparent`` header goes on through the task
(in a pool process), the Capillary call and the ledger's statements."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kombu import Connection, Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from sqlalchemy import Engine

from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event, wait_for_state
from tests.conftest import WorkerProcess, run_cli, wait_until
from worker.adapters.rabbitmq import topology
from worker.config import Settings


class Receiver(ThreadingHTTPServer):
    """OTLP/HTTP's traces endpoint: keeps each span as (trace id, name, attributes)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[tuple[str, str, dict[str, Any]]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: a.value.string_value or a.value.int_value
                                  for a in span.attributes}
                    self.server.spans.append((span.trace_id.hex(), span.name, attributes))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("intake", ["direct", "bridge"])
def test_a_producers_trace_goes_on_through_a_real_worker(
        intake: str, settings_factory: Callable[..., Settings], clean_ledger: Engine,
        sandbox: SandboxAdmin, receiver: Receiver,
        start_worker: Callable[..., WorkerProcess]) -> None:
    # Given a worker (a pool of two processes) exporting its traces to the receiver, reading
    # the bus directly or through its bridge
    settings = settings_factory(bus_intake=intake)
    start_worker(settings, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                "OTEL_BSP_SCHEDULE_DELAY": "100"})
    # When a producer publishes an event on the bus, its trace's context in the headers
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    event = example_event("otlp-1", series=(544770,))
    with Connection(settings.broker_url) as conn:
        queue = topology.events_queue(settings)
        Producer(conn.default_channel).publish(
            event, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
            headers={"traceparent": traceparent}, delivery_mode=2)
    wait_for_state(clean_ledger, "otlp-1", "completed")

    # Then the worker's spans of it are in the producer's trace: the task, the event, the
    # Capillary call with its request id, and the ledger's writes
    def names() -> set[str]:
        return {name for trace, name, _ in receiver.spans if trace == trace_id}

    wanted = {"run/coupons.ingest", "coupons.event", "ledger.take_in", "capillary.bulk_issue",
              "POST", "ledger.record"}
    wait_until(lambda: wanted <= names(), timeout_s=20,
               message=f"the spans {sorted(wanted)} in the producer's trace")
    (call,) = [attributes for trace, name, attributes in receiver.spans
               if trace == trace_id and name == "capillary.bulk_issue"]
    assert call["capillary.request_id"] == sandbox.calls()[-1]["requestId"]


def test_coupon_worker_publish_starts_the_trace_the_message_carries(
        settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given traces on for the command (an OTLP endpoint set, COUPONS_TRACING=auto)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    # When it publishes an event
    result = run_cli(settings, "publish", "-",
                     stdin=json.dumps(example_event("otlp-cli", series=(544770,))))
    assert result.exit_code == 0, result.output
    # Then the message carries the traceparent of the publish span it exported
    with Connection(settings.broker_url) as conn:
        message = topology.events_queue(settings)(conn.default_channel).get(no_ack=True)
        assert message is not None
        traceparent = (message.headers or {})["traceparent"]
    trace_id = traceparent.split("-")[1]
    assert (trace_id, f"{settings.events_queue} publish") in {
        (trace, name) for trace, name, _ in receiver.spans}
