"""The Redis limit store on a real 3-master Redis Cluster: what only a cluster has.

The behaviour every store shares runs on the cluster too (test_limit_stores.py, `cluster`). Here,
each test starts its own cluster, because it kills a master or moves a slot under load:

1. a dead master degrades only the orgs whose slots it held (the breaker is per node), the others
   keep exact limits, and the probe closes that node's breaker when it is back;
2. a slot moved while calls run on it costs no more than the calls in flight at that moment, and
   charges nothing twice (or never);
3. a decision's marker is a field of its org's hash, not a key of its own: the slot holds a few
   keys per org, so moving it is quick, and expired markers are forgotten as decisions go.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from redis.crc import key_slot

from sidecar.limits import redis_store
from sidecar.limits.gcra import Rate
from sidecar.limits.guarded import GuardedStore
from sidecar.limits.redis_store import RedisLimitStore
from sidecar.limits.store import Ask, StoreUnavailable, Verdict
from sidecar.redis_client import connect
from tests.harness.redis_cluster import ValkeyCluster

SLOW = 0.001  # one unit per 1000 s: nothing refills during a test, so "exact" means exactly the burst
TIMEOUT = 0.3
FAILURES, COOLDOWN = 2, 0.2


@pytest.fixture
def cluster(own_cluster: ValkeyCluster) -> ValkeyCluster:
    return own_cluster


@pytest.fixture
async def guarded(cluster: ValkeyCluster) -> AsyncIterator[GuardedStore]:
    store = GuardedStore(RedisLimitStore(cluster.url, timeout=TIMEOUT), on_error="allow", share=1.0,
                         failures=FAILURES, cooldown=COOLDOWN)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


def orgs_by_node(cluster: ValkeyCluster, per_node: int, prefix: str = "org") -> dict[int, list[str]]:
    """`per_node` org names whose slots each node owns (by the harness's even split)."""
    ranges = cluster.slot_ranges()
    found: dict[int, list[str]] = {i: [] for i in range(len(ranges))}
    for n in itertools.count():
        org = f"{prefix}-{n}"
        slot = key_slot(org.encode())
        node = next(i for i, (start, end) in enumerate(ranges) if start <= slot <= end)
        if len(found[node]) < per_node:
            found[node].append(org)
        if all(len(orgs) == per_node for orgs in found.values()):
            return found
    raise AssertionError("unreachable")


def orgs_in_slot(slot: int, count: int) -> list[str]:
    return list(itertools.islice((f"s{n}" for n in itertools.count() if key_slot(f"s{n}".encode()) == slot), count))


def ask_of(org: str, burst: int) -> Ask:
    return Ask(org, (Rate(f"org:{org}:requests", SLOW, burst),), (1.0,))


async def hammer(store: GuardedStore | RedisLimitStore, orgs: list[str], burst: int, callers: int,
                 until: asyncio.Event, verdicts: dict[str, list[Verdict | Exception]]) -> None:
    """`callers` concurrent callers per org, each admitting in a loop until `until` is set."""
    async def caller(org: str) -> None:
        while not until.is_set():
            try:
                verdicts[org].append(await store.admit(ask_of(org, burst)))
            except StoreUnavailable as exc:
                verdicts[org].append(exc)
            await asyncio.sleep(0.001)
    for org in orgs:
        verdicts.setdefault(org, [])
    await asyncio.gather(*(caller(org) for org in orgs for _ in range(callers)))


async def test_a_dead_master_degrades_only_its_own_orgs(cluster: ValkeyCluster, guarded: GuardedStore) -> None:
    burst = 400  # more than the test admits before the kill: every org is still admitting when node 0 dies
    orgs = orgs_by_node(cluster, 3)
    node0 = guarded._primary.node_of(orgs[0][0])
    assert {guarded._primary.node_of(org) for org in orgs[0]} == {node0}
    assert node0 not in {guarded._primary.node_of(org) for i in (1, 2) for org in orgs[i]}

    stop, verdicts = asyncio.Event(), {}
    load = asyncio.ensure_future(hammer(guarded, [org for group in orgs.values() for org in group], burst,
                                        callers=2, until=stop, verdicts=verdicts))
    await asyncio.sleep(0.3)
    before = {org: len(v) for org, v in verdicts.items()}
    cluster.kill(0)
    killed = time.monotonic()
    # polls counts the load task grows (ASYNC110: no event to wait on)
    while time.monotonic() - killed < 1.5 or sum(len(v) for v in verdicts.values()) < 2 * burst * 6:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    component = guarded.component()
    stop.set()
    await load

    # node 0's orgs: decided locally from soon after the kill (the breaker opened after FAILURES)
    assert component["status"] == "degraded" and component["nodes"] == [node0]
    for org in orgs[0]:
        after_kill = verdicts[org][before[org]:]
        assert sum(isinstance(v, Verdict) and v.degraded for v in after_kill) > len(after_kill) // 2
    # the other nodes' orgs: never degraded, exact: exactly the burst admitted, then denials
    for org in orgs[1] + orgs[2]:
        assert all(isinstance(v, Verdict) and not v.degraded for v in verdicts[org]), org
        assert sum(v.allowed for v in verdicts[org] if isinstance(v, Verdict)) == burst, org
        assert len(verdicts[org]) > burst, org  # the load went on past the limit

    cluster.restart(0)  # back, empty, owning its slots again: the probe closes its breaker
    started = time.monotonic()
    while guarded.component()["status"] != "ok":
        assert time.monotonic() - started < COOLDOWN + 5.0, guarded.component()
        await asyncio.sleep(0.05)
    verdict = await guarded.admit(ask_of(orgs[0][0], burst))
    assert verdict.allowed and not verdict.degraded


async def test_a_slot_moved_under_load_costs_at_most_the_calls_in_flight(cluster: ValkeyCluster) -> None:
    """Callers keep deciding for four orgs of one slot while the slot (keys, markers) moves to
    another node. The decisions that fail are at most the calls in flight as the org's keys move
    (the callers); none charges twice or is lost: each org admits exactly its burst."""
    store = RedisLimitStore(cluster.url, timeout=TIMEOUT)
    await store.start()
    slot = key_slot(b"moving")
    orgs = orgs_in_slot(slot, 4)
    burst, callers = 300, 4
    source = cluster.owner_of_slot(slot)
    target = (source + 1) % 3
    try:
        stop, verdicts = asyncio.Event(), {}
        load = asyncio.ensure_future(hammer(store, orgs, burst, callers, stop, verdicts))
        await asyncio.sleep(0.2)
        moved_at = {org: len(v) for org, v in verdicts.items()}
        await asyncio.to_thread(cluster.migrate_slot, slot, target)
        assert cluster.owner_of_slot(slot) == target
        while min(len(v) for v in verdicts.values()) < burst + 50:  # noqa: ASYNC110 - polls counts the load grows
            await asyncio.sleep(0.05)
        stop.set()
        await load
        assert store.node_of(orgs[0]).endswith(f":{cluster.ports[target]}")  # MOVED taught the client
    finally:
        await store.aclose()

    print("slot move:", {org: (len(verdicts[org]), sum(isinstance(v, Exception) for v in verdicts[org]))
                         for org in orgs}, "(decisions, failed)")
    for org in orgs:
        failed = [v for v in verdicts[org] if isinstance(v, Exception)]
        admitted = sum(v.allowed for v in verdicts[org] if isinstance(v, Verdict))
        assert moved_at[org] > 0 and len(failed) <= callers, (org, Counter(str(e)[:40] for e in failed))
        # a failed decision's charge (if it ran) was voided: the burst is admitted exactly
        assert admitted <= burst, org
        assert admitted >= burst - len(failed), org


async def test_expired_markers_are_forgotten_as_decisions_go(
        cluster: ValkeyCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "_MARKER_MS", 1000)
    store = RedisLimitStore(cluster.url, timeout=TIMEOUT)
    client = connect(cluster.url, 2.0, socket_timeout=2.0)
    org = "markers"
    marks, expiries = f"sidecar:res:{{{org}}}", f"sidecar:resx:{{{org}}}"
    try:
        for _ in range(20):
            assert (await store.admit(ask_of(org, 1000))).allowed
        assert (await client.hlen(marks), await client.zcard(expiries)) == (20, 20)
        await asyncio.sleep(0.6)
        assert (await store.admit(ask_of(org, 1000))).allowed   # the hash lives 1 s from now
        await asyncio.sleep(0.6)                                # the first 20 have expired
        for _ in range(3):                                      # each forgets 4 of them
            assert (await store.admit(ask_of(org, 1000))).allowed
        assert (await client.hlen(marks), await client.zcard(expiries)) == (20 + 1 - 12 + 3, 12)
        await asyncio.sleep(1.1)
        assert await client.exists(marks, expiries) == 0       # an idle org's markers are gone
    finally:
        await client.aclose()
        await store.aclose()



async def test_a_store_started_while_a_master_is_down_serves_the_other_masters(cluster: ValkeyCluster) -> None:
    """A sidecar (re)started during a master's outage: the first master of the slot map, the one
    redis-py would read its command table from, is the dead one. Only its orgs fail."""
    orgs = orgs_by_node(cluster, 2)
    cluster.kill(0)
    store = RedisLimitStore(cluster.url, timeout=TIMEOUT)
    try:
        await store.start()
        assert store.wall() == pytest.approx(time.time(), abs=1.0)  # the clock, from a live master
        for org in orgs[1] + orgs[2]:
            assert (await store.admit(ask_of(org, 10))).allowed
        for org in orgs[0]:
            with pytest.raises(StoreUnavailable):
                await store.admit(ask_of(org, 10))
    finally:
        await store.aclose()
