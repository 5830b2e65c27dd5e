"""TLS to backends: which settings a backend uses, whether their files can be used, what a failed
handshake does, and fresh credentials when certificate files are rotated.

1. Settings (`effective_tls`): the backend's own `tls`, else its model's, else `tls.backends`;
   the most specific applies as a whole (keys are not merged), and `plaintext: true` (or
   `tls: false`) opts out of a default. None = plaintext.
2. Files (`backend_tls_problems`): every configured TLS block's files read and checked, each
   problem naming its key path; `check-config`, a start and a reload refuse a config with one.
3. Failed handshakes (`TlsFailures`): seen by a call (proxy) or a health check, each is counted in
   `api_router_backend_tls_errors_total{model,backend,cause}`, logged once per backend and cause
   (then at most one summary a minute while it goes on; in full again after the backend has
   recovered), and shown in `/readyz` until a check or a call gets through again. The caller's
   error is UNAVAILABLE / BACKEND_TLS_ERROR naming the cause (proxy.py); health checks failing
   make the backend unhealthy and failed calls count toward its ejection, as any UNAVAILABLE.
4. Rotation (`keep_credentials_fresh`): the files of every TLS setting in use are polled; once
   they changed and can be used (a key that does not match its certificate yet is waited for),
   new channels are built for the backends using them and the old ones drain like after a
   reload: new calls connect with the new certificate, calls running finish on the old channel.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from sidecar.config_sections import BackendConfig, ClientTlsConfig, ModelConfig
from sidecar.config_yaml import key_path
from sidecar.telemetry.logging import LogThrottle
from sidecar.telemetry.metrics import BACKEND_TLS_ERRORS
from sidecar.tls_client import (
    DESCRIPTIONS,
    HANDSHAKE_CAUSES,
    ClientCredentials,
    TlsFilesError,
    files_of,
    read_credentials,
    watch_files,
)

if TYPE_CHECKING:
    from sidecar.config import Config
    from sidecar.routing.channels import Channels
    from sidecar.routing.endpoints import Endpoint
    from sidecar.routing.router import Router

log = logging.getLogger("sidecar.routing")
_TLS_KEYS = tuple(ClientTlsConfig.model_fields)


def effective_tls(default: ClientTlsConfig | None, model: ModelConfig, backend: BackendConfig) -> ClientTlsConfig | None:
    """The TLS settings `backend` of `model` uses (None: plaintext), as a plain `ClientTlsConfig`
    so that backends with equal settings share a channel."""
    chosen = backend.tls if backend.tls is not None else model.tls if model.tls is not None else default
    if chosen is None or getattr(chosen, "plaintext", False):
        return None
    if type(chosen) is ClientTlsConfig:
        return chosen
    return ClientTlsConfig.model_construct(**{key: getattr(chosen, key) for key in _TLS_KEYS})


def backend_tls_problems(config: Config) -> list[str]:
    """One `key.path: problem` line per file of a configured backend TLS block that cannot be
    used (missing, unreadable, not PEM, a key not of its certificate). Reads the files: run it at
    start, in `check-config`, and in a reload's worker thread."""
    blocks: list[tuple[str, ClientTlsConfig]] = []
    if config.tls.backends is not None:
        blocks.append(("tls.backends", config.tls.backends))
    for name, model in config.models.items():
        if model.tls is not None and not model.tls.plaintext:
            blocks.append((key_path(["models", name, "tls"]), model.tls))
        blocks += [(key_path(["models", name, "backends", i, "tls"]), backend.tls)
                   for i, backend in enumerate(model.backends) if backend.tls is not None and not backend.tls.plaintext]
    problems: list[str] = []
    for where, tls in blocks:
        try:
            read_credentials(tls)
        except TlsFilesError as exc:
            problems += [f"{where}.{key}: {message}" for key, message in exc.problems]
    return problems


class TlsFailures:
    """What the router knows of failed handshakes: counted, logged without flooding, shown."""

    def __init__(self) -> None:
        self._logs: dict[tuple[str, str], LogThrottle] = {}  # one per backend: it settles alone

    @staticmethod
    def prepare(endpoint: Endpoint) -> None:
        """A new backend with TLS: its series exist at 0, so that increase() sees the first error."""
        if endpoint.backend.tls is not None:
            for cause in HANDSHAKE_CAUSES:
                BACKEND_TLS_ERRORS.labels(endpoint.backend.model, endpoint.name, cause)

    def failed(self, endpoint: Endpoint, cause: str, seen_by: str) -> None:
        """A call (`seen_by` "call") or a health check ("health_check") of `endpoint` failed its
        TLS handshake for `cause`."""
        model, name = endpoint.backend.model, endpoint.name
        BACKEND_TLS_ERRORS.labels(model, name, cause).inc()
        endpoint.tls_error = cause
        throttle = self._logs.get((model, name))
        if throttle is None:
            throttle = self._logs[(model, name)] = LogThrottle(log)
        throttle.log(logging.WARNING, cause, "backend TLS handshake failed", extra={
            "model": model, "backend": name, "cause": cause, "why": DESCRIPTIONS[cause], "seen_by": seen_by})

    def recovered(self, endpoint: Endpoint) -> None:
        """A handshake got through again (a check passed, a call answered)."""
        endpoint.tls_error = ""
        throttle = self._logs.pop((endpoint.backend.model, endpoint.name), None)
        if throttle is not None:
            unreported = throttle.settle()
            log.info("backend TLS handshakes succeed again", extra={
                "model": endpoint.backend.model, "backend": endpoint.name, "unreported_failures": unreported})


Spawn = Callable[[Coroutine[Any, Any, Any], str], object]


async def keep_credentials_fresh(channels: Channels, router: Router, spawn: Spawn) -> None:
    """Runs until cancelled: after the files of a backend TLS setting in use changed and can be
    used, its backends get new channels (`Channels.renew`), routing keeps what it knows of them
    (`Router.reconfigure` with the same config), and the old channels drain, with the longest
    model timeout as grace, in tasks made by `spawn`."""
    waiting = LogThrottle(log)

    async def changed() -> bool:
        stale = channels.stale_credentials()
        if not stale:
            return True
        fresh, problems = await asyncio.to_thread(_read_each, stale)
        for tls, error in problems:
            waiting.log(logging.WARNING, repr(tls), "backend TLS files changed but cannot be used yet",
                        extra={"problems": str(error), "meanwhile": "channels keep the files read before"})
        removed = channels.renew(fresh)
        if removed:
            router.reconfigure(channels.config, channels.backends)
            grace = max(model.timeout_ms for model in channels.config.models.values()) / 1000.0
            for key, channel in removed.items():
                spawn(channels.drain(key, channel, grace), f"drain-channel {key}")
            files = sorted({path for key in removed if key.tls is not None for path in files_of(key.tls)})
            log.info("backend TLS credentials reloaded", extra={"files": files, "channels": [str(k) for k in removed]})
        if not problems:
            waiting.settle()
        return not problems

    async def guarded() -> bool:
        try:
            return await changed()
        except Exception as exc:  # noqa: BLE001 - a bug must not end rotation for the life of the process
            waiting.log(logging.ERROR, "bug", "backend TLS rotation failed; trying again", exc_info=exc)
            return False

    await watch_files(channels.credential_files, guarded)


Unusable = list[tuple[ClientTlsConfig, TlsFilesError]]


def _read_each(settings: list[ClientTlsConfig]) -> tuple[list[ClientCredentials], Unusable]:
    """The files of each setting read anew, or why they cannot be used. Blocking: in a worker thread."""
    fresh: list[ClientCredentials] = []
    problems: Unusable = []
    for tls in settings:
        try:
            fresh.append(read_credentials(tls))
        except TlsFilesError as exc:
            problems.append((tls, exc))
    return fresh, problems
