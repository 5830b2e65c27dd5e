"""The router: which backend takes a call, what its outcome teaches, and whether to retry.

Owns every model's endpoints (`endpoints.py`), the balancer and the retry budget. The pipeline's
`PickBackend` stage calls `pick`; the proxy reports every attempt (`attempt_started`,
`attempt_ended`, and `tls_failed` for a failed TLS handshake) and asks `retry` after a failed
one; the health checker reports checks (`record_check`). Changes of routability call
`on_change`, so readiness can follow them. A config reload (and a certificate rotation) calls
`reconfigure`, which keeps what was learnt about the backends that stay.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import grpc

from sidecar.call import AttemptRecord, Call
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.routing.affinity import HashRing, input_prefix
from sidecar.routing.backend_tls import TlsFailures
from sidecar.routing.balancer import WeightedRandom
from sidecar.routing.channels import Backend, ChannelKey
from sidecar.routing.endpoints import Endpoint, may_eject
from sidecar.routing.overrides import FILE_NAME as OVERRIDES_FILE
from sidecar.routing.overrides import Override, OverrideTable
from sidecar.routing.retry_budget import RetryBudget
from sidecar.telemetry.metrics import (
    BACKEND_DURATION,
    BACKEND_EJECTIONS,
    BACKEND_ERRORS,
    BACKEND_HEALTHY,
    BACKEND_REQUESTS,
    BACKEND_USAGE_CLAMPED,
    ROUTING_DECISIONS,
)

log = logging.getLogger("sidecar.routing")
# outcomes that count against a backend (DEADLINE_EXCEEDED only when the backend's own time ran out)
BACKEND_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
MIN_RETRY_SECONDS = 0.01  # a retry needs at least this much of the deadline left


class Router:
    def __init__(self, config: Config, backends: dict[str, list[Backend]],
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self._rng = rng or random.Random()
        self._clock = clock
        self._wall = wall
        self._budget = RetryBudget(config.retries.budget_percent, config.retries.min_retries_per_second, clock)
        self.overrides = OverrideTable(Path(config.state_dir) / OVERRIDES_FILE)  # app.py may give it Redis
        self._pins: dict[str, Endpoint] = {}
        self._override_timer: asyncio.TimerHandle | None = None  # the next expiry's re-apply
        self.on_change: Callable[[], None] = lambda: None
        self.tls = TlsFailures()
        self._build(config, {model: [Endpoint(b) for b in group] for model, group in backends.items()})
        for group in self.endpoints.values():
            for endpoint in group:
                BACKEND_HEALTHY.labels(endpoint.backend.model, endpoint.name).set(1)
                BACKEND_USAGE_CLAMPED.labels(endpoint.backend.model, endpoint.name)  # a rare event: exists at 0
                self.tls.prepare(endpoint)

    def _build(self, config: Config, endpoints: dict[str, list[Endpoint]]) -> None:
        """The tables and settings taken from a config: at start, and on every reload."""
        self.endpoints = endpoints
        self._by_key: dict[ChannelKey, list[Endpoint]] = {}
        for group in endpoints.values():
            for endpoint in group:
                self._by_key.setdefault(endpoint.backend.key, []).append(endpoint)
        self._balancer = WeightedRandom(endpoints, self._rng, p2c_models=[
            m for m, model in config.models.items() if model.balancer == "p2c_ewma"])
        self._rings = {m: HashRing([b.name for b in model.backends])
                       for m, model in config.models.items() if model.affinity != "none"}
        # affinity: prefix models and how many bytes of the input make their key; the others
        # of `_rings` key on the session id
        self._prefix_bytes = {m: model.prefix_bytes for m, model in config.models.items()
                              if model.affinity == "prefix"}
        self._health = config.health_checks
        self._outlier = config.outlier_detection
        self._retries = config.retries
        self._retry_on = frozenset(grpc.StatusCode[name] for name in config.retries.retry_on)
        self._budget.percent = config.retries.budget_percent
        self._budget.min_per_second = config.retries.min_retries_per_second

    def reconfigure(self, config: Config, backends: dict[str, list[Backend]]) -> None:
        """After a reload, in one synchronous step (no call sees half of it). A backend whose
        model, name, address and TLS setting stay keeps its endpoint -- health, ejection, latency,
        calls in flight -- with its new settings (weight, priority, max_in_flight) and channel (a
        certificate rotation calls this with the same config); new backends start healthy;
        removed ones are retired: calls running on them finish, and nothing is learnt from them
        any more. Overrides apply again (one whose backend left waits for its return)."""
        kept = {(e.backend.model, e.name, e.backend.key): e for group in self.endpoints.values() for e in group}
        endpoints: dict[str, list[Endpoint]] = {}
        added: list[Endpoint] = []
        for model, configured in backends.items():
            endpoints[model] = []
            for backend in configured:
                staying = kept.pop((model, backend.name, backend.key), None)
                if staying is None:
                    staying = Endpoint(backend)
                    added.append(staying)
                staying.backend = backend
                endpoints[model].append(staying)
        for gone in kept.values():
            gone.retired = True
            if not any(e.name == gone.name for e in endpoints.get(gone.backend.model, ())):
                with contextlib.suppress(KeyError):  # its gauge series goes with it
                    BACKEND_HEALTHY.remove(gone.backend.model, gone.name)
        self._build(config, endpoints)
        for endpoint in added:
            BACKEND_HEALTHY.labels(endpoint.backend.model, endpoint.name).set(1)
            BACKEND_USAGE_CLAMPED.labels(endpoint.backend.model, endpoint.name)
            self.tls.prepare(endpoint)
        if not config.health_checks.enabled:  # as at a start without checks: nothing marks them down
            for group in endpoints.values():
                for endpoint in group:
                    endpoint.healthy, endpoint.check_streak = True, 0
        self.apply_overrides()
        for group in endpoints.values():
            for endpoint in group:
                self._announce(endpoint)

    @property
    def channel_keys(self) -> list[ChannelKey]:
        """The distinct channels of the backends (what health checks check)."""
        return list(self._by_key)

    # --- choosing ------------------------------------------------------------------------------

    def pick(self, call: Call) -> None:
        """Sets `call.endpoint` for the call's first attempt, or refuses it."""
        model = call.request.model
        now = self._clock()
        self._budget.record_call()
        pinned = self._pins.get(model)
        if pinned is not None and pinned.routable(now):
            _chosen(call, pinned, "override")
            return
        ring = self._rings.get(model)  # None for most models: no more work than this lookup
        if ring is not None:
            key = self._affinity_key(call, model)
            sticky = self._sticky(ring, model, key, now) if key else None
            if sticky is not None:
                _chosen(call, sticky, "affinity")
                return
        picked = self._balancer.pick(model, now)
        if picked is None:
            raise SidecarError("NO_BACKEND_AVAILABLE", f"no backend of model {model!r} can take the call",
                               metadata={"model": model})
        endpoint, tier = picked
        _chosen(call, endpoint, "override" if endpoint.override_weight is not None
                else "primary" if tier == 0 else "failover")

    def _affinity_key(self, call: Call, model: str) -> str | bytes:
        """What a model with affinity hashes: the input's prefix (`affinity: prefix`, which then
        ignores `session_id`), else the session id; empty (balanced as usual) without one."""
        limit = self._prefix_bytes.get(model)
        if limit is None:
            return call.request.session_id
        request = call.request
        # `input` hands over the whole text (upb decodes it on each read: ~1 us at 10 KB, what the
        # limits and billing stages pay too); only its first `limit` bytes are encoded and hashed
        return input_prefix(request.input, request.input_bytes, limit)

    def _sticky(self, ring: HashRing, model: str, key: str | bytes, now: float) -> Endpoint | None:
        """The key's backend among the routable ones of the first tier that has any: the same
        while it stays routable and under 1.25 x the average load; only its keys move."""
        _, candidates = self._balancer.candidates(model, now)
        by_name = {e.name: e for e in candidates}
        name = ring.choose(key, by_name, {e.name: e.in_flight for e in candidates})
        return None if name is None else by_name[name]

    def retry(self, call: Call, code: grpc.StatusCode) -> bool:
        """After a failed attempt that sent nothing to the caller: picks another backend and
        returns True when the code is retryable, attempts, deadline and budget allow, and another
        backend can take the call."""
        if (code not in self._retry_on or len(call.attempts) >= self._retries.max_attempts
                or call.backend_timeout() < MIN_RETRY_SECONDS):
            return False
        tried = {e for e in self.endpoints.get(call.request.model, ()) if e.name in {a.backend for a in call.attempts}}
        picked = self._balancer.pick(call.request.model, self._clock(), exclude=tried)
        if picked is None or not self._budget.try_retry():
            return False
        _chosen(call, picked[0], "failover")
        return True

    # --- operator overrides --------------------------------------------------------------------

    def endpoint(self, model: str, backend: str) -> Endpoint | None:
        return next((e for e in self.endpoints.get(model, ()) if e.name == backend), None)

    async def load_overrides(self) -> None:
        """At start: the overrides kept before a restart, minus those that expired meanwhile."""
        await self.overrides.load(self._wall())
        restored = self.overrides.live(self._wall())
        if restored:
            log.warning("routing overrides restored", extra={
                "store": repr(self.overrides), "overrides": [f"{o.field}:{o.action}" for o in restored]})
        self.apply_overrides()

    async def sync_overrides(self) -> None:
        """With a shared store: picks up what other sidecars changed."""
        if await self.overrides.load(self._wall()):
            log.info("routing overrides changed elsewhere", extra={
                "overrides": [f"{o.field}:{o.action}" for o in self.overrides.live(self._wall())]})
            self.apply_overrides()

    async def set_override(self, override: Override) -> None:
        await self.overrides.put(override)
        self.apply_overrides()

    async def clear_override(self, model: str, backend: str) -> bool:
        cleared = await self.overrides.clear(model, backend)
        self.apply_overrides()
        return cleared

    def apply_overrides(self) -> None:
        """Makes the endpoints follow the live overrides; again when the next one expires."""
        now = self._wall()
        for group in self.endpoints.values():
            for each in group:
                each.override_weight, each.drained = None, False
        self._pins = {}
        next_expiry = 0.0
        for override in self.overrides.live(now):
            target = self.endpoint(override.model, override.backend)
            if target is None:
                continue  # its backend left the config
            if override.action == "weight":
                target.override_weight = override.weight
            elif override.action == "drain":
                target.drained = True
            else:
                self._pins[override.model] = target
            if override.expires_at and (not next_expiry or override.expires_at < next_expiry):
                next_expiry = override.expires_at
        if self._override_timer is not None:  # one timer, for the next expiry: applies never stack them
            self._override_timer.cancel()
        self._override_timer = _later(next_expiry - now, self.apply_overrides) if next_expiry else None

    # --- learning from outcomes ---------------------------------------------------------------

    def attempt_started(self, endpoint: Endpoint) -> float:
        endpoint.in_flight += 1
        return time.perf_counter()

    def attempt_ended(self, call: Call, endpoint: Endpoint, code: grpc.StatusCode | None, started: float,
                      backend_timed_out: bool = False) -> None:
        """Records one attempt: `code` None = the caller went away (no verdict on the backend)."""
        endpoint.in_flight -= 1
        seconds = time.perf_counter() - started
        name = code.name if code is not None else "CANCELLED"
        call.attempts.append(AttemptRecord(endpoint.name, name, round(seconds * 1000, 3), endpoint.backend.config.address))
        _observe(endpoint, name, seconds, {"trace_id": call.trace_id} if call.spans is not None else None)
        if code is None or endpoint.retired:
            return  # the caller went away, or a reload removed the backend while the call ran
        now = self._clock()
        if code == grpc.StatusCode.OK:
            endpoint.record_success(now, self._outlier)
            endpoint.latency.observe(seconds, now)
            if endpoint.tls_error:
                self.tls.recovered(endpoint)
        elif code in BACKEND_FAULTS or (code == grpc.StatusCode.DEADLINE_EXCEEDED and backend_timed_out):
            BACKEND_ERRORS.labels(endpoint.backend.model, endpoint.name, name).inc()
            group = self.endpoints[endpoint.backend.model]
            if endpoint.record_failure(now, self._outlier, may_eject(group, now, self._outlier.max_ejection_percent)):
                BACKEND_EJECTIONS.labels(endpoint.backend.model, endpoint.name).inc()
                log.warning("backend ejected", extra={"model": endpoint.backend.model, "backend": endpoint.name,
                                                      "seconds": round(endpoint.ejected_until - now, 3),
                                                      "times_ejected": endpoint.times_ejected})
                _later(endpoint.ejected_until - now, lambda: self._announce(endpoint))
        self._announce(endpoint)

    def tls_failed(self, endpoint: Endpoint, cause: str) -> None:
        """A call's attempt on `endpoint` failed its TLS handshake (the attempt still ends as usual)."""
        if not endpoint.retired:
            self.tls.failed(endpoint, cause, "call")

    def record_check(self, key: ChannelKey, passed: bool, tls_cause: str | None = None,
                     models: Collection[str] | None = None) -> None:
        """One active health check of the channel `key` (shared by every model's backend there,
        or only by those of `models`: a check that asks about one model); `tls_cause`: it failed
        on the TLS handshake, for this reason."""
        for endpoint in self._by_key.get(key, ()):
            if models is not None and endpoint.backend.model not in models:
                continue
            if tls_cause is not None:
                self.tls.failed(endpoint, tls_cause, "health_check")
            elif passed and endpoint.tls_error:
                self.tls.recovered(endpoint)
            if endpoint.record_check(passed, self._health.unhealthy_threshold, self._health.healthy_threshold):
                log.warning("backend %s", "healthy" if passed else "unhealthy",
                            extra={"model": endpoint.backend.model, "backend": endpoint.name})
            self._announce(endpoint)

    def _announce(self, endpoint: Endpoint) -> None:
        """Reports a change of `up` (a flip of health, an ejection, or its end) to the gauge and
        to `on_change`; called whenever the router hears of the backend, and when an ejection ends."""
        up = endpoint.up(self._clock())
        if up != endpoint.announced and not endpoint.retired:
            endpoint.announced = up
            BACKEND_HEALTHY.labels(endpoint.backend.model, endpoint.name).set(int(up))
            self.on_change()

    # --- state ---------------------------------------------------------------------------------

    def any_routable(self) -> bool:
        """Readiness: some model has a backend that is healthy and not ejected."""
        now = self._clock()
        return any(e.up(now) for group in self.endpoints.values() for e in group)

    def component(self) -> dict[str, Any]:
        now = self._clock()
        models = {model: {e.name: ("ejected" if e.ejected(now) else "healthy" if e.healthy else "unhealthy")
                          for e in group} for model, group in self.endpoints.items()}
        in_flight = {model: {e.name: e.in_flight for e in group} for model, group in self.endpoints.items()}
        component = {"status": "ok" if self.any_routable() else "no_healthy_backend", "models": models,
                     "in_flight": in_flight}
        tls_errors = {model: failing for model, group in self.endpoints.items()
                      if (failing := {e.name: e.tls_error for e in group if e.tls_error})}
        if tls_errors:  # the cause of each backend's last failed TLS handshake, until one succeeds
            component["tls_errors"] = tls_errors
        return component

    def __repr__(self) -> str:
        return f"<Router models={sorted(self.endpoints)} {self._budget!r}>"


def _later(seconds: float, callback: Callable[[], None]) -> asyncio.TimerHandle | None:
    """Runs `callback` once `seconds` are over (an ejection, an override) when an event loop runs:
    always in the sidecar; pure use without one relies on the next check or call instead."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.call_later(seconds + 0.001, callback)


def _chosen(call: Call, endpoint: Endpoint, decision: str) -> None:
    call.endpoint, call.routing_decision = endpoint, decision
    call.decide("route", decision, endpoint.name)
    _decision(endpoint, decision)


def _decision(endpoint: Endpoint, decision: str) -> None:
    child = endpoint.tags.get(decision)
    if child is None:
        child = endpoint.tags[decision] = ROUTING_DECISIONS.labels(endpoint.backend.model, endpoint.name, decision)
    child.inc()  # type: ignore[attr-defined]


def _observe(endpoint: Endpoint, code: str, seconds: float, exemplar: dict[str, str] | None) -> None:
    key = f"code:{code}"
    child = endpoint.tags.get(key)
    if child is None:
        child = endpoint.tags[key] = BACKEND_REQUESTS.labels(endpoint.backend.model, endpoint.name, code)
    child.inc()  # type: ignore[attr-defined]
    duration = endpoint.tags.get("duration")
    if duration is None:
        duration = endpoint.tags["duration"] = BACKEND_DURATION.labels(endpoint.backend.model, endpoint.name)
    duration.observe(seconds, exemplar)  # type: ignore[attr-defined]
