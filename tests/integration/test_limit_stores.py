"""The limit stores' behaviour: one set of tests run against the memory store, the Redis store on
one Valkey, and the Redis store on a real 3-master Redis Cluster.

The Redis store runs on a real Valkey (the session `redis_url`) or cluster (`redis_cluster_url`;
every test uses its own org, so its keys are its own) and decides on the server's clock, which a
test cannot move. So most rates
here are SLOW (one unit per 1000 s: nothing refills during a test), and the one test about the
length of a wait sleeps measured amounts with 50 ms bounds on both sides.

After the shared tests: what only Redis has (scripts, hash slots, TTLs, its counters), then the
guard around it (breaker, local fallback, deny) against a Valkey each test starts, kills, freezes
and restarts itself; then decisions whose caller never got the verdict, settlement batches that
failed, and the clock budget windows are chosen by.
"""
from __future__ import annotations

import asyncio
import hashlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from sidecar.call import Call, begin_call
from sidecar.config import parse_config
from sidecar.config_sections import RateRule
from sidecar.errors import SidecarError
from sidecar.limits.budget import Budget, day_window, month_window
from sidecar.limits.gcra import Rate
from sidecar.limits.guarded import GuardedStore
from sidecar.limits.memory_store import MemoryLimitStore
from sidecar.limits.redis_store import (
    ADMIT,
    BUDGET_KEY_GRACE_SECONDS,
    SETTLE,
    RedisLimitStore,
    Script,
    ScriptCall,
)
from sidecar.limits.store import Ask, LimitStore, StoreUnavailable, Verdict
from sidecar.redis_client import connect as redis_client_for
from sidecar.stages.limits import Limits, rates_of
from tests.harness.procs import ManagedProcess
from tests.harness.servers import start_valkey

URL_FIXTURES = {"redis": "redis_url", "cluster": "redis_cluster_url"}
SLOW = 0.001   # units per second: one per 1000 s, so nothing refills while a test runs
TIMEOUT = 0.5  # the Redis store's timeout in the shared tests


def new_org() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def rates_ask(org: str, *rates: Rate, costs: tuple[float, ...] | None = None) -> Ask:
    return Ask(org, rates, costs if costs is not None else (1.0,) * len(rates))


def budget(org: str, name: str, limit: int) -> Budget:
    """A budget in the current UTC window of its kind (`..._per_day` or `..._per_month`)."""
    window = (month_window if name.endswith("month") else day_window)(time.time())
    return Budget(f"org:{org}:{name}", limit, window, name.startswith("cost"))


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LimitStore]:
    limit_store: LimitStore
    if request.param == "memory":
        limit_store = MemoryLimitStore()
    else:
        limit_store = RedisLimitStore(request.getfixturevalue(URL_FIXTURES[request.param]), timeout=TIMEOUT)
        await limit_store.start()
    try:
        yield limit_store
    finally:
        await limit_store.aclose()


async def admit_all(store: LimitStore, ask: Ask, times: int) -> list[Verdict]:
    return [await store.admit(ask) for _ in range(times)]


async def settled(store: LimitStore, ask: Ask, rate_deltas: tuple[float, ...], budget_deltas: tuple[int, ...],
                  *, degraded: bool = False) -> None:
    """Corrects a reservation and waits until it is applied (the Redis store queues corrections)."""
    store.settle(ask, rate_deltas, budget_deltas, degraded=degraded)
    await store.flush()


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Awaits until `check()` is true; returns how long that took.

    The async twin of `tests.harness.procs.wait_until`: that one blocks the thread, and with it
    the event loop on which the guard's probe has to run for the condition to become true."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# --- rates ---------------------------------------------------------------------------------


async def test_burst_then_deny_with_the_true_wait(store: LimitStore) -> None:
    for _ in range(3):
        if await check_true_wait(store):
            return
    pytest.fail("the event loop woke too late in 3 attempts: the 50 ms bounds could not be checked")


async def check_true_wait(store: LimitStore) -> bool:
    """Burst, denial, then 50 ms before the reported wait is over still denied, 50 ms after admitted.

    Returns False (try again) only when this process was late for its own schedule, so that a
    loaded machine cannot make the check fail, nor pass without having been made."""
    rate = Rate("org:x:requests_per_minute", per_second=4.0, burst=2)  # one per 250 ms
    ask = rates_ask(new_org(), rate)
    first = time.monotonic()
    assert [v.allowed for v in await admit_all(store, ask, 2)] == [True, True]
    sent = time.monotonic()
    denied = await store.admit(ask)
    answered = time.monotonic()
    assert not denied.allowed and not denied.over_budget and denied.denied_by == rate.name
    # the first call reset the bucket 250 ms ahead; whatever has passed since is off the wait
    assert 0.25 - (answered - first) - 0.002 <= denied.retry_after <= 0.25 + 1e-6
    early_at = sent + denied.retry_after - 0.05
    await asyncio.sleep(max(0.0, early_at - time.monotonic()))
    early = await store.admit(ask)
    if time.monotonic() > early_at + 0.03:
        return False  # decided too close to the end of the wait to tell anything
    assert not early.allowed, "admitted 50 ms before retry_after was over"
    assert 0 < early.retry_after <= 0.05 + (answered - sent) + 0.001
    await asyncio.sleep(max(0.0, answered + denied.retry_after + 0.05 - time.monotonic()))
    assert (await store.admit(ask)).allowed, "still denied 50 ms after retry_after was over"
    return True


async def test_a_denial_by_one_rate_charges_no_rate(store: LimitStore) -> None:
    org = new_org()
    org_rate, key_rate = Rate("org", SLOW, 100), Rate("key", SLOW, 1)
    assert (await store.admit(rates_ask(org, org_rate, key_rate))).allowed
    for verdict in await admit_all(store, rates_ask(org, org_rate, key_rate), 5):
        assert not verdict.allowed and verdict.denied_by == "key"
        assert verdict.retry_after == pytest.approx(1 / SLOW, abs=0.1)
    # the org rate was charged only for the admitted call: 99 more fit in its burst
    verdicts = await admit_all(store, rates_ask(org, org_rate), 100)
    assert sum(v.allowed for v in verdicts) == 99 and verdicts[-1].denied_by == "org"


async def test_the_longest_wait_is_reported(store: LimitStore) -> None:
    ask = rates_ask(new_org(), Rate("a", 1.0, 1), Rate("b", 0.1, 1), Rate("c", 0.5, 1))
    first = time.monotonic()
    assert (await store.admit(ask)).allowed
    denied = await store.admit(ask)
    elapsed = time.monotonic() - first
    assert not denied.allowed and denied.denied_by == "b"
    assert 10.0 - elapsed - 0.002 <= denied.retry_after <= 10.0 + 1e-6


async def test_shadow_rates_never_deny_and_are_reported(store: LimitStore) -> None:
    shadow, real = Rate("shadow", SLOW, 2, shadow=True), Rate("real", SLOW, 4)
    ask = rates_ask(new_org(), shadow, real)
    verdicts = await admit_all(store, ask, 5)
    assert [v.allowed for v in verdicts] == [True, True, True, True, False]
    assert [v.shadow_denied for v in verdicts] == [(), (), ("shadow",), ("shadow",), ("shadow",)]
    assert verdicts[-1].denied_by == "real"


async def test_shadow_denials_are_not_charged(store: LimitStore) -> None:
    org = new_org()
    shadow = Rate("shadow", SLOW, 2, shadow=True)
    await admit_all(store, rates_ask(org, shadow), 5)  # 2 counted, 3 shadow denials
    as_real = Rate("shadow", SLOW, 3)                  # the same key, enforcing, one more unit of burst
    assert [v.allowed for v in await admit_all(store, rates_ask(org, as_real), 2)] == [True, False]


async def test_a_request_rate_below_one_per_minute_charges_whole_requests(store: LimitStore) -> None:
    """0.25 requests a minute: one now, the next in 4 minutes (not in 1: a request is one unit)."""
    (rate,) = rates_of("org:x", RateRule(requests_per_minute=0.25))
    ask = rates_ask(new_org(), rate)
    first = time.monotonic()
    assert (await store.admit(ask)).allowed
    denied = await store.admit(ask)
    elapsed = time.monotonic() - first
    assert not denied.allowed and 240.0 - elapsed - 0.002 <= denied.retry_after <= 240.0 + 1e-6


# --- token costs and settling --------------------------------------------------------------


async def test_token_reservation_and_settle(store: LimitStore) -> None:
    org = new_org()
    tokens = Rate("tokens", SLOW, 1000)
    reserve = rates_ask(org, tokens, costs=(600.0,))
    assert (await store.admit(reserve)).allowed
    denied = await store.admit(reserve)
    assert not denied.allowed and denied.retry_after == pytest.approx(200 / SLOW, abs=0.1)
    await settled(store, reserve, (-500.0,), ())      # it used 100 of 600: the refund lets the next in
    assert (await store.admit(reserve)).allowed     # 100 + 600
    await settled(store, reserve, (300.0,), ())       # this one used 900: 1000 now
    late = await store.admit(rates_ask(org, tokens, costs=(1.0,)))
    assert not late.allowed and late.retry_after == pytest.approx(1 / SLOW, abs=0.1)
    await settled(store, reserve, (-400.0,), ())      # 600 now
    assert (await store.admit(rates_ask(org, tokens, costs=(400.0,)))).allowed
    assert not (await store.admit(rates_ask(org, tokens, costs=(1.0,)))).allowed


async def test_a_refund_never_leaves_credit(store: LimitStore) -> None:
    org = new_org()
    tokens = Rate("tokens", SLOW, 1000)
    ask = rates_ask(org, tokens, costs=(500.0,))
    assert (await store.admit(ask)).allowed
    await settled(store, ask, (-1_000_000.0,), ())    # far more than was charged
    assert (await store.admit(rates_ask(org, tokens, costs=(1000.0,)))).allowed
    assert not (await store.admit(rates_ask(org, tokens, costs=(1.0,)))).allowed


async def test_a_cost_larger_than_the_burst_is_charged_the_burst(store: LimitStore) -> None:
    org = new_org()
    tokens = Rate("tokens", SLOW, 1000)
    huge = rates_ask(org, tokens, costs=(5000.0,))
    assert (await store.admit(huge)).allowed        # from a full bucket: admitted, not never
    one = rates_ask(org, tokens, costs=(1.0,))
    assert (await store.admit(one)).retry_after == pytest.approx(1 / SLOW, abs=0.1)   # charged 1000
    await settled(store, huge, (4000.0,), ())          # its real size
    assert (await store.admit(one)).retry_after == pytest.approx(4001 / SLOW, abs=0.1)


# --- budgets -------------------------------------------------------------------------------


async def test_budget_admits_until_the_cap(store: LimitStore) -> None:
    org = new_org()
    day = budget(org, "tokens_per_day", 1000)
    ask = Ask(org, (), (), (day,), (300,))
    verdicts = await admit_all(store, ask, 4)
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    denied = verdicts[-1]
    assert (denied.over_budget, denied.denied_by, denied.budget_used, denied.retry_after) == (
        True, day.name, 900, 0.0)
    assert (await store.admit(Ask(org, (), (), (day,), (100,)))).allowed    # exactly the cap
    last = await store.admit(Ask(org, (), (), (day,), (1,)))
    assert not last.allowed and last.budget_used == 1000


async def test_the_first_budget_without_room_denies(store: LimitStore) -> None:
    org = new_org()
    day, month = budget(org, "tokens_per_day", 500), budget(org, "tokens_per_month", 10_000)
    ask = Ask(org, (), (), (day, month), (200, 200))
    verdicts = await admit_all(store, ask, 3)
    assert [v.allowed for v in verdicts] == [True, True, False]
    assert (verdicts[-1].denied_by, verdicts[-1].budget_used) == (day.name, 400)
    # the month budget was charged for the admitted calls only
    small_month = Budget(month.name, 700, month.window)
    denied = await store.admit(Ask(org, (), (), (small_month,), (301,)))
    assert (denied.allowed, denied.denied_by, denied.budget_used) == (False, month.name, 400)


async def test_a_budget_denial_charges_no_rate_and_no_other_budget(store: LimitStore) -> None:
    org = new_org()
    rate = Rate("requests", SLOW, 4)
    roomy, tight = budget(org, "tokens_per_month", 1000), budget(org, "tokens_per_day", 300)
    ask = Ask(org, (rate,), (1.0,), (roomy, tight), (100, 100))
    verdicts = await admit_all(store, ask, 6)
    assert [v.allowed for v in verdicts] == [True, True, True, False, False, False]
    assert all(v.over_budget and v.denied_by == tight.name for v in verdicts[3:])
    # 3 of the rate's 4 used, 300 of the roomy budget's 1000
    assert [v.allowed for v in await admit_all(store, rates_ask(org, rate), 2)] == [True, False]
    assert (await store.admit(Ask(org, (), (), (roomy,), (700,)))).allowed
    assert not (await store.admit(Ask(org, (), (), (roomy,), (1,)))).allowed


async def test_a_rate_denial_charges_no_budget(store: LimitStore) -> None:
    org = new_org()
    rate, day = Rate("requests", SLOW, 1), budget(org, "tokens_per_day", 1000)
    ask = Ask(org, (rate,), (1.0,), (day,), (100,))
    verdicts = await admit_all(store, ask, 4)
    assert [(v.allowed, v.over_budget, v.denied_by) for v in verdicts[1:]] == [(False, False, "requests")] * 3
    assert (await store.admit(Ask(org, (), (), (day,), (900,)))).allowed
    assert not (await store.admit(Ask(org, (), (), (day,), (1,)))).allowed


async def test_settle_corrects_the_budget(store: LimitStore) -> None:
    org = new_org()
    day = budget(org, "cost_per_day", 1000)
    ask = Ask(org, (), (), (day,), (600,))
    assert (await store.admit(ask)).allowed
    assert (await store.admit(ask)).budget_used == 600
    await settled(store, ask, (), (-600,))             # released: nothing was served
    assert (await store.admit(ask)).allowed           # room again
    await settled(store, ask, (), (-400,))             # it cost 200
    assert (await store.admit(ask)).allowed           # 800
    await settled(store, ask, (), (500,))              # that one cost 1100
    over = await store.admit(Ask(org, (), (), (day,), (0,)))
    assert (over.allowed, over.budget_used) == (False, 1300)
    await settled(store, ask, (), (-1_000_000,))       # a counter never goes below zero
    assert (await store.admit(Ask(org, (), (), (day,), (1000,)))).allowed
    assert (await store.admit(Ask(org, (), (), (day,), (1,)))).budget_used == 1000


async def test_settling_an_unknown_window_creates_nothing(store: LimitStore) -> None:
    org = new_org()
    day = budget(org, "tokens_per_day", 1000)
    ask = Ask(org, (), (), (day,), (100,))
    await settled(store, ask, (), (500,))              # nothing was admitted in this window
    assert (await store.admit(Ask(org, (), (), (day,), (1000,)))).allowed


# --- concurrency ---------------------------------------------------------------------------


async def test_concurrent_admits_never_share_budget_room(store: LimitStore) -> None:
    org = new_org()
    n = 37
    day = budget(org, "tokens_per_day", n * 10)
    ask = Ask(org, (), (), (day,), (10,))
    verdicts = await asyncio.gather(*(store.admit(ask) for _ in range(200)))
    assert sum(v.allowed for v in verdicts) == n
    assert all(v.over_budget and v.budget_used == n * 10 for v in verdicts if not v.allowed)


async def test_concurrent_admits_never_exceed_the_burst(store: LimitStore) -> None:
    n = 37
    ask = rates_ask(new_org(), Rate("requests", SLOW, n))
    verdicts = await asyncio.gather(*(store.admit(ask) for _ in range(200)))
    assert sum(v.allowed for v in verdicts) == n
    assert {v.denied_by for v in verdicts if not v.allowed} == {"requests"}


# --- Redis only: scripts, slots, TTLs, counters ----------------------------------------------


@pytest.fixture(params=["redis", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """One Valkey, then a 3-master cluster."""
    return str(request.getfixturevalue(URL_FIXTURES[request.param]))


@pytest.fixture
async def redis_client(any_redis_url: str) -> AsyncIterator[Any]:
    """A client of the same Redis (a cluster client for a cluster: it follows the keys' slots)."""
    client = redis_client_for(any_redis_url, 2.0, socket_timeout=2.0)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_store(any_redis_url: str) -> AsyncIterator[RedisLimitStore]:
    limit_store = RedisLimitStore(any_redis_url, timeout=TIMEOUT)
    await limit_store.start()
    try:
        yield limit_store
    finally:
        await limit_store.aclose()


def sha1(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


async def scripts_exist(client: Any, org: str, *sources: str) -> list[bool]:
    """Whether the node holding `org`'s keys (the only one on a single Redis) has the scripts."""
    where = {"target_nodes": client.get_node_from_key(f"{{{org}}}")} if isinstance(client, RedisCluster) else {}
    return [bool(found) for found in await client.execute_command("SCRIPT EXISTS", *map(sha1, sources), **where)]


async def test_scripts_are_loaded_again_after_script_flush(
        redis_store: RedisLimitStore, redis_client: aioredis.Redis) -> None:
    org = new_org()
    rate, day = Rate("requests", SLOW, 3), budget(org, "tokens_per_day", 1000)
    ask = Ask(org, (rate,), (1.0,), (day,), (100,))
    assert (await redis_store.admit(ask)).allowed
    await redis_client.script_flush()                          # on a cluster: on every node
    assert await scripts_exist(redis_client, org, ADMIT, SETTLE) == [False, False]
    assert (await redis_store.admit(ask)).allowed              # NOSCRIPT, repeated once as EVAL
    await settled(redis_store, ask, (0.0,), (-100,))
    assert await scripts_exist(redis_client, org, ADMIT, SETTLE) == [True, True]
    # the state survived the flush and each call counted once: 2 requests, 100 tokens
    assert await redis_int(redis_client, ask.budget_key(0)) == 100
    assert [v.allowed for v in await admit_all(redis_store, ask, 2)] == [True, False]


def test_every_key_of_an_ask_is_in_one_cluster_slot() -> None:
    slots = set()
    for org in ("acme", "globex", new_org()):
        ask = Ask(org, (Rate(f"org:{org}:requests_per_minute", 1.0, 1),
                        Rate("key:app-1:tokens_per_minute", 1.0, 1),
                        Rate(f"org:{org}:model:chat.v2:requests_per_minute", 1.0, 1)), (1.0, 1.0, 1.0),
                  (budget(org, "tokens_per_day", 1), budget(org, "cost_per_month", 1)), (1, 1))
        keys = ask.keys()
        assert len(keys) == 5 and all(f"{{{org}}}" in key for key in keys)
        ask_slots = {key_slot(key.encode()) for key in keys}
        assert ask_slots == {key_slot(org.encode())}
        slots |= ask_slots
    assert len(slots) == 3  # the tag is the org, not a constant


async def test_rate_keys_expire_when_full_again(redis_store: RedisLimitStore, redis_client: aioredis.Redis) -> None:
    org = new_org()
    tokens = Rate("tokens", per_second=100.0, burst=1000)
    ask = rates_ask(org, tokens, costs=(300.0,))
    assert (await redis_store.admit(ask)).allowed          # full again in 3 s
    pttl = await redis_client.pttl(ask.rate_key(0))
    assert 3_800 <= pttl <= 4_000                          # + 1 s
    await settled(redis_store, ask, (200.0,), ())            # 2 s more
    pttl = await redis_client.pttl(ask.rate_key(0))
    assert 5_800 <= pttl <= 6_000


async def test_budget_keys_expire_a_day_after_their_window(
        redis_store: RedisLimitStore, redis_client: aioredis.Redis) -> None:
    org = new_org()
    now = time.time()
    day = budget(org, "tokens_per_day", 1000)
    month = budget(org, "tokens_per_month", 10_000)
    ask = Ask(org, (), (), (day, month), (10, 10))
    assert (await redis_store.admit(ask)).allowed
    await settled(redis_store, ask, (), (5, -1_000_000))   # one counter corrected, one clamped at zero
    assert [await redis_int(redis_client, ask.budget_key(i)) for i in range(2)] == [15, 0]
    for i, window in enumerate((day.window, month.window)):
        ttl = await redis_client.ttl(ask.budget_key(i))
        expected = window.resets_at + BUDGET_KEY_GRACE_SECONDS - now
        assert BUDGET_KEY_GRACE_SECONDS == 86_400 and abs(ttl - expected) <= 2, (i, ttl, expected)


async def test_redis_counters_match_the_memory_store(
        redis_store: RedisLimitStore, redis_client: aioredis.Redis) -> None:
    org = new_org()
    memory = MemoryLimitStore()
    day, month = budget(org, "tokens_per_day", 1000), budget(org, "tokens_per_month", 1500)
    steps: list[tuple[int, int] | int] = [300, 250, 400, (0, -150), 300, 200, (1, 90), 40, 1000, 5, (0, -999)]
    seen: list[tuple[str, tuple[bool, bool, str, int]]] = []
    last = Ask(org, (), (), (day, month), (0, 0))
    for step in steps:
        for name, limit_store in (("memory", memory), ("redis", redis_store)):
            if isinstance(step, tuple):
                deltas = (step[1], step[1] // 2) if step[0] == 0 else (0, step[1])
                await settled(limit_store, last, (), deltas)
            else:
                ask = Ask(org, (), (), (day, month), (step, step))
                verdict = await limit_store.admit(ask)
                seen.append((name, (verdict.allowed, verdict.over_budget, verdict.denied_by, verdict.budget_used)))
        if not isinstance(step, tuple):
            last = Ask(org, (), (), (day, month), (step, step))
    assert [v for n, v in seen if n == "redis"] == [v for n, v in seen if n == "memory"]
    assert any(not allowed for _, (allowed, *_rest) in seen)  # the sequence did reach a cap
    for i in range(2):
        assert int(await redis_client.get(last.budget_key(i)) or 0) == memory.consumed(last, i)


# --- the guard: breaker, local fallback, deny -------------------------------------------------


@dataclass
class Valkey:
    """A Valkey owned by one test: kill, freeze, restart on the same port."""

    proc: ManagedProcess
    url: str
    workdir: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def restart(self) -> None:
        self.proc.kill()
        self.proc, url = start_valkey(self.workdir, port=self.port)
        assert url == self.url


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[Valkey]:
    proc, url = start_valkey(tmp_path)
    server = Valkey(proc, url, tmp_path)
    try:
        yield server
    finally:
        server.proc.stop()


FAILURES, COOLDOWN, GUARD_TIMEOUT = 2, 0.2, 0.3


@pytest.fixture
async def guard_factory(valkey: Valkey) -> AsyncIterator[Callable[[str], GuardedStore]]:
    made: list[GuardedStore] = []

    def make(on_error: str) -> GuardedStore:
        guarded = GuardedStore(RedisLimitStore(valkey.url, timeout=GUARD_TIMEOUT), on_error=on_error, share=0.5,
                               failures=FAILURES, cooldown=COOLDOWN)
        made.append(guarded)
        return guarded

    try:
        yield make
    finally:
        for guarded in made:
            await guarded.aclose()


async def test_allow_decides_locally_with_a_share_and_recovers(
        valkey: Valkey, guard_factory: Callable[[str], GuardedStore]) -> None:
    guarded = guard_factory("allow")
    org = new_org()
    # locally 5/s with a burst of 5: the fallback starts with one second's worth, here the burst
    rate_ask = rates_ask(org, Rate("requests", 10.0, 10))
    budget_ask = Ask(org, (), (), (budget(org, "tokens_per_day", 100),), (10,))
    first = await guarded.admit(rate_ask)
    assert first.allowed and not first.degraded and guarded.component()["status"] == "ok"

    valkey.proc.kill()
    verdicts = [await guarded.admit(rate_ask)]
    assert guarded.component()["status"] == "ok"              # one error: the breaker is still closed
    verdicts.append(await guarded.admit(rate_ask))
    component = guarded.component()                           # the second error opened it
    assert (component["status"], component["on_store_error"]) == ("degraded", "allow") and component["error"]
    verdicts += await admit_all(guarded, rate_ask, 6)
    assert all(v.degraded for v in verdicts)
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 3   # half the burst of 10, locally
    assert all(0 < v.retry_after <= 0.2 for v in verdicts if not v.allowed)  # at 5/s locally
    assert {v.denied_by for v in verdicts if not v.allowed} == {"requests"}

    budget_verdicts = await admit_all(guarded, budget_ask, 7)
    assert [v.allowed for v in budget_verdicts] == [True] * 5 + [False] * 2  # half of 100 at 10 each
    assert all(v.degraded for v in budget_verdicts) and budget_verdicts[-1].budget_used == 50
    await settled(guarded, budget_ask, (), (-10,), degraded=True)          # corrected where it was charged
    assert (await guarded.admit(budget_ask)).allowed

    valkey.restart()
    took = await eventually(lambda: guarded.component()["status"] == "ok", COOLDOWN + 1.5,
                            "the probe to close the breaker")
    assert took <= COOLDOWN + 1.5
    recovered = await guarded.admit(rate_ask)
    assert recovered.allowed and not recovered.degraded       # decided by the (restarted, empty) Valkey


async def test_lost_settlements_are_counted_but_do_not_open_the_breaker(
        valkey: Valkey, guard_factory: Callable[[str], GuardedStore]) -> None:
    guarded = guard_factory("allow")
    org = new_org()
    ask = Ask(org, (), (), (budget(org, "tokens_per_day", 1000),), (100,))
    assert not (await guarded.admit(ask)).degraded
    valkey.proc.kill()
    errors = store_errors()
    for _ in range(FAILURES + 1):
        await settled(guarded, ask, (), (-50,))               # fails: counted, resent in the background
    assert store_errors() == errors + FAILURES + 1
    assert guarded.component()["status"] == "ok"              # admissions decide about the breaker
    for _ in range(FAILURES):
        assert (await guarded.admit(ask)).degraded
    assert guarded.component()["status"] == "degraded"


def store_errors() -> float:
    return REGISTRY.get_sample_value("api_router_limit_store_errors_total") or 0.0


async def test_deny_fails_calls_while_the_store_is_out(
        valkey: Valkey, guard_factory: Callable[[str], GuardedStore]) -> None:
    guarded = guard_factory("deny")
    ask = rates_ask(new_org(), Rate("requests", SLOW, 10))
    assert not (await guarded.admit(ask)).degraded
    valkey.proc.kill()
    for _ in range(FAILURES + 2):                             # before and after the breaker opens
        with pytest.raises(SidecarError) as failure:
            await guarded.admit(ask)
        assert failure.value.reason == "SERVICE_UNAVAILABLE"
    component = guarded.component()
    assert (component["status"], component["on_store_error"]) == ("degraded", "deny")
    valkey.restart()
    await eventually(lambda: guarded.component()["status"] == "ok", COOLDOWN + 1.5, "the probe")
    assert (await guarded.admit(ask)).allowed


async def test_a_frozen_store_costs_a_call_one_timeout_then_none(
        valkey: Valkey, guard_factory: Callable[[str], GuardedStore]) -> None:
    guarded = guard_factory("allow")
    ask = rates_ask(new_org(), Rate("requests", 10.0, 10))    # locally 5/s, starting with 5
    assert not (await guarded.admit(ask)).degraded            # a pooled connection exists
    valkey.proc.signal(signal.SIGSTOP)
    try:
        for _ in range(FAILURES):
            started = time.monotonic()
            verdict = await guarded.admit(ask)
            took = time.monotonic() - started
            assert verdict.degraded and verdict.allowed
            assert GUARD_TIMEOUT * 0.8 <= took <= GUARD_TIMEOUT + 0.5, took
        assert guarded.component()["status"] == "degraded"
        assert decided_without_waiting(guarded.admit(ask)).degraded   # the open breaker skips the store
        # let at least one probe time out on the frozen server: it must neither close the
        # breaker nor die (a deliberate wait: nothing observable happens when a probe fails)
        await asyncio.sleep(COOLDOWN + GUARD_TIMEOUT + 0.1)
        assert guarded.component()["status"] == "degraded"
    finally:
        valkey.proc.signal(signal.SIGCONT)
    await eventually(lambda: guarded.component()["status"] == "ok", COOLDOWN + GUARD_TIMEOUT + 1.5, "the probe")
    assert not (await guarded.admit(ask)).degraded


def decided_without_waiting(admission: Coroutine[Any, Any, Verdict]) -> Verdict:
    """The verdict of an admission that never suspends: it sent nothing anywhere and waited for
    nothing (a store round trip, even to a live store, would suspend it)."""
    try:
        admission.send(None)
    except StopIteration as done:
        verdict: Verdict = done.value
        return verdict
    admission.close()
    raise AssertionError("the admission waited for something: it went to the store")


async def test_calls_queued_behind_a_frozen_batch_fail_too(valkey: Valkey) -> None:
    """Calls queued while a batch is in flight go out in the next one: on a frozen server they
    wait for that batch to time out, then time out themselves. Bounded, never a hang."""
    store = RedisLimitStore(valkey.url, timeout=GUARD_TIMEOUT)
    ask = rates_ask(new_org(), Rate("requests", SLOW, 10))
    try:
        assert (await store.admit(ask)).allowed

        async def failing_admit(delay: float) -> float:
            await asyncio.sleep(delay)                  # arrive while the first batch hangs
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.admit(ask)
            return time.monotonic() - started

        valkey.proc.signal(signal.SIGSTOP)
        try:
            first, queued = await asyncio.gather(failing_admit(0.0), failing_admit(GUARD_TIMEOUT / 2))
        finally:
            valkey.proc.signal(signal.SIGCONT)
        assert GUARD_TIMEOUT * 0.8 <= first <= GUARD_TIMEOUT + 0.3, first
        assert GUARD_TIMEOUT * 0.8 <= queued <= 2 * GUARD_TIMEOUT + 0.3, queued
        assert (await store.admit(ask)).allowed         # and the store works again after the thaw
    finally:
        await store.aclose()


# --- Redis only: settlements are queued and sent in batches -----------------------------------


async def redis_int(client: aioredis.Redis, key: str) -> int:
    return int(await client.get(key) or 0)


async def test_settlements_are_sent_without_a_flush(
        redis_store: RedisLimitStore, redis_client: aioredis.Redis) -> None:
    orgs = [new_org(), new_org()]
    asks = [Ask(org, (), (), (budget(org, "tokens_per_day", 1000),), (600,)) for org in orgs]
    for ask in asks:
        assert (await redis_store.admit(ask)).allowed
    for _ in range(3):                     # summed per key, two orgs in one batch
        for ask in asks:
            redis_store.settle(ask, (), (-100,))
    values: list[int] = []

    async def applied() -> bool:
        values[:] = [await redis_int(redis_client, ask.budget_key(0)) for ask in asks]
        return values == [300, 300]

    deadline = time.monotonic() + 1.0
    while not await applied():
        assert time.monotonic() < deadline, f"corrections not applied within 1 s: {values}"
        await asyncio.sleep(0.01)


async def test_a_settlement_queued_during_a_flush_is_sent_too(valkey: Valkey) -> None:
    store = RedisLimitStore(valkey.url, timeout=5.0)   # the frozen flush must wait, not fail
    client = aioredis.Redis.from_url(valkey.url)
    try:
        first, second = (Ask(org, (), (), (budget(org, "tokens_per_day", 1000),), (600,))
                         for org in (new_org(), new_org()))
        assert (await store.admit(first)).allowed and (await store.admit(second)).allowed
        valkey.proc.signal(signal.SIGSTOP)
        try:
            store.settle(first, (), (-600,))
            await asyncio.sleep(0.1)           # its flush has started and hangs on the frozen server
            store.settle(second, (), (-600,))  # queued while that flush is in flight
        finally:
            valkey.proc.signal(signal.SIGCONT)
        values: list[int] = []
        deadline = time.monotonic() + 1.0
        while values != [0, 0]:
            values = [await redis_int(client, ask.budget_key(0)) for ask in (first, second)]
            assert time.monotonic() < deadline, f"a queued correction was never sent: {values}"
            await asyncio.sleep(0.01)
    finally:
        await store.aclose()
        await client.aclose()


async def test_settlements_ride_along_with_the_next_decision(
        redis_store: RedisLimitStore, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a steady flow of calls a settlement needs no round trip of its own: it goes out in
    the pipeline of the next decision, long before its own flush would."""
    monkeypatch.setattr("sidecar.limits.redis_store.SETTLE_BATCH_SECONDS", 30.0)
    org = new_org()
    ask = Ask(org, (), (), (budget(org, "tokens_per_day", 1000),), (600,))
    assert (await redis_store.admit(ask)).allowed
    redis_store.settle(ask, (), (-500,))
    other = new_org()
    assert (await redis_store.admit(rates_ask(other, Rate(f"org:{other}:r", SLOW, 5)))).allowed
    assert await redis_int(redis_client, ask.budget_key(0)) == 100


# --- Redis only: a decision whose caller never got its verdict is released ------------------
#
# The seam: the store's own pipelining. A script that keeps Valkey busy is queued into the same
# pipeline as a decision, behind it: Valkey runs the decision first, then stalls, and its reply
# comes late (after the caller left, or after the read timed out). No clock races: the order is
# the pipeline's, and asyncio runs ready callbacks in the order they were scheduled.

# busy for ARGV[1] ms of Valkey's CPU time (at least as long in wall time); TIME cannot measure
# it: a script sees the time frozen at its start
STALL = Script("""
local start = os.clock()
while os.clock() - start < tonumber(ARGV[1]) / 1000 do end
return 1
""")


STALL_SECONDS = 5 * GUARD_TIMEOUT  # a reply this late comes long after the read timed out


async def queued_with_a_stall(store: RedisLimitStore, admission: Awaitable[Verdict],
                              seconds: float) -> tuple[asyncio.Future[Verdict], asyncio.Future[Any]]:
    """Starts `admission` and queues, right behind its script in the same pipeline, one that keeps
    Valkey busy for `seconds`. Returns (the admission, the stall's reply)."""
    caller = asyncio.ensure_future(admission)
    await asyncio.sleep(0)        # the admission queued its script; the batch is not taken yet
    assert [call.script.source for call, _ in store._lanes[""].queue] == [ADMIT]
    stall = store._run(STALL, [], [int(seconds * 1000)])
    assert [call.script.source for call, _ in store._lanes[""].queue] == [ADMIT, STALL.source]
    return caller, stall


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def valkey_client(valkey: Valkey) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(valkey.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_decision_cancelled_in_flight_is_released(valkey: Valkey, valkey_client: aioredis.Redis) -> None:
    """The caller leaves while its decision is in flight: Valkey ran the script and charged the
    rate and the budget, the reply comes to nobody. Both charges are released."""
    store = RedisLimitStore(valkey.url, timeout=10.0)  # the stall must not time out
    try:
        org = new_org()
        rate, day = Rate("requests", SLOW, 2), budget(org, "tokens_per_day", 1000)
        assert (await store.admit(Ask(org, (), (), (day,), (600,)))).allowed
        ask = Ask(org, (rate,), (1.0,), (day,), (300,))
        caller, stall = await queued_with_a_stall(store, store.admit(ask), 0.3)
        await asyncio.sleep(0.1)                  # the batch was taken and sent: the decision runs, Valkey stalls
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await stall == 1                   # the replies came back, the decision's first
        await until(lambda: redis_equals(valkey_client, ask.budget_key(0), 600), 2.0, "the charge released")
        follow = Ask(org, (rate,), (1.0,), (day,), (400,))
        assert (await store.admit(follow)).allowed  # 600 + 400: the 300 was never used
        assert (await store.admit(rates_ask(org, rate))).allowed   # the rate's 2nd unit is free too
        assert await redis_int(valkey_client, ask.budget_key(0)) == 1000
    finally:
        await store.aclose()


async def test_a_decision_answered_as_its_caller_leaves_is_released(
        valkey: Valkey, valkey_client: aioredis.Redis) -> None:
    """The verdict arrived, but the caller was cancelled before it read it: released too."""
    store = RedisLimitStore(valkey.url, timeout=5.0)
    try:
        org = new_org()
        day = budget(org, "tokens_per_day", 1000)
        assert (await store.admit(Ask(org, (), (), (day,), (600,)))).allowed
        ask = Ask(org, (), (), (day,), (300,))
        ahead, _ = store._enqueue(ScriptCall(Script("return 1"), [], []))  # first in the next pipeline
        caller = asyncio.ensure_future(store.admit(ask))
        assert await ahead == 1     # answered just before the decision, in the same batch ...
        assert not caller.done()    # ... whose caller has its verdict waiting, unread
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await until(lambda: redis_equals(valkey_client, ask.budget_key(0), 600), 2.0, "the charge released")
        assert (await store.admit(Ask(org, (), (), (day,), (400,)))).allowed
        assert await redis_int(valkey_client, ask.budget_key(0)) == 1000
    finally:
        await store.aclose()


async def test_a_decision_that_timed_out_after_it_ran_is_released_once(
        valkey: Valkey, valkey_client: aioredis.Redis) -> None:
    """The read times out after Valkey ran the decision: the call is decided by the local
    fallback (which charges its own share), and the charge in Valkey is released once Valkey
    answers again: once, although the release itself times out and is resent while Valkey stalls."""
    primary = RedisLimitStore(valkey.url, timeout=GUARD_TIMEOUT)
    guarded = GuardedStore(primary, on_error="allow", share=0.5, failures=FAILURES, cooldown=COOLDOWN)
    try:
        org = new_org()
        day = budget(org, "tokens_per_day", 1000)
        assert not (await guarded.admit(Ask(org, (), (), (day,), (600,)))).degraded
        ask = Ask(org, (), (), (day,), (300,))
        caller, stall = await queued_with_a_stall(primary, guarded.admit(ask), STALL_SECONDS)
        verdict = await caller
        assert verdict.allowed and verdict.degraded            # the fallback: 300 of its 500
        assert primary.resends_pending == 1                    # the release of the Redis charge, queued
        with pytest.raises(StoreUnavailable):
            await stall                                        # the whole pipeline timed out
        guarded.settle(ask, (), (-300,), degraded=True)        # served nothing: released where it was charged
        assert guarded._fallback.consumed(ask, 0) == 0
        await until(lambda: redis_equals(valkey_client, ask.budget_key(0), 600), 5.0, "the charge released")
        await eventually(lambda: primary.resends_pending == 0, 5.0, "the release to be answered")
        follow = await guarded.admit(Ask(org, (), (), (day,), (400,)))
        assert follow.allowed and not follow.degraded          # 600 + 400: released exactly once
        over = await guarded.admit(Ask(org, (), (), (day,), (1,)))
        assert not over.allowed and over.budget_used == 1000
    finally:
        await guarded.aclose()


async def test_a_settlement_batch_that_failed_is_resent_and_applied_once(
        valkey: Valkey, valkey_client: aioredis.Redis) -> None:
    """A settlement batch whose reply timed out after Valkey applied it is not applied again by
    its resend; one that Valkey never ran (writes paused, the connection dropped) is resent and
    applied when Valkey takes writes again."""
    store = RedisLimitStore(valkey.url, timeout=GUARD_TIMEOUT)
    try:
        late, lost = (Ask(org, (), (), (budget(org, "tokens_per_day", 1000),), (600,)) for org in (new_org(), new_org()))
        assert (await store.admit(late)).allowed and (await store.admit(lost)).allowed
        store.settle(late, (), (-200,))
        store._queue_settlements()                             # queued now, for the pipeline below
        stall = store._run(STALL, [], [int(STALL_SECONDS * 1000)])   # applied first, then Valkey stalls
        assert [call.script.source for call, _ in store._lanes[""].queue] == [SETTLE, STALL.source]
        with pytest.raises(StoreUnavailable):
            await stall                                        # the whole pipeline timed out
        assert store.resends_pending == 1                      # the settlement, to be resent
        await eventually(lambda: store.resends_pending == 0, 5.0, "the resend answered")
        assert await redis_int(valkey_client, late.budget_key(0)) == 400   # applied once, not twice

        await valkey_client.client_pause(int(STALL_SECONDS * 1000), all=False)  # writes (and scripts) wait
        await settled(store, lost, (), (-200,))                # times out unapplied, its connection dropped
        assert await redis_int(valkey_client, lost.budget_key(0)) == 600
        await until(lambda: redis_equals(valkey_client, lost.budget_key(0), 400), 5.0, "the resent settlement")
        await eventually(lambda: store.resends_pending == 0, 5.0, "every resend answered")
        assert [await redis_int(valkey_client, ask.budget_key(0)) for ask in (late, lost)] == [400, 400]
    finally:
        await store.aclose()


async def redis_equals(client: aioredis.Redis, key: str, value: int) -> bool:
    return await redis_int(client, key) == value


# --- budget windows follow the store's clock ---------------------------------------------------

DAY_BUDGET = parse_config("""
budgets:
  orgs:
    anonymous: {tokens_per_day: 100000}
models:
  chat:
    backends: [{name: a, address: "127.0.0.1:1"}]
""")


async def test_budget_windows_follow_redis_time_not_the_sidecars_clock(
        valkey: Valkey, valkey_client: aioredis.Redis) -> None:
    """A sidecar whose clock runs a day ahead charges the day that Valkey's clock says, as every
    other sidecar of the fleet does at that moment."""
    skew = 86_400.0
    store = RedisLimitStore(valkey.url, timeout=TIMEOUT, wall=lambda: time.time() + skew)
    await store.start()
    limits = Limits(lambda: DAY_BUDGET, store)
    try:
        for _ in range(3):  # a call exactly at midnight UTC would straddle two days: then again
            seconds, micros = await valkey_client.time()
            before = day_window(seconds + micros / 1e6)
            call = infer_call(max_output_tokens=100)
            await limits(call)
            seconds, micros = await valkey_client.time()
            if day_window(seconds + micros / 1e6) == before:
                break
        assert call.reservation is not None
        (charged,) = call.reservation.ask.budgets
        assert charged.window == before
        assert await redis_int(valkey_client, call.reservation.ask.budget_key(0)) == 100
        assert abs(store.wall() - (seconds + micros / 1e6)) < 5.0
    finally:
        await store.aclose()


def infer_call(max_output_tokens: int) -> Call:
    call = begin_call("Infer", InferRequest(model="chat", max_output_tokens=max_output_tokens).SerializeToString(),
                      (), None)
    call.parse()
    call.org, call.model = "anonymous", DAY_BUDGET.models["chat"]
    return call
