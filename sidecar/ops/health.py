"""Health: one place that knows whether the sidecar is live and ready, and why.

Drives the `grpc.health.v1` servicers (CONTRACT §4) and the JSON of `/healthz` and `/readyz`.
Readiness (services "" and `inference.v1.Inference`) is SERVING once the config is loaded and
the servers accept, and NOT_SERVING while draining and while no model has a healthy backend; `liveness` is answered by the event loop
itself, so it is SERVING for as long as the loop turns.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from sidecar.telemetry.build import build_info
from sidecar.telemetry.grpc_server import ObservedHealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS_SERVICES = ("", "inference.v1.Inference", "inference.GRPCInferenceService")
LIVENESS_SERVICE = "liveness"
log = logging.getLogger("sidecar.health")


class Health:
    def __init__(self, config_version: str) -> None:
        self.config_version = config_version
        self.started = False
        self.draining = False
        self.servicers: list[HealthServicer] = []
        # component name -> its readiness detail, e.g. {"status": "degraded", ...}; shown in /readyz
        self.components_from: dict[str, Callable[[], dict[str, Any]]] = {}
        # besides started and not draining, readiness needs this (some model has a healthy backend)
        self.backends_ok: Callable[[], bool] = lambda: True
        # more conditions readiness needs (e.g. the usage spool can take records)
        self.ready_checks: list[Callable[[], bool]] = []
        self._published: int | None = None
        self._started = asyncio.Event()

    def servicer(self) -> HealthServicer:
        """A servicer for one gRPC server; every servicer follows the same state."""
        servicer = ObservedHealthServicer()
        self.servicers.append(servicer)
        return servicer

    @property
    def ready(self) -> bool:
        return (self.started and not self.draining and self.backends_ok()
                and all(check() for check in self.ready_checks))

    async def publish(self) -> None:
        """Pushes the current state to every servicer (and so to every Watch stream); logs flips."""
        status = SERVING if self.ready else NOT_SERVING
        if status != self._published:
            self._published = status
            detail = self.components()
            (log.info if status == SERVING else log.warning)(
                "readiness %s", "SERVING" if status == SERVING else "NOT_SERVING",
                extra={"components": {name: c.get("status") for name, c in detail.items()}})
        for servicer in self.servicers:
            await servicer.set(LIVENESS_SERVICE, SERVING)
            for service in READINESS_SERVICES:
                await servicer.set(service, status)

    async def mark_started(self) -> None:
        self.started = True
        self._started.set()
        await self.publish()

    async def wait_started(self) -> None:
        """Returns once the servers accept and readiness was published (for `sidecar demo`)."""
        await self._started.wait()

    async def mark_draining(self) -> None:
        self.draining = True
        await self.publish()

    def components(self) -> dict[str, Any]:
        return {
            "config": {"status": "ok", "version": self.config_version},
            "server": {"status": "draining" if self.draining else ("serving" if self.started else "starting")},
            **{name: component() for name, component in self.components_from.items()},
        }

    def liveness_body(self) -> dict[str, Any]:
        return {"status": "ok", **build_info()}

    def readiness_body(self) -> dict[str, Any]:
        return {"status": "ready" if self.ready else "not_ready", "components": self.components()}
