"""The ops HTTP listener: `GET /metrics`, `/healthz`, `/readyz`.

A small HTTP/1.1 server on asyncio streams: operators, kubelet and Prometheus call it rarely, so
it stays off the gRPC hot path and needs no framework. One request per connection. `/metrics`
answers in the Prometheus text format, or in OpenMetrics (with trace-id exemplars) when the
scraper's `Accept` header asks for it; it is collected on the event loop and rendered on a
thread of its own, so a large exposition does not stall the event loop that serves calls.

`ops_listen` binds 0.0.0.0 in Kubernetes: anything that reaches the pod can connect, so every
resource a client can make it hold is bounded.
- The request head: limits in `sidecar/ops/http_request.py` (8 KiB request line, 100 header
  fields, 16 KiB of them) answered 414 / 431 / 400, and `REQUEST_TIMEOUT_SECONDS` (5 s) for the
  whole head, not per line, answered 408.
- Connections: at most `MAX_CONNECTIONS` (64). One more makes room by cutting off the oldest
  connection that has not sent its request yet (it gets 503), so a flood of idle or slow
  connections cannot lock out kubelet or Prometheus; when all of them are being answered, the
  newcomer gets 503 at once.
- An answer the client does not take within `WRITE_TIMEOUT_SECONDS` is dropped.
A refused request logs one `ops request refused` line (info, no traceback), rate-limited per
status by `LogThrottle`; a flood logs `ops connection limit reached` (warning) the same way.

`/healthz` is liveness: 200 for as long as the loop answers. Its body also carries the
components in `LIVENESS_COMPONENTS` (the config source: where the config comes from and whether
it can be read), which never make it fail: a sidecar serving from its cache while etcd is down
is alive.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from sidecar.ops.health import Health
from sidecar.ops.http_request import REQUEST_TIMEOUT_SECONDS, STREAM_LIMIT, Refused, Request, read_request
from sidecar.telemetry.logging import LogThrottle

log = logging.getLogger("sidecar.ops")
Response = tuple[int, str, bytes]
Route = Callable[[Request], Awaitable[Response]]

MAX_CONNECTIONS = 64
LIVENESS_COMPONENTS = ("config_source",)
WRITE_TIMEOUT_SECONDS = 10.0
# after a refusal, what the client still sends is read and dropped (this long, this much at
# most) before the socket closes: closing with unread input would reset the connection, and
# the client could lose the answer
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024


class _Connection:
    """An accepted connection. While it waits for the client (its request head, or the linger
    after a refusal) it has a `deadline`, and a newcomer may cut it off by expiring that early."""

    __slots__ = ("deadline", "evicted")

    def __init__(self) -> None:
        self.deadline: asyncio.Timeout | None = None
        self.evicted = False

    @property
    def evictable(self) -> bool:
        return self.deadline is not None and not self.evicted

    def evict(self) -> None:
        self.evicted = True
        if self.deadline is not None and not self.deadline.expired():
            self.deadline.reschedule(asyncio.get_running_loop().time())


class OpsServer:
    def __init__(self, health: Health) -> None:
        self._health = health
        self._server: asyncio.Server | None = None
        self._connections: dict[_Connection, None] = {}   # in arrival order: the oldest first
        self._throttle = LogThrottle(log)
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="ops-metrics")
        self._routes: dict[str, Route] = {"/metrics": self._metrics, "/healthz": self._healthz,
                                          "/readyz": self._readyz}

    async def start(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        self._server = await asyncio.start_server(self._serve, host.strip("[]"), int(port), limit=STREAM_LIMIT)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._encoder.shutdown(wait=False, cancel_futures=True)

    # --- one connection --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection()
        if not self._admit(connection):
            self._refused(writer, Refused(503, f"all {MAX_CONNECTIONS} connections are being answered"))
            writer.write(_encode(_plain(503, "too many connections")))
            writer.close()
            return
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS) as connection.deadline:
                    request = await read_request(reader)
            except TimeoutError:
                if connection.evicted:
                    raise Refused(503, "cut off to make room for a newer connection") from None
                raise Refused(408, f"no complete request within {REQUEST_TIMEOUT_SECONDS:g} s") from None
            finally:
                connection.deadline = None
            if request is not None:
                await self._write(writer, await self._respond(request))
        except Refused as refused:
            self._refused(writer, refused)
            if await self._write(writer, _plain(refused.status, refused.why)) and not connection.evicted:
                await _linger(connection, reader, writer)
        except ConnectionError:
            pass
        finally:
            del self._connections[connection]
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # an answer the client did not take
            else:
                writer.close()

    def _admit(self, connection: _Connection) -> bool:
        """Makes room for one more connection: False when every one is busy answering."""
        if len(self._connections) >= MAX_CONNECTIONS:
            oldest = next((c for c in self._connections if c.evictable), None)
            if oldest is None:
                return False
            self._throttle.log(logging.WARNING, "flood", "ops connection limit reached: the oldest idle one is "
                               "cut off", extra={"max_connections": MAX_CONNECTIONS})
            oldest.evict()
        self._connections[connection] = None
        return True

    async def _respond(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            return _plain(404, "not found")
        if request.method != "GET":
            return _plain(405, "method not allowed")
        try:
            return await route(request)
        except Exception as exc:  # noqa: BLE001 - the client gets a 500, the listener goes on
            self._throttle.log(logging.ERROR, "500", "ops route failed", exc_info=exc, extra={"path": request.path})
            return _plain(500, "internal error")

    async def _write(self, writer: asyncio.StreamWriter, response: Response) -> bool:
        """Sends the answer; False when the client did not take it in time or has gone."""
        writer.transport.set_write_buffer_limits(high=0)  # drain() returns once all of it is sent
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                writer.write(_encode(response))
                await writer.drain()
        except (TimeoutError, ConnectionError):
            return False
        return True

    def _refused(self, writer: asyncio.StreamWriter, refused: Refused) -> None:
        peer = writer.get_extra_info("peername")
        self._throttle.log(logging.INFO, str(refused.status), "ops request refused", extra={
            "status": refused.status, "why": refused.why, "peer": peer[0] if peer else ""})

    # --- routes ----------------------------------------------------------------------------

    async def _metrics(self, request: Request) -> Response:
        """Collects on the event loop (the gauges that read the spool and the like see it
        unchanged mid-read), renders the text on the encoder thread (the larger part)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        snapshot = _Snapshot(list(REGISTRY.collect()))
        body = await asyncio.get_running_loop().run_in_executor(self._encoder, encode, snapshot)
        return 200, content_type, body

    async def _healthz(self, _: Request) -> Response:
        body = self._health.liveness_body()
        for name in LIVENESS_COMPONENTS:
            component = self._health.components_from.get(name)
            if component is not None:
                body[name] = component()
        return _json(200, body)

    async def _readyz(self, _: Request) -> Response:
        return _json(200 if self._health.ready else 503, self._health.readiness_body())


class _Snapshot:
    """Metric families already collected, in the shape an exposition encoder reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


async def _linger(connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After a refusal: ends our side, then drops what the client still sends (bounded in time
    and bytes, and cut short when a newer connection needs the room)."""
    dropped = 0
    try:
        writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS) as connection.deadline:
            while dropped < LINGER_BYTES and (chunk := await reader.read(65536)):
                dropped += len(chunk)
    except (TimeoutError, OSError):
        pass
    finally:
        connection.deadline = None


def _encode(response: Response) -> bytes:
    status, content_type, body = response
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


def _plain(status: int, text: str) -> Response:
    return status, "text/plain; charset=utf-8", text.encode() + b"\n"


def _json(status: int, body: dict[str, Any]) -> Response:
    return status, "application/json", json.dumps(body).encode() + b"\n"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
