"""Active health checks: `grpc.health.v1.Health/Check` to every backend channel on an interval
(or, for models with `health_checks.method: oip_model_ready`, the Open Inference Protocol's
`ModelReady` of each such model: runtimes like MLServer serve no grpc health).

One named task per distinct channel key (address and TLS setting), on the same channel the calls
use -- the one in force at each check, so the same credentials, and after a certificate rotation
the new channel -- and a check also keeps that channel connected. A check passes when the backend
answers SERVING within the timeout; anything else fails it, and a failed TLS handshake is also
reported as such (backend_tls.py). The router turns streaks of results into healthy/unhealthy.
After a config reload, `reconfigure` starts checks of new keys, stops those of removed ones, and
every check from then on uses the new settings.

A channel shared by models with different methods gets every check its models ask for, each
round: one grpc health check for the models with `grpc_health`, one `ModelReady(name)` per model
with `oip_model_ready`; each result counts for its own models' backends only (a model the
runtime has not loaded does not take the other models at that address down).
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from sidecar.config import HealthChecksConfig
from sidecar.oip.wire import WireError, bool_value, string_field
from sidecar.routing.channels import ChannelKey, Channels
from sidecar.routing.router import Router
from sidecar.tasks import Tasks
from sidecar.tls_client import handshake_failure

log = logging.getLogger("sidecar.routing")
CHECK = "/grpc.health.v1.Health/Check"
MODEL_READY = "/inference.GRPCInferenceService/ModelReady"
Check = grpc.aio.UnaryUnaryMultiCallable[HealthCheckRequest, HealthCheckResponse]


class HealthChecker:
    def __init__(self, router: Router, channels: Channels, config: HealthChecksConfig) -> None:
        self._router = router
        self._channels = channels
        self._config = config
        self._tasks = Tasks()
        self._checks: dict[ChannelKey, asyncio.Task[None]] = {}  # channel key -> its task
        self._started = False

    def start(self) -> None:
        self._started = True
        self.reconfigure(self._config)

    def reconfigure(self, config: HealthChecksConfig) -> None:
        """Checks every channel key the router has now, with `config` (at start and after a reload)."""
        self._config = config
        if not self._started:
            return
        wanted = set(self._router.channel_keys) if config.enabled else set()
        for key in [k for k in self._checks if k not in wanted]:
            self._checks.pop(key).cancel()
        for key in wanted.difference(self._checks):
            self._checks[key] = self._tasks.spawn(self._check_forever(key), name=f"health-check {key}")

    async def _check_forever(self, key: ChannelKey) -> None:
        while True:
            config = self._config  # the settings in force, a reload included
            check: Check = self._channels.channel(key).unary_unary(  # the channel in force, a rotation included
                CHECK, request_serializer=HealthCheckRequest.SerializeToString,
                response_deserializer=HealthCheckResponse.FromString)
            by_health, by_model_ready = self._methods(key)
            if by_health:
                passed, tls_cause = await self._passes(key, check, HealthCheckRequest(service=config.service),
                                                       config.timeout_ms)
                self._router.record_check(key, passed, tls_cause, None if not by_model_ready else by_health)
            for model in by_model_ready:
                passed, tls_cause = await self._model_ready(key, model, config.timeout_ms)
                self._router.record_check(key, passed, tls_cause, (model,))
            await asyncio.sleep(self._config.interval_ms / 1000.0)

    def _methods(self, key: ChannelKey) -> tuple[list[str], list[str]]:
        """The models with backends on `key`: those checked by grpc health, and by ModelReady."""
        models = self._channels.config.models
        on_key = [m for m, backends in self._channels.backends.items() if any(b.key == key for b in backends)]
        model_ready = [m for m in on_key if models[m].health_checks.method == "oip_model_ready"]
        return [m for m in on_key if m not in model_ready], model_ready

    async def _model_ready(self, key: ChannelKey, model: str, timeout_ms: int) -> tuple[bool, str | None]:
        """OIP `ModelReady(name=model)` passes when the backend answers `ready: true` in time."""
        ready: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channels.channel(key).unary_unary(MODEL_READY)
        try:
            answer: bytes = await ready(string_field(1, model), timeout=timeout_ms / 1000.0)
        except grpc.aio.AioRpcError as exc:
            tls = key.tls is not None and exc.code() == grpc.StatusCode.UNAVAILABLE
            return False, handshake_failure(exc.details()) if tls else None
        try:
            return bool_value(answer, 1), None
        except WireError:
            return False, None

    async def _passes(self, key: ChannelKey, check: Check, request: HealthCheckRequest,
                      timeout_ms: int) -> tuple[bool, str | None]:
        """Whether the check passed and, when it failed on the TLS handshake, why."""
        try:
            response = await check(request, timeout=timeout_ms / 1000.0)
        except grpc.aio.AioRpcError as exc:
            tls = key.tls is not None and exc.code() == grpc.StatusCode.UNAVAILABLE
            return False, handshake_failure(exc.details()) if tls else None
        return bool(response.status == HealthCheckResponse.SERVING), None

    async def aclose(self) -> None:
        self._checks.clear()
        await self._tasks.aclose(timeout=0)

    def __repr__(self) -> str:
        return f"<HealthChecker {sorted(map(str, self._checks))} every {self._config.interval_ms} ms>"
