"""TLS on the gRPC listeners: server credentials whose certificate follows its files.

cert-manager and Kubernetes Secret volumes replace certificate files while the sidecar runs (a
Secret volume swaps its `..data` symlink in one step). A restart to pick them up would cut
every call, so each TLS listener is served with `grpc.dynamic_ssl_server_credentials`: gRPC
asks `_fetch` for a new certificate configuration at each TLS handshake, on its own threads,
and keeps the one it has while the answer is None. What `_fetch` does is one locked slot read;
everything slow happens elsewhere:

1. `watch` polls the files' stamps every second (following symlinks: a swapped `..data` shows
   as new inodes) and, once they changed and held still, calls `reload`.
2. `reload` reads and checks the files in a worker thread (listener_tls.py) and puts the new
   configuration in the slot; the next handshake takes it. Connections already open keep the
   certificate they were made with, so calls in flight never notice.
3. Files that do not make a usable certificate (unreadable, not PEM, a key that is not the
   certificate's, expired) are refused: the previous certificate keeps serving, one error is
   logged and counted, /readyz shows the problems, until the files change again.

Checked with grpcio 1.85 (tests/grpc/test_listener_tls.py): grpc.aio servers take dynamic
credentials; the fetcher runs on gRPC's threads, not the event loop; a fetcher that raises, or
returns a key that is not the certificate's, makes gRPC log an error and keep the previous
certificate (we check before, so neither happens). Turning TLS on or off, and the paths, need a
restart (reload.py's RESTART_ONLY): the credentials are bound to the port.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import grpc

from sidecar.config_sections import ServerTlsConfig, TlsConfig
from sidecar.config_yaml import ConfigError
from sidecar.listener_tls import ServerCertificate, Unsettled, files_of, load_server_certificate
from sidecar.telemetry.metrics import (
    TLS_CERTIFICATE_EXPIRY,
    TLS_CERTIFICATE_RELOAD_RESULTS,
    TLS_CERTIFICATE_RELOADS,
)
from sidecar.tls_client import watch_files

__all__ = ["ListenerTls", "listener_tls", "tls_component"]

log = logging.getLogger("sidecar.tls")


class ListenerTls:
    """The TLS of one listener (`listen` or `admin_listen`): its certificate now, credentials
    for `add_secure_port`, and the watch that rotates the certificate."""

    def __init__(self, listener: str, tls: ServerTlsConfig) -> None:
        self.listener = listener
        self.tls = tls
        self.where = f"tls.{listener}"
        self.current = load_server_certificate(tls, self.where, attempts=3)  # ConfigError: exit 2
        self.refused: list[str] = []   # the problems of the files on disk, while they are refused
        self._next: grpc.ServerCertificateConfiguration | None = None  # for the next handshake
        self._lock = threading.Lock()  # the slot is taken on gRPC's threads
        TLS_CERTIFICATE_EXPIRY.labels(listener).set(self.current.not_after)
        for result in TLS_CERTIFICATE_RELOAD_RESULTS:
            TLS_CERTIFICATE_RELOADS.labels(listener, result)

    @property
    def mutual(self) -> bool:
        """Whether callers must present a certificate signed by `client_ca_file`."""
        return self.tls.client_ca_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        # types-grpcio's fetcher type lacks None, which gRPC documents as "keep the current one"
        return grpc.dynamic_ssl_server_credentials(_configuration(self.current), self._fetch,  # type: ignore[arg-type]
                                                   require_client_authentication=self.mutual)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's threads, at every handshake: a new configuration once, else None (keep)."""
        with self._lock:
            configuration, self._next = self._next, None
        return configuration

    async def watch(self) -> None:
        """Runs until cancelled (a task of the Sidecar's). Looks once at once: files may have
        changed while the sidecar started (a spool replay can take a while)."""
        await self.reload()
        await watch_files(lambda: [path for _, path in files_of(self.tls)], self.reload)

    async def reload(self) -> bool:
        """The files changed: the next handshakes get their certificate, unless they are unusable.
        False while they were still changing (the watch calls again on its next look)."""
        try:
            loaded = await asyncio.to_thread(load_server_certificate, self.tls, self.where)
        except Unsettled:
            return False
        except ConfigError as exc:
            self.refused = exc.problems
            TLS_CERTIFICATE_RELOADS.labels(self.listener, "failure").inc()
            log.error("listener certificate rotation refused", extra={
                "listener": self.listener, "problems": exc.problems, "serving": self.current.describe()})
            return True
        self.refused = []
        if loaded.same_content(self.current):  # touched, or back to what is served
            return True
        with self._lock:
            self._next = _configuration(loaded)
        previous, self.current = self.current, loaded
        TLS_CERTIFICATE_EXPIRY.labels(self.listener).set(loaded.not_after)
        TLS_CERTIFICATE_RELOADS.labels(self.listener, "success").inc()
        log.info("listener certificate rotated", extra={"listener": self.listener, **loaded.describe(),
                                                        "previous": previous.describe()})
        return True

    def component(self) -> dict[str, Any]:
        """This listener in /readyz: the certificate served, and why the files are refused."""
        body: dict[str, Any] = {"mutual_tls": self.mutual, **self.current.describe()}
        if self.refused:
            body["rotation_refused"] = self.refused
        return body

    def __repr__(self) -> str:
        return f"<ListenerTls {self.listener} {self.current.fingerprint[:11]}{' mutual' if self.mutual else ''}>"


def _configuration(certificate: ServerCertificate) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(certificate.key, certificate.chain)],
                                                     root_certificates=certificate.client_ca)


def listener_tls(tls: TlsConfig) -> dict[str, ListenerTls]:
    """The TLS of each listener that has it, by listener name; `ConfigError` for unusable files."""
    listeners = {"listen": tls.listen, "admin_listen": tls.admin_listen}
    problems: list[str] = []
    built: dict[str, ListenerTls] = {}
    for name, section in listeners.items():
        if section is None:
            continue
        try:
            built[name] = ListenerTls(name, section)
        except ConfigError as exc:
            problems += exc.problems
        except Unsettled:
            problems.append(f"tls.{name}: the files kept changing while they were read")
    if problems:
        raise ConfigError(problems)
    return built


def tls_component(listeners: dict[str, ListenerTls]) -> dict[str, Any]:
    """/readyz's `tls` component: degraded (never unready) while a rotation is refused, since
    the previous certificate still serves."""
    status = "degraded" if any(t.refused for t in listeners.values()) else "ok"
    return {"status": status, **{name: t.component() for name, t in listeners.items()}}
