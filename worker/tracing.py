"""Traces with OpenTelemetry (docs/tracing.md): one trace per event, from the bus message
through its task, each Capillary call and the ledger's statements; retries and replays linked
to the event's first trace.

Off unless configured (``COUPONS_TRACING=on``, or ``auto`` with an OTLP endpoint in
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and then only with the
``tracing`` extra installed. While off, nothing of OpenTelemetry is imported: ``span`` hands
out a span that does nothing, ``traceparent`` is None, ``inject`` adds no header.

The rest of the code sees only this module: a span with attributes and links, and the W3C
``traceparent`` of the current one. The instrumentations of Celery (the task's span, its parent
taken from the message's ``traceparent`` header), requests (each HTTP call) and psycopg (each
SQL statement) add their spans under ours.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from worker.config import Settings

log = logging.getLogger(__name__)

TraceMode = Literal["auto", "on", "off"]
Attribute = str | int | float | bool | list[int] | None
#: The header (AMQP message headers, HTTP headers) that carries a trace's context (W3C).
TRACEPARENT = "traceparent"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: The attributes our spans carry (a reference in docs/tracing.md).
EVENT_ID = "coupon.event_id"
ENTITY_ID = "coupon.entity_id"
SERIES_IDS = "coupon.series_ids"
SOURCE = "coupon.source"
REQUEST_ID = "capillary.request_id"
OPERATION = "capillary.operation"
OUTCOME = "capillary.outcome"
ERROR_CODE = "capillary.error_code"
STATUS = "http.response.status_code"


def wanted(mode: TraceMode, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``COUPONS_TRACING`` (``mode``) turns traces on in this environment."""
    environ = os.environ if environ is None else environ
    if mode == "auto":
        return any(environ.get(name) for name in ENDPOINT_VARIABLES)
    return mode == "on"


class Span:
    """What the code does with the current span: attributes and links. This one does nothing
    (tracing off)."""

    def set(self, key: str, value: Attribute) -> None:
        """Set an attribute (None: left unset)."""

    def link(self, traceparent: str | None) -> None:
        """Link this span to the trace ``traceparent`` names (a retry to its event's first
        trace)."""


_OFF = Span()


@dataclass
class _Tracing:
    """What ``setup`` built: the provider and the instrumentations to undo in ``shutdown``."""

    provider: Any
    tracer: Any
    instrumentors: list[Any]
    pid: int


class _Current:
    """This process's tracing, once set up (OpenTelemetry's provider is per process too)."""

    state: _Tracing | None = None
    lock = threading.Lock()


_current = _Current()


def enabled() -> bool:
    """Whether traces are being recorded in this process."""
    return _current.state is not None


def setup(settings: Settings, *, exporter: Any = None, component: str = "worker",
          celery: bool = False) -> bool:
    """Start recording traces if the settings ask for it (or an ``exporter`` is given, as
    tests do: spans go to it as each ends); whether they are recorded. Idempotent per process.

    ``celery``: instrument Celery too (the worker; producers publish through
    ``worker.adapters.rabbitmq.publisher``, which sets the header itself).
    """
    if exporter is None and not wanted(settings.tracing):
        return False
    with _current.lock:
        if _current.state is not None:
            return True
        _current.state = _build(exporter, component, celery)
    log.info("tracing.started", extra={"component": component, "exporter": type(
        exporter).__name__ if exporter is not None else "otlp"})
    return True


def _build(exporter: Any, component: str, celery: bool) -> _Tracing:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from worker import __version__

    resource = Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or "coupon-worker",
        "service.version": __version__, "coupon.component": component})
    provider = TracerProvider(resource=resource)
    # Batches in production (the exporter's thread survives the pool's forks: the SDK
    # restarts it in each child); one by one for a test's in-memory exporter.
    provider.add_span_processor(SimpleSpanProcessor(exporter) if exporter is not None
                                else BatchSpanProcessor(_otlp_exporter()))
    instrumentors: list[Any] = [RequestsInstrumentor(), PsycopgInstrumentor()]
    RequestsInstrumentor().instrument(tracer_provider=provider, request_hook=_without_query,
                                      response_hook=_request_id)
    PsycopgInstrumentor().instrument(tracer_provider=provider, enable_commenter=False)
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(  # type: ignore[no-untyped-call]
            tracer_provider=provider)
        instrumentors.append(CeleryInstrumentor())  # type: ignore[no-untyped-call]
    return _Tracing(provider, provider.get_tracer("coupon-worker"), instrumentors, os.getpid())


def _otlp_exporter() -> Any:
    """OTLP over HTTP (protobuf) unless ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` says grpc:
    HTTP keeps working in the pool's forked processes, gRPC's channels do not."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") \
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def _without_query(span: Any, request: Any) -> None:
    # A read-back's query names the customer (mobile, email): a trace keeps the path only.
    url = str(getattr(request, "url", "") or "")
    if "?" in url and span.is_recording():
        bare = url.split("?", 1)[0]
        span.set_attribute("http.url", bare)
        span.set_attribute("url.full", bare)


def _request_id(span: Any, request: Any, response: Any) -> None:
    request_id = getattr(response, "headers", {}).get("X-Cap-Requestid")
    if request_id and span.is_recording():
        span.set_attribute(REQUEST_ID, request_id)


def shutdown() -> None:
    """Flush what is recorded and stop recording (the worker's shutdown; tests)."""
    with _current.lock:
        state, _current.state = _current.state, None
    if state is None:
        return
    for instrumentor in state.instrumentors:
        instrumentor.uninstrument()
    state.provider.shutdown()


class _Recording(Span):
    def __init__(self, span: Any) -> None:
        self._span = span

    def set(self, key: str, value: Attribute) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def link(self, traceparent: str | None) -> None:
        context = _span_context(traceparent)
        if context is not None:
            self._span.add_link(context)


def _span_context(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = trace.get_current_span(
        TraceContextTextMapPropagator().extract({TRACEPARENT: traceparent})).get_span_context()
    return context if context.is_valid else None


@contextmanager
def span(name: str, attributes: Mapping[str, Attribute] | None = None, *,
         kind: Literal["internal", "client", "producer"] = "internal",
         parent: str | None = None) -> Iterator[Span]:
    """A span around a block, child of the current one (or of ``parent``, a traceparent,
    when there is none: a message's). Exceptions are recorded on it and raised on."""
    state = _current.state
    if state is None:
        yield _OFF
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = None
    if parent and not trace.get_current_span().get_span_context().is_valid:
        context = TraceContextTextMapPropagator().extract({TRACEPARENT: parent})
    with state.tracer.start_as_current_span(
            name, context=context, kind=getattr(trace.SpanKind, kind.upper()),
            attributes={k: v for k, v in (attributes or {}).items() if v is not None},
    ) as current:
        yield _Recording(current)


def traceparent() -> str | None:
    """The current span's context as a W3C ``traceparent``, or None (tracing off, no span)."""
    if _current.state is None:
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get(TRACEPARENT)


def inject(headers: MutableMapping[str, Any]) -> None:
    """Add the current span's ``traceparent`` to a message's headers (nothing when off)."""
    if _current.state is None:
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(headers)


def install_celery(settings: Callable[[], Settings]) -> None:
    """Record traces in a Celery worker when its ``settings`` ask for it: set up when the
    worker starts (before the pool forks), flushed when it stops."""
    from celery import signals

    def started(**_kwargs: Any) -> None:
        setup(settings(), component="worker", celery=True)

    def stopping(**_kwargs: Any) -> None:
        state = _current.state
        if state is not None:
            state.provider.force_flush()

    signals.worker_init.connect(started, weak=False)
    signals.worker_process_shutdown.connect(stopping, weak=False)
    signals.worker_shutdown.connect(stopping, weak=False)
