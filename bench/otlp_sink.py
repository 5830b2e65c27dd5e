"""A minimal OTLP/gRPC trace receiver for benchmarks: accepts every export and counts spans.

    .venv/bin/python bench/otlp_sink.py --listen 127.0.0.1:4317

Runs in its own process so that receiving spans costs the measured sidecar nothing; prints
one JSON line when listening and the span count when stopped (SIGTERM).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # type: ignore[override]
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def serve(listen: str) -> None:
    sink = Sink()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(listen)
    await server.start()
    print(json.dumps({"event": "listening", "address": listen}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(None)
    print(json.dumps({"event": "stopped", "spans": sink.spans}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
