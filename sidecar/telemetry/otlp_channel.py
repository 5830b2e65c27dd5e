"""The trace exporter's gRPC channel to the collector: plaintext for `http://`, TLS for
`https://` with `telemetry.otlp_tls` (the collector's CA, else the system's roots; a client
certificate for mutual TLS; the name to verify), and a new channel when those files change.

gRPC takes PEM bytes, not paths: a channel keeps the certificate it was built with for good, so
a rotated one would never be used. `refresh()`, called by the exporter before each export,
looks at the files' stamps (every `POLL_SECONDS` at most: a few stat() calls); when one changed,
and the files read and load (a certificate that matches its key, a CA that parses), the next
exports go through a new channel, so new connections with a new handshake, and the old channel
is closed. Files that do not load (half written, a key that is not the certificate's) leave the
running channel as it is, logged once per change, and are tried again when they change again.
A collector that refuses the new certificate shows as failed exports, like any other refusal.
Reading and checking the files is tls_client.py's, as for backends (an encrypted key is refused:
gRPC takes none). Logs name the keys, the files and the reason, never the files' content.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from sidecar.tls_client import ClientCredentials, TlsFilesError, files_of, files_stamp, read_credentials

if TYPE_CHECKING:
    from sidecar.config import ClientTlsConfig

log = logging.getLogger("sidecar.tracing")

POLL_SECONDS = 1.0
# a collector back after an outage is found within 5 s (grpc's default backoff grows to 2 min)
CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.initial_reconnect_backoff_ms", 1000),
                                          ("grpc.max_reconnect_backoff_ms", 5000)]


class OtlpChannel:
    """The channel to `endpoint` and the stub's Export; `export` is None while no channel could
    be built (the TLS files did not load at start)."""

    def __init__(self, endpoint: str, tls: ClientTlsConfig | None) -> None:
        scheme, _, target = endpoint.partition("://")
        self.target = target.rstrip("/")
        self.secure = scheme == "https"
        self._tls = tls if self.secure else None
        self._files = files_of(self._tls) if self._tls else []
        self._stamps = files_stamp(self._files)
        self._checked = time.monotonic()
        self.channel: grpc.aio.Channel | None = None
        self.export: Callable[..., Any] | None = None
        self.generation = 0  # channels built so far
        try:
            self._open(read_credentials(self._tls) if self._tls else None)
        except TlsFilesError as exc:
            log.error("trace export cannot start: its TLS files do not load; spans are dropped until they do",
                      extra={"endpoint": endpoint, "error": _describe(exc)})

    def _open(self, credentials: ClientCredentials | None) -> None:
        """A channel with `credentials` (plaintext for http://, the system's roots without otlp_tls)."""
        options = list(CHANNEL_OPTIONS)
        if credentials is not None:
            options += credentials.channel_options()  # server_name
            self.channel = grpc.aio.secure_channel(self.target, credentials.channel_credentials(), options=options)
        elif self.secure:
            self.channel = grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(self.target, options=options)
        stub = trace_service_pb2_grpc.TraceServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.export = stub.Export
        self.generation += 1

    async def refresh(self) -> None:
        """A new channel when the TLS files changed and load (see the module docstring)."""
        if self._tls is None or time.monotonic() - self._checked < POLL_SECONDS:
            return
        self._checked = time.monotonic()
        stamps = files_stamp(self._files)
        if stamps == self._stamps:
            return
        try:
            credentials = await asyncio.to_thread(read_credentials, self._tls)
        except TlsFilesError as exc:
            self._stamps = stamps  # tried again when they change again
            log.warning("trace export: the changed TLS files do not load; the running channel is kept",
                        extra={"error": _describe(exc)})
            return
        self._stamps = credentials.stamps
        old = self.channel
        self._open(credentials)
        log.info("trace export: TLS files changed; new connections use them", extra={"generation": self.generation})
        if old is not None:
            await old.close()

    async def aclose(self) -> None:
        if self.channel is not None:
            await self.channel.close()


def _describe(exc: TlsFilesError) -> str:
    """Which keys, and why (the files' paths, never their content)."""
    return "; ".join(f"telemetry.otlp_tls.{key}: {message}" for key, message in exc.problems)
