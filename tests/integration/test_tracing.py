"""Traces (worker.tracing) with the SDK's in-memory exporter, on the real ledger, broker and
sandbox: one event is one trace, from the message its producer published through the ledger's
statements and the Capillary call, in the order they ran; a retry is a trace of its own,
linked to the event's first one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Engine

from coupon_devtools.fakes.broker import FakePublisher
from coupon_devtools.sandbox import SandboxAdmin
from tests.acceptance.helpers import example_event
from worker import tracing
from worker.adapters.postgres.unit_of_work import make_engine
from worker.adapters.rabbitmq import topology
from worker.adapters.rabbitmq.publisher import EventProducer
from worker.bootstrap import build_deps
from worker.config import Settings
from worker.entrypoints.celery.tasks import handle_raw
from worker.usecases.issue import Deps, retry_entity


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    tracing.shutdown()


@pytest.fixture
def traced_deps(settings: Settings, clean_ledger: Engine,
                spans: InMemorySpanExporter) -> Iterator[Deps]:
    """The worker's real dependencies, tracing on (the engine made after the instrumentation,
    as the worker's are: its connections are traced)."""
    assert tracing.setup(settings, exporter=spans)
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        yield build_deps(settings, FakePublisher(), engine=engine)
    finally:
        engine.dispose()


def _take_bus_message(settings: Settings) -> tuple[bytes, dict[str, Any]]:
    with Connection(settings.broker_url) as conn:
        queue = topology.events_queue(settings)(conn.default_channel)
        message = queue.get(no_ack=True)
        assert message is not None, "nothing on the bus"
        body = message.body
        return (body if isinstance(body, bytes) else body.encode("utf-8"),
                dict(message.headers or {}))


def _run_as_the_task(settings: Settings, deps: Deps, body: bytes,
                     headers: dict[str, Any]) -> None:
    # What the Celery instrumentation does with a delivery: the task's span continues the
    # trace its message's traceparent names.
    with tracing.span("run/coupons.ingest", parent=headers.get(tracing.TRACEPARENT)):
        handle_raw(body, content_type="application/json", source="bus", deps=deps,
                   max_bytes=settings.max_event_bytes)


def _kind_of(span: ReadableSpan) -> str:
    """A span's role in the story: ours by name, the instrumentations' by what they did."""
    attributes = span.attributes or {}
    if "db.system" in attributes or "db.system.name" in attributes:
        return "sql"
    if span.name in ("POST", "GET"):
        return f"http {span.name}"
    return span.name


def test_one_event_is_one_trace_from_its_message_to_its_ledger_writes(
        settings: Settings, traced_deps: Deps, spans: InMemorySpanExporter,
        sandbox: SandboxAdmin) -> None:
    # Given a producer that publishes one event with tracing on (the test's own calls to the
    # sandbox's admin API, traced too, left out)
    spans.clear()
    with EventProducer.open(settings) as producer:
        producer.publish_event(example_event("traced-1", series=(544770,)))
    body, headers = _take_bus_message(settings)
    # Then the message carries the producer's span as its traceparent
    (published,) = spans.get_finished_spans()
    assert published.name == f"{settings.events_queue} publish"
    trace_id = f"{published.context.trace_id:032x}"
    assert headers[tracing.TRACEPARENT].split("-")[1] == trace_id

    # When a worker runs it
    _run_as_the_task(settings, traced_deps, body, headers)

    # Then every span is in the producer's trace, in the order they ran
    finished = sorted(spans.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert {f"{s.context.trace_id:032x}" for s in finished} == {trace_id}
    kinds = [_kind_of(s) for s in finished]
    # (successive SQL statements of one step counted once)
    story = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1] or k != "sql"]
    assert story[:5] == [f"{settings.events_queue} publish", "run/coupons.ingest",
                         "coupons.event", "ledger.take_in", "sql"]
    call = story.index("capillary.bulk_issue")
    assert story[call + 1] == "http POST"
    assert story.index("ledger.record") > call
    assert story[-1] == "sql", "the record's statements end the story"
    # The Capillary call carries Capillary's request id, on our span and on the HTTP one
    by_name = {s.name: s for s in finished}
    call_span = by_name["capillary.bulk_issue"]
    (recorded,) = sandbox.calls()[-1:]
    assert call_span.attributes[tracing.REQUEST_ID] == recorded["requestId"]
    assert by_name["POST"].attributes[tracing.REQUEST_ID] == recorded["requestId"]
    assert by_name["coupons.event"].attributes[tracing.EVENT_ID] == "traced-1"


def test_a_retry_is_a_trace_of_its_own_linked_to_the_events_first(
        settings: Settings, traced_deps: Deps, spans: InMemorySpanExporter,
        sandbox: SandboxAdmin, clean_ledger: Engine) -> None:
    # Given an event whose first call fails with a 503 (retried once its settle window is over:
    # read back, then issued)
    sandbox.add_fault(kind="error_before", status=503)
    with EventProducer.open(settings) as producer:
        producer.publish_event(example_event("traced-2", series=(544770,)))
    body, headers = _take_bus_message(settings)
    _run_as_the_task(settings, traced_deps, body, headers)
    first_trace = headers[tracing.TRACEPARENT].split("-")[1]
    spans.clear()
    # When its retry runs, once due (from the retry queue, or a replay: the same task)
    with clean_ledger.connect() as conn:
        (entity_id,) = [r[0] for r in conn.exec_driver_sql(
            "SELECT id FROM entities WHERE event_id = 'traced-2'")]
    time.sleep(settings.settle_window_s + 0.5)
    report = retry_entity(entity_id, deps=traced_deps)
    assert report.issued == 1
    # Then it is another trace, whose root links to the event's first
    finished = spans.get_finished_spans()
    (retry,) = [s for s in finished if s.name == "coupons.retry"]
    assert f"{retry.context.trace_id:032x}" != first_trace
    assert [f"{link.context.trace_id:032x}" for link in retry.links] == [first_trace]
    assert retry.attributes[tracing.EVENT_ID] == "traced-2"
    assert {s.context.trace_id for s in finished} == {retry.context.trace_id}


def test_a_read_back_keeps_the_customer_out_of_the_traced_url(
        settings: Settings, traced_deps: Deps, spans: InMemorySpanExporter,
        sandbox: SandboxAdmin) -> None:
    from datetime import UTC, datetime

    traced_deps.api.find_coupons({"mobile": "919876543210"}, 544770,
                                 datetime(2026, 1, 1, tzinfo=UTC))
    gets = [s for s in spans.get_finished_spans() if s.name == "GET"]
    urls = [str(v) for http in gets for k, v in (http.attributes or {}).items() if "url" in k]
    assert gets and len(urls) >= len(gets)
    assert not any("919876543210" in url for url in urls), urls


def test_nothing_of_opentelemetry_is_imported_while_tracing_is_off() -> None:
    code = ("import sys, json; from worker.entrypoints.celery.app import app; "
            "from worker.entrypoints.cli import main; "
            "from worker import tracing; "
            "from worker.config import load_settings; "
            "assert not tracing.setup(load_settings()); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('opentelemetry'))))")
    env = {"COUPONS_ENV_FILE": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert json.loads(out.stdout) == []
