"""The ops HTTP listener: `GET /metrics`, `/healthz`, `/readyz`.

A tiny HTTP/1.1 server on asyncio streams: operators and kubelet call it rarely, so it stays
off the gRPC hot path and needs no framework. One request per connection. `/metrics` answers
in the Prometheus text format, or in OpenMetrics (with trace-id exemplars) when the scraper's
`Accept` header asks for it.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from sidecar.ops.health import Health

log = logging.getLogger("sidecar.ops")
Response = tuple[int, str, bytes]
Route = Callable[[dict[str, str]], Response]


class OpsServer:
    def __init__(self, health: Health) -> None:
        self._health = health
        self._server: asyncio.Server | None = None
        self._routes: dict[str, Route] = {
            "/metrics": _metrics,
            "/healthz": lambda _: _json(200, health.liveness_body()),
            "/readyz": lambda _: _json(200 if health.ready else 503, health.readiness_body()),
        }

    async def start(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        self._server = await asyncio.start_server(self._serve, host.strip("[]"), int(port))
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            headers: dict[str, str] = {}
            while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            status, content_type, body = self._respond(request_line, headers)
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _respond(self, request_line: bytes, headers: dict[str, str]) -> Response:
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n"
        method, target, _ = parts
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            return 404, "text/plain", b"not found\n"
        if method != "GET":
            return 405, "text/plain", b"method not allowed\n"
        return route(headers)


def _metrics(headers: dict[str, str]) -> Response:
    encode, content_type = choose_encoder(headers.get("accept", ""))
    return 200, content_type, encode(REGISTRY)


def _json(status: int, body: dict[str, Any]) -> Response:
    return status, "application/json", json.dumps(body).encode() + b"\n"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}
