"""The shared store behind a circuit breaker, with the configured answer for when it fails.

Every decision first goes to the shared store (Redis). When it fails, or while the breaker is
open after repeated failures, `limits.on_store_error` decides:

1. `allow`: a local memory store holding `1/expected_replicas` of every rate and budget decides
   instead, so that the replicas together stay near the configured limit while Redis is out.
   Its buckets start with one second's worth, not a burst, so a store that flaps cannot hand
   out a burst each time.
   Each such decision is counted (`api_router_limit_degraded_decisions_total`).
2. `deny`: the call fails with UNAVAILABLE / SERVICE_UNAVAILABLE.

While the breaker is open, calls never touch Redis (none waits out a timeout); a probe pings it
every cooldown and closes the breaker when it answers, so recovery needs no restart.

A call whose Redis decision failed after it may have run there is decided (and charged) by the
fallback; the Redis store releases its own charge in the background, so the call is charged once,
where its verdict came from, and settled there.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sidecar.errors import SidecarError
from sidecar.limits.breaker import Breaker
from sidecar.limits.memory_store import MemoryLimitStore
from sidecar.limits.redis_store import RedisLimitStore
from sidecar.limits.store import Ask, StoreUnavailable, Verdict
from sidecar.tasks import Tasks
from sidecar.telemetry.metrics import LIMIT_STORE_DEGRADED, LIMIT_STORE_DEGRADED_DECISIONS, LIMIT_STORE_ERRORS

log = logging.getLogger("sidecar.limits")


class GuardedStore:
    def __init__(self, primary: RedisLimitStore, *, on_error: str, share: float, failures: int,
                 cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = primary.name
        self.on_error = on_error
        self._primary = primary
        self._fallback = MemoryLimitStore(share=share, start_empty=True)
        self._breaker = Breaker(failures, cooldown, clock)
        self._tasks = Tasks()
        self._last_error = ""
        primary.on_failure = self._settle_failed  # settlements are flushed in the background

    async def start(self) -> None:
        await self._primary.start()

    async def admit(self, ask: Ask) -> Verdict:
        if not self._breaker.open:
            try:
                verdict = await self._primary.admit(ask)
            except StoreUnavailable as exc:
                self._failed(exc)
            else:
                self._breaker.record_success()
                return verdict
        return self._degraded(ask)

    def _degraded(self, ask: Ask) -> Verdict:
        if self.on_error == "deny":
            LIMIT_STORE_DEGRADED_DECISIONS.labels("denied").inc()
            raise SidecarError("SERVICE_UNAVAILABLE", "the limit store is unavailable; try again shortly")
        verdict = replace(self._fallback.admit_now(ask), degraded=True)
        LIMIT_STORE_DEGRADED_DECISIONS.labels("allowed" if verdict.allowed else "denied").inc()
        return verdict

    def settle(self, ask: Ask, rate_deltas: tuple[float, ...], budget_deltas: tuple[int, ...],
               *, degraded: bool = False) -> None:
        if degraded:
            self._fallback.settle(ask, rate_deltas, budget_deltas)
        else:  # also while the breaker is open: the Redis store resends it until Redis answers
            self._primary.settle(ask, rate_deltas, budget_deltas)

    async def flush(self) -> None:
        await self._primary.flush()

    def wall(self) -> float:
        return self._primary.wall()  # Redis's clock, as last learned: also while it is out

    def _settle_failed(self, exc: StoreUnavailable) -> None:
        """A batch of settlements failed: counted and logged; the Redis store resends it in the
        background (applied once however often sent). Not held against the breaker: admissions
        decide that on their own calls.
        """
        LIMIT_STORE_ERRORS.inc()
        log.warning("limit store settlement failed; resending it", extra={"error": str(exc)})

    def _failed(self, exc: StoreUnavailable) -> None:
        LIMIT_STORE_ERRORS.inc()
        self._last_error = str(exc)
        if self._breaker.record_failure():
            LIMIT_STORE_DEGRADED.set(1)
            log.warning("limit store unavailable; deciding %s", "locally" if self.on_error == "allow" else "deny",
                        extra={"store": self.name, "error": self._last_error, "on_store_error": self.on_error})
            self._tasks.spawn(self._probe(), name="limit-store-probe")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self._breaker.cooldown)
            if await self._primary.ping():
                self._breaker.record_success()
                LIMIT_STORE_DEGRADED.set(0)
                log.info("limit store recovered", extra={"store": self.name})
                return

    def component(self) -> dict[str, Any]:
        if not self._breaker.open:
            return {"status": "ok", "store": self.name}
        return {"status": "degraded", "store": self.name, "on_store_error": self.on_error,
                "error": self._last_error}

    async def aclose(self) -> None:
        await self._tasks.aclose(timeout=0)
        await self._primary.aclose()

    def __repr__(self) -> str:
        return f"<GuardedStore {self._primary!r} {self._breaker!r} on_error={self.on_error}>"
