"""A real OTLP/gRPC trace receiver: `opentelemetry-proto`'s generated servicer on a grpc server.

It keeps every span it receives (flattened with its resource attributes) and the metadata each
export came with. `hang()` makes it accept exports and never answer (a stuck collector);
`stop()` takes it off the network (a dead one).

`OtlpReceiver(tls=ReceiverTls(server, client_ca))` serves TLS only (`https://` endpoint) with
that certificate; with `client_ca` it requires a client certificate signed by it (mutual TLS)
and records each export's client certificate common name in `client_names`.
"""
from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.harness.certs import Issued
from tests.harness.procs import free_port


@dataclass(frozen=True)
class ReceiverTls:
    server: Issued               # the receiver's certificate and key
    client_ca: Path | None = None  # require client certificates signed by this CA


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        if self._receiver.hanging.is_set():
            self._receiver.hung_exports += 1
            self._receiver.release.wait()
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name, span.kind,
                        span.start_time_unix_nano, span.end_time_unix_nano,
                        {a.key: _value(a.value) for a in span.attributes}, span.status.code, span.status.message,
                        resource))
        names = context.auth_context().get("x509_common_name", [])
        with self._receiver.lock:
            self._receiver.spans.extend(spans)
            self._receiver.metadata.append(dict(context.invocation_metadata()))
            self._receiver.client_names.append(names[0].decode() if names else "")
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self, tls: ReceiverTls | None = None) -> None:
        self.tls = tls
        self.port = free_port()
        self.lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []
        self.metadata: list[dict[str, str]] = []
        self.client_names: list[str] = []  # per export: the client certificate's CN ("" without one)
        self.hanging = threading.Event()
        self.release = threading.Event()
        self.hung_exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        """Binds its port and serves (until then, connections to the port are refused)."""
        if self.tls is None:
            self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        else:
            cert, key = self.tls.server.pem()
            ca = self.tls.client_ca.read_bytes() if self.tls.client_ca else None
            credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                      require_client_auth=ca is not None)
            self._server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        self._server.start()
        return self

    def hang(self) -> None:
        self.hanging.set()

    def stop(self) -> None:
        self.release.set()
        self._server.stop(grace=None)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def all_spans(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)
