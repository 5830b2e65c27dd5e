"""Active health checks: `grpc.health.v1.Health/Check` to every backend address on an interval.

One named task per distinct address, on the same channel the calls use (so a check also keeps
that channel connected). A check passes when the backend answers SERVING within the timeout;
anything else fails it. The router turns streaks of results into healthy/unhealthy.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from sidecar.config import HealthChecksConfig
from sidecar.routing.channels import Channels
from sidecar.routing.router import Router
from sidecar.tasks import Tasks

log = logging.getLogger("sidecar.routing")
CHECK = "/grpc.health.v1.Health/Check"
Check = grpc.aio.UnaryUnaryMultiCallable[HealthCheckRequest, HealthCheckResponse]


class HealthChecker:
    def __init__(self, router: Router, channels: Channels, config: HealthChecksConfig) -> None:
        self._router = router
        self._channels = channels
        self._config = config
        self._tasks = Tasks()

    def start(self) -> None:
        if not self._config.enabled:
            return
        for address in self._router.addresses:
            check: Check = self._channels.channel(address).unary_unary(
                CHECK, request_serializer=HealthCheckRequest.SerializeToString,
                response_deserializer=HealthCheckResponse.FromString)
            self._tasks.spawn(self._check_forever(address, check), name=f"health-check {address}")

    async def _check_forever(self, address: str, check: Check) -> None:
        request = HealthCheckRequest(service=self._config.service)
        while True:
            self._router.record_check(address, await self._passes(check, request))
            await asyncio.sleep(self._config.interval_ms / 1000.0)

    async def _passes(self, check: Check, request: HealthCheckRequest) -> bool:
        try:
            response = await check(request, timeout=self._config.timeout_ms / 1000.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == HealthCheckResponse.SERVING)

    async def aclose(self) -> None:
        await self._tasks.aclose(timeout=0)

    def __repr__(self) -> str:
        return f"<HealthChecker {self._router.addresses} every {self._config.interval_ms} ms>"
