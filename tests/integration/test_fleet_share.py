"""The degraded share follows the fleet: while the store is out, the sidecars together admit about
one limit however far the fleet scaled, not `N / expected_replicas` limits.

Every sidecar's `GuardedStore` registers in the store (a sorted set with expiring entries) and
counts the fleet; the heartbeat is shortened here from 5 s to 50 ms. Each fallback bucket starts
with one second's worth of its share of the rate, so "what the fleet admits at once while the
store is out" is one second's worth of the rate in all, if the shares add up to one.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from sidecar.limits import guarded as guarded_module
from sidecar.limits.gcra import Rate
from sidecar.limits.guarded import GuardedStore
from sidecar.limits.redis_store import RedisLimitStore
from sidecar.limits.store import Ask
from tests.harness.procs import ManagedProcess
from tests.harness.servers import start_valkey

RATE = 100.0            # per second; burst 100: one second's worth is 100 calls
HEARTBEAT = 0.05
EXPECTED_REPLICAS = 4   # the HPA's minReplicas: the floor of the count, and all a new sidecar knows


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    proc, url = start_valkey(tmp_path)
    try:
        yield proc, url
    finally:
        proc.stop()


@pytest.fixture
async def fleet(valkey: tuple[ManagedProcess, str],
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[[int], asyncio.Future[list[GuardedStore]]]]:
    monkeypatch.setattr(guarded_module, "FLEET_HEARTBEAT_SECONDS", HEARTBEAT)
    monkeypatch.setattr(guarded_module, "FLEET_TTL_SECONDS", 3 * HEARTBEAT)
    made: list[GuardedStore] = []

    async def start(count: int) -> list[GuardedStore]:
        stores = [GuardedStore(RedisLimitStore(valkey[1], timeout=0.2), on_error="allow",
                               share=1.0 / EXPECTED_REPLICAS, failures=1, cooldown=0.2) for _ in range(count)]
        made.extend(stores)
        await asyncio.gather(*(store.start() for store in stores))
        return stores

    try:
        yield lambda count: asyncio.ensure_future(start(count))
    finally:
        for store in made:
            await store.aclose()


async def admitted_at_once(stores: list[GuardedStore], org: str) -> int:
    """Each store admits (locally, the store being out) until its fallback denies; the sum."""
    ask = Ask(org, (Rate(f"org:{org}:requests", RATE, int(RATE)),), (1.0,))
    total = 0
    for store in stores:
        while (verdict := await store.admit(ask)).allowed:
            assert verdict.degraded
            total += 1
    return total


async def counted(stores: list[GuardedStore], size: int) -> None:
    for _ in range(100):
        if all(store.fleet_size == size for store in stores):
            return
        await asyncio.sleep(HEARTBEAT)
    raise AssertionError(f"fleet sizes {[s.fleet_size for s in stores]}, expected {size}")


async def test_a_fleet_scaled_from_4_to_20_admits_one_limit_during_an_outage(
        valkey: tuple[ManagedProcess, str], fleet: Callable[[int], asyncio.Future[list[GuardedStore]]]) -> None:
    first = await fleet(4)
    await counted(first, 4)
    scaled = first + await fleet(16)          # the HPA scales out while the store is up
    await counted(scaled, 20)
    assert {round(store.share, 6) for store in scaled} == {0.05}
    assert all(store.component()["fleet"] == 20 for store in scaled)

    valkey[0].kill()
    total = await admitted_at_once(scaled, f"o-{uuid.uuid4().hex[:8]}")
    # one second's worth in all (each sidecar 5), not 20 x 1/4 of it (500): ±1 a sidecar for rounding
    assert RATE - len(scaled) <= total <= RATE + len(scaled), total
    await asyncio.sleep(5 * HEARTBEAT)
    assert all(store.fleet_size == 20 for store in scaled)  # remembered through the outage


async def test_sidecars_started_during_the_outage_take_one_over_expected_replicas(
        valkey: tuple[ManagedProcess, str], fleet: Callable[[int], asyncio.Future[list[GuardedStore]]]) -> None:
    known = await fleet(8)
    await counted(known, 8)
    valkey[0].kill()
    late = await fleet(2)                      # never counted the fleet
    assert all(store.fleet_size == 0 and store.share == 1 / EXPECTED_REPLICAS for store in late)
    org = f"o-{uuid.uuid4().hex[:8]}"
    from_known, from_late = await admitted_at_once(known, org), await admitted_at_once(late, org)
    assert RATE - 8 <= from_known <= RATE + 8                       # the counted fleet: one limit
    assert from_late <= 2 * (RATE / EXPECTED_REPLICAS + 1)          # each new one: 1/expected_replicas


async def test_a_fleet_smaller_than_expected_replicas_takes_the_floor(
        fleet: Callable[[int], asyncio.Future[list[GuardedStore]]]) -> None:
    """The count never lowers the share below the configured floor: two sidecars counted, a floor of
    4 (a fleet that is briefly small during a rollout does not double its shares)."""
    pair = await fleet(2)
    await counted(pair, 2)
    assert all(store.share == 1 / EXPECTED_REPLICAS for store in pair)


async def test_a_sidecar_that_stops_leaves_the_fleet(
        fleet: Callable[[int], asyncio.Future[list[GuardedStore]]]) -> None:
    stores = await fleet(6)
    await counted(stores, 6)
    await stores[0].aclose()                   # leaves at once (its entry removed)
    await counted(stores[1:], 5)
