"""Active health checks: `grpc.health.v1.Health/Check` to every backend address on an interval.

One named task per distinct address, on the same channel the calls use (so a check also keeps
that channel connected). A check passes when the backend answers SERVING within the timeout;
anything else fails it. The router turns streaks of results into healthy/unhealthy. After a
config reload, `reconfigure` starts checks of new addresses, stops those of removed ones, and
every check from then on uses the new settings.
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
        self._checks: dict[str, asyncio.Task[None]] = {}  # address -> its task
        self._started = False

    def start(self) -> None:
        self._started = True
        self.reconfigure(self._config)

    def reconfigure(self, config: HealthChecksConfig) -> None:
        """Checks every address the router has now, with `config` (at start and after a reload)."""
        self._config = config
        if not self._started:
            return
        wanted = set(self._router.addresses) if config.enabled else set()
        for address in [a for a in self._checks if a not in wanted]:
            self._checks.pop(address).cancel()
        for address in wanted.difference(self._checks):
            check: Check = self._channels.channel(address).unary_unary(
                CHECK, request_serializer=HealthCheckRequest.SerializeToString,
                response_deserializer=HealthCheckResponse.FromString)
            self._checks[address] = self._tasks.spawn(self._check_forever(address, check),
                                                      name=f"health-check {address}")

    async def _check_forever(self, address: str, check: Check) -> None:
        while True:
            config = self._config  # the settings in force, a reload included
            passed = await self._passes(check, HealthCheckRequest(service=config.service), config.timeout_ms)
            self._router.record_check(address, passed)
            await asyncio.sleep(self._config.interval_ms / 1000.0)

    async def _passes(self, check: Check, request: HealthCheckRequest, timeout_ms: int) -> bool:
        try:
            response = await check(request, timeout=timeout_ms / 1000.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == HealthCheckResponse.SERVING)

    async def aclose(self) -> None:
        self._checks.clear()
        await self._tasks.aclose(timeout=0)

    def __repr__(self) -> str:
        return f"<HealthChecker {sorted(self._checks)} every {self._config.interval_ms} ms>"
