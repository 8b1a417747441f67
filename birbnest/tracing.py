"""OpenTelemetry traces: one trace per write, from the HTTP request to the worker's batch.

Off unless ``OTEL_TRACES_ENABLED``. The hot path asks :data:`enabled` (a module attribute, set
once at start) before it makes any span, so with tracing off no span object is created and the
SDK is not even imported. With it on:

- the API (``birbnest/wsgi.py``) wraps its WSGI application in :func:`wsgi_middleware`: a SERVER
  span per request, named after the route (``POST /v1/cache/{key}``), continuing a caller's
  ``traceparent`` if it sent one;
- ``persistence/redis_store.py`` makes a CLIENT span per round trip inside a traced operation;
- ``persistence/jetstream.py`` makes a PRODUCER span per publish and injects the W3C
  ``traceparent`` into the message headers;
- the worker extracts it: a batch span links to each write's span, a span per write continues
  the write's own trace until its ack (or dead letter), and the PostgreSQL upsert is a child of
  the batch span. Dead letters keep their headers, so a replay continues the write's trace.

Spans are exported over OTLP/HTTP (protobuf) by a :class:`BatchSpanProcessor`: a background
thread sends them, with a bounded queue that drops spans when the collector cannot keep up or is
unreachable, so export never blocks or fails a request.

The provider is this module's own, not the global one the OpenTelemetry API keeps (that one
can be set only once per process, which tests cannot live with); context propagation is the
API's, so ``trace.get_current_span()`` sees these spans.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import Token
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

    from birbnest.env import Config

__all__ = ["Link", "Span", "SpanKind", "StatusCode"]

# Read by every traced call site before it does anything else: ``if tracing.enabled: ...``.
enabled = False

# A span waits at most this long in the queue before it is sent; at most MAX_QUEUE wait, the
# rest are dropped (counted by the SDK, logged once). One export request waits EXPORT_TIMEOUT.
SCHEDULE_DELAY_MS = 500
MAX_QUEUE = 8192
MAX_EXPORT_BATCH = 512
EXPORT_TIMEOUT = 5.0

_tracer: trace.Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None
_propagator = TraceContextTextMapPropagator()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL, as the
    OpenTelemetry conventions have it: the signal's path is appended)."""
    return endpoint.rstrip("/") + "/v1/traces"


def service_name(config: Config, component: str) -> str:
    return config.otel_service_name or f"birb-nest-{component}"


def sampler(name: str, ratio: float) -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` name (env.TRACE_SAMPLERS)."""
    from opentelemetry.sdk.trace import sampling

    root: Sampler
    if name.endswith("always_on"):
        root = sampling.ALWAYS_ON
    elif name.endswith("always_off"):
        root = sampling.ALWAYS_OFF
    else:
        root = sampling.TraceIdRatioBased(ratio)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


class _Sparse(logging.Filter):
    """Lets one record through per ``interval`` seconds. The SDK logs a warning for every span
    it drops while the collector is unreachable and its queue full: thousands of lines a second
    under load, which would cost the requests what the bounded queue saves them."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self.next_at = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self.next_at:
            return False
        self.next_at = now + self.interval
        return True


_QUEUE_LOGGER = "opentelemetry.sdk._shared_internal"


def configure(config: Config, *, component: str, exporter: SpanExporter | None = None) -> bool:
    """Start tracing in this process if the configuration asks for it; True if it is on.

    ``component`` names the process (``api``, ``worker``, ``cli``) in the default service name.
    ``exporter`` replaces the OTLP exporter (tests).
    """
    global enabled, _tracer, _provider
    if not config.otel_traces_enabled:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    shutdown()
    queue_logger = logging.getLogger(_QUEUE_LOGGER)
    if not any(isinstance(f, _Sparse) for f in queue_logger.filters):
        queue_logger.addFilter(_Sparse())
    resource = Resource.create({"service.name": service_name(config, component), "birb.component": component})
    provider = TracerProvider(
        resource=resource, sampler=sampler(config.otel_traces_sampler, config.otel_traces_sampler_arg)
    )
    if exporter is None:
        exporter = OTLPSpanExporter(endpoint=traces_url(config.otel_exporter_otlp_endpoint), timeout=EXPORT_TIMEOUT)
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_QUEUE,
            schedule_delay_millis=SCHEDULE_DELAY_MS,
            max_export_batch_size=MAX_EXPORT_BATCH,
            export_timeout_millis=EXPORT_TIMEOUT * 1000,
        )
    )
    _provider, _tracer, enabled = provider, provider.get_tracer("birbnest"), True
    return True


def shutdown(timeout: float = EXPORT_TIMEOUT) -> None:
    """Send what is queued (waiting at most ``timeout``) and stop tracing in this process."""
    global enabled, _tracer, _provider
    provider, _provider = _provider, None
    enabled, _tracer = False, trace.NoOpTracer()
    if provider is not None:
        provider.force_flush(int(timeout * 1000))
        provider.shutdown()


# --- making spans (call only when `enabled`) ------------------------------------------------------


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] | None = None,
    context: otel_context.Context | None = None,
) -> Any:
    """A span made current for a ``with`` block; an exception marks it as an error."""
    return _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes, links=links)


def start_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] | None = None,
    context: otel_context.Context | None = None,
) -> Span:
    """A span that is not made current; the caller ends it."""
    return _tracer.start_span(name, context=context, kind=kind, attributes=attributes, links=links)


def in_span() -> bool:
    """A recording span is current: a call made now belongs to a traced operation."""
    return trace.get_current_span().is_recording()


@contextmanager
def used(span: Span) -> Iterator[Span]:
    """Make ``span`` current for a block without ending it (it is ended elsewhere)."""
    with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        yield span


def current_context() -> otel_context.Context:
    return otel_context.get_current()


def attach(context: otel_context.Context) -> Token[otel_context.Context]:
    """Make ``context`` current in this thread (another thread's, e.g. an executor's); returns
    the token for :func:`detach`."""
    return otel_context.attach(context)


def detach(token: Token[otel_context.Context]) -> None:
    otel_context.detach(token)


# --- W3C trace context in message headers -----------------------------------------------------------


def inject(headers: dict[str, str]) -> None:
    """Add ``traceparent`` (and ``tracestate``) of the current span to ``headers``."""
    _propagator.inject(headers)


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The context a message's headers carry (an empty one if they carry none)."""
    return _propagator.extract(headers or {})


def link_of(context: otel_context.Context) -> Link | None:
    """A link to the span a context holds, if it is a valid one."""
    span_context = trace.get_current_span(context).get_span_context()
    return Link(span_context) if span_context.is_valid else None


def current_ids() -> tuple[str, str] | None:
    """The current span's ``(trace_id, span_id)`` in hex, as Jaeger shows them; None outside one."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return trace.format_trace_id(span_context.trace_id), trace.format_span_id(span_context.span_id)


# --- the API's request span ------------------------------------------------------------------------

_CONVERTER = re.compile(r"<(?:\w+:)?(\w+)>")
_routes: dict[str, str] = {}


def http_route(path: str) -> str:
    """The URL pattern that serves ``path`` (``/v1/cache/{key}``), never the path itself: span
    names stay few. Unknown paths give ``""``."""
    from django.urls import Resolver404, resolve

    try:
        match = resolve(path)
    except Resolver404:
        return ""
    pattern = match.route
    route = _routes.get(pattern)
    if route is None:
        route = _routes[pattern] = "/" + _placeholders(pattern).lstrip("^").rstrip("$")
    return route


def _placeholders(pattern: str) -> str:
    """``v1/cache/<str:key>`` and ``v1/cache/(?P<key>(?s:.+))`` both as ``v1/cache/{key}``."""
    out, i = [], 0
    while (start := pattern.find("(?P<", i)) != -1:
        name_end = pattern.index(">", start)
        depth, j = 0, start
        while j < len(pattern):  # to the parenthesis that closes the group
            if pattern[j] == "\\":
                j += 2
                continue
            depth += {"(": 1, ")": -1}.get(pattern[j], 0)
            if depth == 0:
                break
            j += 1
        out += [pattern[i:start], "{", pattern[start + 4 : name_end], "}"]
        i = j + 1
    out.append(pattern[i:])
    return _CONVERTER.sub(r"{\1}", "".join(out))


def wsgi_middleware(app: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a WSGI application: one SERVER span per request, with method, route and status."""

    def application(environ: dict[str, Any], start_response: Any) -> Any:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        route = http_route(path)
        carrier: dict[str, str] = {}
        if "HTTP_TRACEPARENT" in environ:  # the caller's trace, continued (W3C trace context)
            carrier["traceparent"] = environ["HTTP_TRACEPARENT"]
            carrier["tracestate"] = environ.get("HTTP_TRACESTATE", "")
        attributes = {"http.request.method": method, "url.path": path, "url.scheme": environ.get("wsgi.url_scheme", "")}
        if route:
            attributes["http.route"] = route
        status: list[int] = []

        def recording_start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(int(line.split(" ", 1)[0]))
            return start_response(line, headers, exc_info)

        with span(
            f"{method} {route}" if route else method,
            kind=SpanKind.SERVER,
            attributes=attributes,
            context=extract(carrier) if carrier else None,
        ) as request_span:
            result = app(environ, recording_start_response)
            if status:
                request_span.set_attribute("http.response.status_code", status[-1])
                if status[-1] >= 500:
                    request_span.set_status(StatusCode.ERROR)
            return result

    return application
