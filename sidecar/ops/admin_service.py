"""`sidecar.admin.v1.RoutingAdmin` (routes, health, overrides) and `Audit` on the admin listener.

Every call has passed `AdminAuth` (an admin token). Changes are written as audit log lines
(`routing override set` / `cleared`, with the admin token id, what and why) and take effect at
once: the router applies them to the very next call.

An admin's input is validated like config (`overrides.problem`: a weight finite and at most
config's `MAX_WEIGHT`, a bounded TTL, short names and reason): a token is no licence to send
all traffic to one backend with `weight=inf`, or a megabyte of name into the logs. Refusals are
INVALID_ARGUMENT / INVALID_REQUEST with BadRequest naming the field.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from sidecar import errors
from sidecar.call import MAX_REQUEST_ID_CHARS, new_request_id
from sidecar.errors import SidecarError, invalid_request, missing_field, too_long
from sidecar.ops.admin_auth import ADMIN_TOKEN_ID
from sidecar.routing.endpoints import Endpoint
from sidecar.routing.overrides import Override, name_problem, problem
from sidecar.routing.router import Router
from sidecar.usage.audit import AuditStore

log = logging.getLogger("sidecar.admin")
Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")
HEALTH = admin_pb2.BackendHealth


async def _rescued(context: Context, work: Callable[[], Awaitable[R]]) -> R:
    try:
        return await work()
    except SidecarError as exc:
        rescued = errors.rescue(exc, new_request_id())
        await context.abort(rescued.code, rescued.message, rescued.trailing_metadata)
        raise  # unreachable: abort raises


class RoutingAdmin(admin_pb2_grpc.RoutingAdminServicer):
    def __init__(self, router: Router, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._router = router
        self._wall = wall
        self._clock = clock

    async def ListRoutes(self, request: admin_pb2.ListRoutesRequest,
                         context: Context) -> admin_pb2.ListRoutesResponse:
        async def work() -> admin_pb2.ListRoutesResponse:
            _check_names(request.model)
            models = [request.model] if request.model else sorted(self._router.endpoints)
            if request.model and request.model not in self._router.endpoints:
                raise SidecarError("NOT_FOUND", f"unknown model {request.model!r}", metadata={"model": request.model})
            live = self._router.overrides.live(self._wall())
            return admin_pb2.ListRoutesResponse(routes=[
                admin_pb2.Route(model=model, backends=[self._backend(e) for e in self._router.endpoints[model]],
                                overrides=[_message(o) for o in live if o.model == model])
                for model in models])
        return await _rescued(context, work)

    def _backend(self, endpoint: Endpoint) -> admin_pb2.BackendRoute:
        now = self._clock()
        if endpoint.drained:
            health = HEALTH.BACKEND_HEALTH_DRAINING
        elif endpoint.ejected(now):
            health = HEALTH.BACKEND_HEALTH_EJECTED
        else:
            health = HEALTH.BACKEND_HEALTH_HEALTHY if endpoint.healthy else HEALTH.BACKEND_HEALTH_UNHEALTHY
        route = admin_pb2.BackendRoute(
            name=endpoint.name, address=endpoint.backend.config.address, priority=endpoint.priority,
            configured_weight=endpoint.backend.config.weight,
            effective_weight=endpoint.weight if endpoint.routable(now) else 0.0,
            health=health, in_flight=endpoint.in_flight)
        if endpoint.ejected(now):
            route.ejected_until.CopyFrom(_timestamp(self._wall() + endpoint.ejected_until - now))
        return route

    async def SetOverride(self, request: admin_pb2.SetOverrideRequest, context: Context) -> admin_pb2.Override:
        async def work() -> admin_pb2.Override:
            _check_names(request.model, request.backend)
            if self._router.endpoint(request.model, request.backend) is None:
                raise SidecarError("NOT_FOUND", f"model {request.model!r} has no backend {request.backend!r}",
                                   metadata={"model": request.model, "backend": request.backend})
            action = request.WhichOneof("action")
            if action is None:
                raise missing_field("action")
            if action in ("drain", "pin") and not getattr(request, action):
                raise invalid_request(f"{action} must be true (use ClearOverride to undo)", action)
            now = self._wall()
            override = Override(request.model, request.backend, action, request.weight, request.ttl_seconds,
                                request.reason, ADMIN_TOKEN_ID.get(), now,
                                now + request.ttl_seconds if request.ttl_seconds else 0.0)
            found = problem(override)
            if found is not None:
                raise invalid_request(found[1], found[0])
            await self._router.set_override(override)
            log.warning("routing override set", extra={
                "admin_token_id": override.created_by, "model": override.model, "backend": override.backend,
                "action": action, "weight": override.weight if action == "weight" else None,
                "ttl_seconds": override.ttl_seconds, "reason": override.reason})
            return _message(override)
        return await _rescued(context, work)

    async def ClearOverride(self, request: admin_pb2.ClearOverrideRequest,
                            context: Context) -> admin_pb2.ClearOverrideResponse:
        async def work() -> admin_pb2.ClearOverrideResponse:
            _check_names(request.model, request.backend)
            cleared = await self._router.clear_override(request.model, request.backend)
            log.warning("routing override cleared", extra={
                "admin_token_id": ADMIN_TOKEN_ID.get(), "model": request.model, "backend": request.backend,
                "cleared": cleared})
            return admin_pb2.ClearOverrideResponse(cleared=cleared)
        return await _rescued(context, work)


class AuditService(admin_pb2_grpc.AuditServicer):
    """`Audit.GetRequest`: the decision record of a recent call, by its request id."""

    def __init__(self, audit: AuditStore) -> None:
        self._audit = audit

    async def GetRequest(self, request: admin_pb2.GetRequestRequest, context: Context) -> admin_pb2.AuditRecord:
        async def work() -> admin_pb2.AuditRecord:
            if not request.request_id:
                raise missing_field("request_id")
            if len(request.request_id) > MAX_REQUEST_ID_CHARS:  # no call has such an id
                raise too_long("request_id", MAX_REQUEST_ID_CHARS, "characters")
            record = await self._audit.get(request.request_id)
            if record is None:
                raise SidecarError("REQUEST_NOT_FOUND", f"no record of request {request.request_id!r} (unknown, "
                                   "not authenticated, or too old)", metadata={"request_id": request.request_id})
            return record
        return await _rescued(context, work)


def _check_names(model: str, backend: str = "") -> None:
    """Refuses a name too long to be one before it is looked up, echoed or logged."""
    found = name_problem("model", model) or name_problem("backend", backend)
    if found is not None:
        raise invalid_request(found[1], found[0])


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _message(override: Override) -> admin_pb2.Override:
    message = admin_pb2.Override(model=override.model, backend=override.backend,
                                 ttl_seconds=override.ttl_seconds, reason=override.reason,
                                 created_by=override.created_by, created_at=_timestamp(override.created_at))
    if override.expires_at:
        message.expires_at.CopyFrom(_timestamp(override.expires_at))
    if override.action == "weight":
        message.weight = override.weight
    elif override.action == "drain":
        message.drain = True
    else:
        message.pin = True
    return message
