"""Traces (issue #11): one trace per write, from the API's request to the worker's PostgreSQL
statement, across JetStream; a dead letter's replay continues it; log lines carry the ids.

The API (granian) and the worker run as the real processes, against the session's servers, and
export over OTLP/HTTP as in production, to :class:`Collector`: an OTLP receiver on a loopback
port, written here, that decodes the protobuf and keeps the spans in memory.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from birbnest import tracing
from birbnest.logging import JsonFormatter
from persistence import dead_letters, jetstream, services
from persistence.models import CacheEntry
from tests.conftest import free_port, manage, service_env, unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2


@dataclass
class CollectedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    status: int
    start_ns: int
    end_ns: int


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver on a loopback port."""

    spans: list[CollectedSpan] = field(default_factory=list)
    requests: int = 0

    def start(self) -> Collector:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def add(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        CollectedSpan(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            status=span.status.code,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self.lock:
            self.requests += 1
            self.spans.extend(found)

    def find(self, **match: Any) -> list[CollectedSpan]:
        with self.lock:
            spans = list(self.spans)
        return [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]

    def wait_one(self, message: str, predicate: Any = None, **match: Any) -> CollectedSpan:
        def found() -> CollectedSpan | None:
            return next((s for s in self.find(**match) if predicate is None or predicate(s)), None)

        try:
            return wait_for(found, timeout=20, message=message)
        except AssertionError as error:
            seen = sorted({(s.service, s.name) for s in self.find()})
            raise AssertionError(f"{error}; {self.requests} exports, spans seen: {seen}") from None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector().start()
    yield collector
    collector.stop()


def traced(collector_url: str, **extra: str) -> dict[str, str]:
    return {"OTEL_TRACES_ENABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": collector_url, "API_AUTH": "off", **extra}


@pytest.fixture
def traced_services(collector: Collector, api_factory: Any, worker_factory: Any) -> Any:
    """An API and a worker exporting to the collector; the earlier tests' backlog drained."""
    env = traced(collector.url)
    worker = worker_factory(WORKER_BATCH_TIMEOUT="100ms", LOG_LEVEL="debug", **env).start()
    api = api_factory(**env).start(timeout=60)
    wait_for(lambda: jetstream.publisher().wait_drained(1), timeout=30, message="the earlier tests' backlog drained")
    services._backlog.last_wait_failed = False
    return api, worker


def test_a_write_is_one_trace_from_the_request_to_postgresql(collector: Collector, traced_services: Any) -> None:
    api, _worker = traced_services
    key = unique_key("traced")

    # when a client writes a key
    answer = httpx.post(f"{api.url}/v1/cache/{key}", json={"value": {"n": 1}}, timeout=10)
    assert answer.status_code == 201, answer.text
    wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), message="the write persisted")

    # then the API's request span is the root of the write's trace
    request = collector.wait_one("the request span", service="birb-nest-api", name="POST /v1/cache/{key}", kind=SERVER)
    assert request.parent_span_id == ""
    assert request.attributes["http.route"] == "/v1/cache/{key}"
    assert request.attributes["http.response.status_code"] == 201
    trace = request.trace_id
    # with the Redis round trips (version, store) as its children
    redis = [s for s in collector.find(trace_id=trace, kind=CLIENT) if s.name.startswith("redis ")]
    names = {s.name for s in redis}
    assert "redis EVALSHA assign_version" in names and "redis EVALSHA store_entry" in names, names
    assert all(s.parent_span_id == request.span_id for s in redis)
    # and the JetStream publish, whose traceparent went into the message
    publish = collector.wait_one("the publish span", trace_id=trace, name="send cache.persist.set", kind=PRODUCER)
    assert publish.parent_span_id == request.span_id
    assert publish.attributes["messaging.message.id"] == f"{key}:1"
    assert publish.attributes["messaging.nats.stream.sequence"] > 0

    # and the worker continues that trace: the write's span is a child of the publish
    processed = collector.wait_one(
        "the worker's span of the write", service="birb-nest-worker", trace_id=trace, parent_span_id=publish.span_id
    )
    assert processed.kind == CONSUMER and processed.name == "process cache.persist.set"
    assert processed.start_ns >= publish.start_ns
    # and the batch span (a trace of its own) links to the write's publish, its upsert its child
    batch = collector.wait_one(
        "the batch span",
        lambda s: (trace, publish.span_id) in s.links,
        service="birb-nest-worker",
        name="process batch",
    )
    assert batch.kind == CONSUMER and batch.parent_span_id == ""
    assert (batch.trace_id, batch.span_id) in processed.links
    upsert = collector.wait_one(
        "the PostgreSQL span", trace_id=batch.trace_id, parent_span_id=batch.span_id, name="INSERT cache_entries"
    )
    assert upsert.kind == CLIENT
    assert upsert.attributes["db.system.name"] == "postgresql"
    assert upsert.attributes["db.operation.batch.size"] >= 1

    # and a read is a trace of its own, with its Redis round trip
    assert httpx.get(f"{api.url}/v1/cache/{key}", timeout=10).status_code == 200
    read = collector.wait_one("the read's span", service="birb-nest-api", name="GET /v1/cache/{key}")
    assert read.trace_id != trace
    collector.wait_one("the read's Redis span", trace_id=read.trace_id, parent_span_id=read.span_id, kind=CLIENT)


def test_a_caller_s_traceparent_is_continued(collector: Collector, traced_services: Any) -> None:
    api, _worker = traced_services
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    answer = httpx.get(
        f"{api.url}/v1/cache/{unique_key('absent')}", headers={"traceparent": f"00-{trace}-{parent}-01"}, timeout=10
    )
    assert answer.status_code == 404
    request = collector.wait_one("the request span", trace_id=trace, name="GET /v1/cache/{key}")
    assert request.parent_span_id == parent
    assert request.attributes["http.response.status_code"] == 404


@pytest.fixture
def refused_key() -> Iterator[Any]:
    """A trigger that makes PostgreSQL refuse one key (so its write is dead-lettered); ``fix()``."""

    def refuse(key: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                CREATE OR REPLACE FUNCTION birb_test_trace_reject() RETURNS trigger AS $$
                BEGIN
                  IF NEW.key = '{key}' THEN RAISE EXCEPTION 'birb test: key % refused', NEW.key; END IF;
                  RETURN NEW;
                END $$ LANGUAGE plpgsql
                """
            )
            cursor.execute("DROP TRIGGER IF EXISTS birb_test_trace_reject ON cache_entries")
            cursor.execute(
                "CREATE TRIGGER birb_test_trace_reject BEFORE INSERT OR UPDATE ON cache_entries "
                "FOR EACH ROW EXECUTE FUNCTION birb_test_trace_reject()"
            )

    def fix() -> None:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER IF EXISTS birb_test_trace_reject ON cache_entries")
            cursor.execute("DROP FUNCTION IF EXISTS birb_test_trace_reject()")

    refuse.fix = fix  # type: ignore[attr-defined]
    yield refuse
    fix()


def test_a_dead_letter_keeps_the_trace_and_its_replay_continues_it(
    collector: Collector, traced_services: Any, refused_key: Any
) -> None:
    api, worker = traced_services
    key = unique_key("traced-poison")
    refused_key(key)

    # given a write PostgreSQL refuses, so the worker dead-letters it
    assert httpx.post(f"{api.url}/v1/cache/{key}", json={"value": "p"}, timeout=10).status_code == 201
    request = collector.wait_one("the request span", service="birb-nest-api", name="POST /v1/cache/{key}")
    trace = request.trace_id
    letter = wait_for(
        lambda: next((d for d in dead_letters.dead_letters_list(limit=1000) if d.key == key), None),
        timeout=30,
        message="the dead letter",
    )
    # then the dead letter kept the write's traceparent
    assert letter.headers["traceparent"].split("-")[1] == trace
    # and the worker's span of the write says so, in the write's trace
    failed = collector.wait_one(
        "the dead-lettered write's span", service="birb-nest-worker", trace_id=trace, name="process cache.persist.set"
    )
    assert failed.status == STATUS_ERROR and failed.attributes["birb.dead_letter.reason"] == "rejected_by_database"
    # and the worker's log line about it carries the write's trace id (the runbook's jq filter)
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    dead_lettered = [line for line in lines if line.get("trace_id") == trace]
    assert any("dead-lettered" in line["event"] for line in dead_lettered), dead_lettered
    assert all(line["span_id"] == failed.span_id for line in dead_lettered)

    # when the cause is fixed and the dead letter replayed from the command line
    refused_key.fix()
    retry = manage("process_dlq", "--retry", str(letter.id), env=service_env(**traced(collector.url)))
    assert retry.wait(60) == 0
    wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), message="the replayed write persisted")

    # then the replay is part of the same trace: retry -> publish -> the worker's span of the write
    replay = collector.wait_one("the replay span", service="birb-nest-cli", trace_id=trace, name="retry dead letter")
    republish = collector.wait_one("the republish", trace_id=trace, parent_span_id=replay.span_id, kind=PRODUCER)
    collector.wait_one(
        "the worker's span of the replayed write",
        service="birb-nest-worker",
        trace_id=trace,
        parent_span_id=republish.span_id,
        name="process cache.persist.set",
    )


def test_export_to_an_unreachable_collector_never_slows_or_fails_a_request(api_factory: Any) -> None:
    # given an API whose collector is a closed loopback port
    closed = free_port()
    api = api_factory(**traced(f"http://127.0.0.1:{closed}")).start(timeout=60)
    key = unique_key("unexported")
    # when it serves writes and reads for longer than several export rounds
    durations = []
    started = time.monotonic()
    with httpx.Client(base_url=api.url, timeout=10) as client:
        i = 0
        while time.monotonic() - started < 3 or i < 200:
            began = time.perf_counter()
            if i % 4 == 0:
                answer = client.post(f"/v1/cache/{key}", json={"value": i})
            else:
                answer = client.get(f"/v1/cache/{key}")
            durations.append(time.perf_counter() - began)
            # then every request is answered as usual
            assert answer.status_code in (200, 201), answer.text
            i += 1
    # and none waited on the export (an export attempt waits up to its timeout, 5 s)
    durations.sort()
    p50, p99 = durations[len(durations) // 2], durations[int(len(durations) * 0.99)]
    print(
        f"{len(durations)} requests in {time.monotonic() - started:.1f} s with the collector unreachable: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {durations[-1] * 1000:.1f} ms"
    )
    assert durations[-1] < tracing.EXPORT_TIMEOUT / 2, durations[-5:]
    # and export was attempted, and failed, meanwhile
    wait_for(lambda: "export" in api.log_path.read_text().lower(), timeout=15, message="an export failure logged")


def test_log_lines_written_in_a_span_carry_its_trace_and_span_ids() -> None:
    exporter = InMemorySpanExporter()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.tracing")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    config = dataclasses.replace(settings.BIRB, otel_traces_enabled=True)
    assert tracing.configure(config, component="test", exporter=exporter)
    try:
        with tracing.span("work") as span:
            log.info("inside %s", "the span")
        log.info("outside")
    finally:
        tracing.shutdown()
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    ids = span.get_span_context()
    assert inside["trace_id"] == f"{ids.trace_id:032x}" and inside["span_id"] == f"{ids.span_id:016x}"
    assert "trace_id" not in outside and "span_id" not in outside
    assert [s.name for s in exporter.get_finished_spans()] == ["work"]


class _NoSpansTracer:
    """Fails the test at the first span anyone asks for."""

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a span was made with tracing off: {args}")

    start_as_current_span = start_span


def test_with_tracing_off_no_span_is_made(client: Client, worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # given tracing off (the default), with a tracer that refuses every span
    assert not tracing.enabled
    monkeypatch.setattr(tracing, "_tracer", _NoSpansTracer())
    key = unique_key("untraced")
    # when a key is written, read, persisted by the worker and deleted
    assert client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json").status_code == 201
    assert client.get(f"/v1/cache/{key}").status_code == 200
    wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), message="the write persisted")
    assert client.delete(f"/v1/cache/{key}").status_code == 204
    # then no span was asked for (an AssertionError would have answered 500 above)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("OTEL_TRACES_ENABLED", "maybe", 'invalid value for OTEL_TRACES_ENABLED: "maybe" is not a boolean'),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "127.0.0.1:4318",
            'invalid value for OTEL_EXPORTER_OTLP_ENDPOINT: "127.0.0.1:4318" is not a URL',
        ),
        (
            "OTEL_TRACES_SAMPLER",
            "jaeger_remote",
            'invalid value for OTEL_TRACES_SAMPLER: "jaeger_remote" is not one of',
        ),
        (
            "OTEL_TRACES_SAMPLER_ARG",
            "2",
            'invalid value for OTEL_TRACES_SAMPLER_ARG: "2" is not a ratio from 0.0 to 1.0',
        ),
        ("OTEL_TRACES_SAMPLER_ARG", "half", 'invalid value for OTEL_TRACES_SAMPLER_ARG: "half" is not a number'),
    ],
)
def test_a_bad_tracing_setting_stops_the_start_naming_it(name: str, value: str, message: str) -> None:
    # when a process starts with the bad value
    done = manage("check", env=service_env(**{name: value}), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=60)
    # then it stops with that one line and exit code 2
    assert done.returncode == 2, (out, err)
    assert err.decode().strip().startswith(message), err


@pytest.mark.parametrize(
    ("name", "ratio", "expected"),
    [
        ("parentbased_always_on", 1.0, "ParentBased{root:AlwaysOnSampler"),
        ("always_off", 1.0, "AlwaysOffSampler"),
        ("traceidratio", 0.25, "TraceIdRatioBased{0.25}"),
        ("parentbased_traceidratio", 0.1, "ParentBased{root:TraceIdRatioBased{0.1}"),
    ],
)
def test_the_sampler_follows_the_opentelemetry_names(name: str, ratio: float, expected: str) -> None:
    assert tracing.sampler(name, ratio).get_description().startswith(expected)
