"""The shared store behind a circuit breaker, with the configured answer for when it fails.

Every decision first goes to the shared store (Redis). When it fails, or while the breaker is
open after repeated failures, `limits.on_store_error` decides:

1. `allow`: a local memory store holding `1/n` of every rate and budget decides instead, where
   `n` is the number of sidecars sharing the store (never less than `limits.expected_replicas`),
   so that the fleet together stays near the configured limit while Redis is out. Its buckets start with one second's worth, not a burst,
   so a store that flaps cannot hand out a burst each time.
   Each such decision is counted (`api_router_limit_degraded_decisions_total`).
2. `deny`: the call fails with UNAVAILABLE / SERVICE_UNAVAILABLE.

`n` follows the fleet: every sidecar registers in the store every `FLEET_HEARTBEAT_SECONDS`
(a sorted set, each entry expiring after `FLEET_TTL_SECONDS`) and learns how many are
registered; through an outage it keeps the last count. `limits.expected_replicas` is the floor
(the fewest replicas the fleet runs, an HPA's minReplicas), and all a sidecar that has never
counted the fleet (it started while the store was out) can go by. So while the store is out, the
sidecars counted before it admit about one limit between them, and each one started since at
most `1/expected_replicas` of it (docs/operations/scale-out.md has the bound).

There is one breaker per Redis node (one in all for a single Redis): on a Redis Cluster, a dead
or frozen master opens the breaker of the orgs whose slots it holds; the others keep their exact
shared limits. While a breaker is open, its calls never touch Redis (none waits out a timeout);
a probe pings that node every cooldown (learning the cluster's slots again first, so a failover
is found) and closes the breaker when it answers, so recovery needs no restart.

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
from sidecar.telemetry.metrics import (
    LIMIT_FLEET_SIZE,
    LIMIT_STORE_DEGRADED,
    LIMIT_STORE_DEGRADED_DECISIONS,
    LIMIT_STORE_ERRORS,
)

log = logging.getLogger("sidecar.limits")
FLEET_HEARTBEAT_SECONDS = 5.0
FLEET_TTL_SECONDS = 3 * FLEET_HEARTBEAT_SECONDS  # a sidecar that stopped without leaving drops out after this


class GuardedStore:
    def __init__(self, primary: RedisLimitStore, *, on_error: str, share: float, failures: int,
                 cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        """`share`: the most of every limit this sidecar takes while the store is out, however
        few sidecars it counted (1/expected_replicas)."""
        self.name = primary.name
        self.on_error = on_error
        self.fleet_size = 0  # sidecars registered in the store when last counted; 0: never counted
        self._primary = primary
        self._fallback = MemoryLimitStore(share=share, start_empty=True)
        self._max_share = share
        self._failures, self._cooldown, self._clock = failures, cooldown, clock
        self._breakers: dict[str, Breaker] = {}  # by node ("" for a single Redis)
        self._tasks = Tasks()
        self._last_error = ""
        primary.on_failure = self._settle_failed  # settlements are flushed in the background

    async def start(self) -> None:
        """Learns the store's clock and the fleet's size, then keeps counting the fleet."""
        await self._primary.start()
        await self._count_fleet()
        self._tasks.spawn(self._heartbeats(), name="limit-fleet-heartbeat")

    @property
    def share(self) -> float:
        return self._fallback.share

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(FLEET_HEARTBEAT_SECONDS)
            await self._count_fleet()

    async def _count_fleet(self) -> None:
        """Registers this sidecar and takes `1/n` as its share; a store that does not answer
        leaves the last count in force."""
        try:
            size = max(1, await self._primary.heartbeat(FLEET_TTL_SECONDS))
        except StoreUnavailable:
            return
        if size != self.fleet_size:
            log.info("limit store fleet counted", extra={"sidecars": size, "previous": self.fleet_size})
            self.fleet_size = size
            self._fallback.share = min(self._max_share, 1.0 / size)
            LIMIT_FLEET_SIZE.set(size)

    def _breaker(self, node: str) -> Breaker:
        breaker = self._breakers.get(node)
        if breaker is None:
            breaker = self._breakers[node] = Breaker(self._failures, self._cooldown, self._clock)
        return breaker

    async def admit(self, ask: Ask) -> Verdict:
        node = self._primary.node_of(ask.org)
        breaker = self._breaker(node)
        if not breaker.open:
            try:
                verdict = await self._primary.admit(ask)
            except StoreUnavailable as exc:
                self._failed(node, breaker, exc)
            else:
                breaker.record_success()
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

    def _failed(self, node: str, breaker: Breaker, exc: StoreUnavailable) -> None:
        LIMIT_STORE_ERRORS.inc()
        self._last_error = str(exc)
        if breaker.record_failure():
            LIMIT_STORE_DEGRADED.set(1)
            log.warning("limit store unavailable; deciding %s", "locally" if self.on_error == "allow" else "deny",
                        extra={"store": self.name, "node": node or None, "error": self._last_error,
                               "on_store_error": self.on_error})
            self._tasks.spawn(self._probe(node, breaker), name="limit-store-probe")

    async def _probe(self, node: str, breaker: Breaker) -> None:
        while True:
            await asyncio.sleep(breaker.cooldown)
            if await self._primary.ping(node):
                breaker.record_success()
                LIMIT_STORE_DEGRADED.set(1 if self._open_nodes() else 0)
                log.info("limit store recovered", extra={"store": self.name, "node": node or None})
                return

    def _open_nodes(self) -> list[str]:
        return sorted(node for node, breaker in self._breakers.items() if breaker.open)

    def component(self) -> dict[str, Any]:
        fleet = {"fleet": self.fleet_size, "share": round(self.share, 6)}
        open_nodes = self._open_nodes()
        if not open_nodes:
            return {"status": "ok", "store": self.name, **fleet}
        detail = {"status": "degraded", "store": self.name, "on_store_error": self.on_error,
                  "error": self._last_error, **fleet}
        if open_nodes != [""]:
            detail["nodes"] = open_nodes  # on a cluster: only these nodes' orgs are decided locally
        return detail

    async def aclose(self) -> None:
        await self._tasks.aclose(timeout=0)
        if self.fleet_size and not self._open_nodes():
            try:  # leaving: the others' share grows at their next count, not a TTL later
                await self._primary.heartbeat(0)
            except StoreUnavailable:
                pass
        await self._primary.aclose()

    def __repr__(self) -> str:
        return f"<GuardedStore {self._primary!r} open={self._open_nodes()} on_error={self.on_error}>"
