"""The shared limit store: every sidecar's rates and budgets in one Redis (or Valkey, or Cluster).

One call = one round trip: a Lua script decides every rate and budget of an `Ask` and charges
them only if all admit (the twin of `gcra.decide` and `budget.over_budget`). Decisions that
arrive while a batch is in flight go out together in the next pipeline. Settlements after calls
are summed per key and sent one script per org, with the next batch of decisions or after a
couple of milliseconds: a settlement costs a dict update, not a round trip of its own. Every key
of an ask carries the org as hash tag (`sidecar:rl:{acme}:...`), so a script's keys sit in one
Cluster slot. Rate keys expire once their bucket is full again; budget keys at the end of their
window plus a day.

Time is Redis's own (`TIME`): rates are decided on it, and `wall()`, by which `Limits` picks a
budget's day and month, is this host's clock corrected by Redis's (one TIME at `start`, then the
time every decision's reply carries). So sidecars with skewed clocks share one timeline, and
charge the same window at the same moment.

A decision whose caller never gets the verdict (the caller was cancelled, or the reply timed
out, or the batch failed after it may have run) is released, exactly once. The admit script
leaves a marker with what it charged (field `<store>:<n>` of the org's `sidecar:res:{org}`, for
`RESERVATION_MARKER_SECONDS`); a release ("void") refunds only if the marker is there and deletes
it, or else leaves a tombstone in its place, so that a decision still on its way charges
nothing. Whatever order they run in, the charge is undone once. Settlement batches are numbered
per store: the script records the numbers it applied (a small sorted set per store and org), so
a batch that failed may be resent, and is, without being applied twice. Voids and resends go out
in the background on their own connection (never in a decision's pipeline), until Redis answers
or `RESERVATION_MARKER_SECONDS` / `SETTLE_RESEND_SECONDS` have passed.

Scripts run by EVALSHA; after a NOSCRIPT (a restarted or flushed Redis, a new cluster node) the
call is repeated once as EVAL, which caches the script where it ran. Every failure leaves here as
`StoreUnavailable`: the guard above decides what a failing store means for the call. A batch
(connect, send, read, a NOSCRIPT repeat) must be done within one timeout, and a decision waits at
most for the batch in flight and then its own: a slow store costs a call at most about two
timeouts.

On a Redis Cluster (`redis+cluster://`) every call goes to the node that owns its org's slot, and
each node has its own lane: its own queue of calls and its own batch in flight. So a frozen or
dead node holds up, and fails, only the calls of the orgs it owns; the others never wait behind
it. A batch that meets a slot being moved follows MOVED and ASK (redis-py's cluster pipeline);
a call that still fails (TRYAGAIN while a slot's keys are half-migrated) fails alone, as a store
error for that one call. `node_of(org)` names the node an org's decisions go to, for the guard's
breaker per node.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from sidecar import redis_client
from sidecar.limits.gcra import charged
from sidecar.limits.redis_scripts import ADMIT, FLEET, SETTLE, VOID, Script
from sidecar.limits.store import Ask, StoreUnavailable, Verdict
from sidecar.tasks import Tasks

if TYPE_CHECKING:
    from sidecar.config import ClientTlsConfig

log = logging.getLogger("sidecar.limits")

SETTLE_BATCH_SECONDS = 0.002  # corrections of this long go to Redis in one round trip
BUDGET_KEY_GRACE_SECONDS = 86_400  # budget counters outlive their window by a day, for audits
# How long a decision's marker (or a void's tombstone) lives: a decision whose caller left is released
# if Redis answers within this; a decision that reaches Redis this much later than its void is charged.
RESERVATION_MARKER_SECONDS = 30.0
SETTLE_RESEND_SECONDS = 300.0  # a settlement batch that failed is resent for this long, then dropped
APPLIED_SET_SECONDS = SETTLE_RESEND_SECONDS + 60.0  # the record of applied batches outlives every resend
RESEND_FIRST_SECONDS, RESEND_MAX_SECONDS = 0.05, 1.0  # back-off between rounds of resends
FLEET_KEY = "sidecar:fleet:{fleet}"  # the sidecars sharing this store (`heartbeat`)


class Corrections:
    """Settlements waiting to be sent, summed per key and grouped by org (the hash tag)."""

    def __init__(self) -> None:
        self.by_org: dict[str, dict[str, list[float]]] = {}  # org -> key -> [interval_us (0: budget), delta]

    def add(self, ask: Ask, rate_deltas: tuple[float, ...], budget_deltas: tuple[int, ...]) -> None:
        keys = self.by_org.setdefault(ask.org, {})
        for i, delta in enumerate(rate_deltas):
            if delta:
                keys.setdefault(ask.rate_key(i), [1e6 / ask.rates[i].per_second, 0.0])[1] += delta
        for i, budget_delta in enumerate(budget_deltas):
            if budget_delta:
                keys.setdefault(ask.budget_key(i), [0.0, 0.0])[1] += budget_delta
        if not keys:
            del self.by_org[ask.org]


@dataclass(frozen=True, slots=True)
class ScriptCall:
    script: Script
    keys: list[str]
    args: list[Any]
    # a decision's: told the reply (or the failure) when its caller will never see it
    on_lost: Callable[[Any], None] | None = None


@dataclass(slots=True)
class Lane:
    """The calls waiting for one node (one lane for a single Redis), and whether its sender runs."""

    queue: list[tuple[ScriptCall, asyncio.Future[Any]]]
    sending: bool = False


@dataclass(frozen=True, slots=True)
class Resend:
    """A call sent again in the background until Redis answers it or `deadline` (monotonic) passes."""

    call: ScriptCall
    deadline: float
    batch: int = 0  # a settlement batch's number (0: a void)


class RedisLimitStore:
    name = "redis"

    def __init__(self, url: str, timeout: float, *, wall: Callable[[], float] = time.time,
                 tls: ClientTlsConfig | None = None) -> None:
        # few connections (per node): one batch is in flight at a time, plus resends and a probe.
        # No socket timeout: one deadline bounds each whole round trip (`_eval`, `ping`), and costs
        # one timer per batch instead of one per reply read
        self._redis = redis_client.connect(url, timeout, socket_timeout=None, tls=tls)
        self._cluster = self._redis if isinstance(self._redis, RedisCluster) else None
        self._timeout = timeout
        self._wall = wall
        self._offset = 0.0  # Redis's clock minus ours: from `start`, then from every decision's reply
        self._lanes: dict[str, Lane] = {}  # by node name ("" for a single Redis, or a slot no node owns)
        self._where = redis_client.where(url)  # no password
        self._admit = Script(ADMIT)
        self._settle = Script(SETTLE)
        self._void = Script(VOID)
        self._fleet = Script(FLEET)
        self._id = os.urandom(6).hex()  # this store's name in its markers and its record of applied batches
        self._markers = itertools.count(1)
        self._batches = itertools.count(1)
        self._unanswered: set[int] = set()  # settlement batches sent whose outcome is not known yet
        self._resends: list[Resend] = []
        self._resending: list[Resend] = []  # the round in flight
        self._resender: asyncio.Task[None] | None = None
        self._closing = False
        self._pending = Corrections()
        self._flusher: asyncio.Task[None] | None = None
        self._tasks = Tasks()
        # told when a batch of settlements fails (they run in the background); the guard counts it
        self.on_failure: Callable[[StoreUnavailable], None] = _log_failure

    def wall(self) -> float:
        return self._wall() + self._offset

    async def start(self) -> None:
        """Learns Redis's clock (one TIME) before the first decision needs it for a budget window,
        and a cluster's slots."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._cluster is not None:
                    await self._cluster.initialize()
                sent = self._wall()
                seconds, micros = await self._time()
                self._offset = seconds + micros / 1e6 - (sent + self._wall()) / 2
        except (RedisError, RedisClusterException, OSError, TimeoutError):
            log.warning("limit store: Redis's clock is unknown until its first decision", extra={"store": repr(self)})

    async def _time(self) -> tuple[int, int]:
        """Redis's TIME; on a cluster, from the first master that answers."""
        if self._cluster is None:
            seconds, micros = await self._redis.time()
            return int(seconds), int(micros)
        error: Exception = RedisClusterException("the cluster has no master")
        for node in self._cluster.get_primaries():
            try:
                seconds, micros = await self._cluster.execute_command("TIME", target_nodes=node)
                return int(seconds), int(micros)
            except (RedisError, OSError) as exc:
                error = exc
        raise error

    async def heartbeat(self, ttl: float) -> int:
        """Registers this store for `ttl` seconds among the sidecars sharing Redis and returns how
        many are registered (a `ttl` of 0 leaves). Raises `StoreUnavailable`."""
        reply = await self._submit(ScriptCall(self._fleet, [FLEET_KEY], [self._id, int(ttl * 1000)]))
        return int(reply)

    def node_of(self, org: str) -> str:
        """The node `org`'s keys live on, by name ("" for a single Redis, or while unknown)."""
        return self._node_of_key(f"sidecar:rl:{{{org}}}")

    def _node_of_key(self, key: str) -> str:
        if self._cluster is None:
            return ""
        try:
            return str(self._cluster.nodes_manager.get_node_from_slot(key_slot(key.encode())).name)
        except RedisClusterException:  # no topology yet, or a slot no node serves
            return ""

    async def admit(self, ask: Ask) -> Verdict:
        marker = f"{self._id}:{next(self._markers):x}"
        args: list[Any] = [len(ask.rates), len(ask.budgets), _MARKER_MS, marker]
        for rate, cost in zip(ask.rates, ask.rate_costs, strict=True):
            interval_us = 1e6 / rate.per_second
            args += [_num(interval_us), _num(rate.burst * interval_us), _num(charged(rate, cost) * interval_us),
                     1 if rate.shadow else 0]
        for budget, cost in zip(ask.budgets, ask.budget_costs, strict=True):
            args += [budget.limit, cost, int(budget.window.resets_at) + BUDGET_KEY_GRACE_SECONDS]
        call = ScriptCall(self._admit, [*ask.keys(), *_marker_keys(ask.org)], args, partial(self._release, ask, marker))
        future = self._submit(call)
        try:
            reply = await future
        except BaseException:
            # the reply or the failure came, but the caller will not see it (a cancelled future's
            # reply, if any, goes to `_release` from the batch that gets it)
            if not future.cancelled():
                self._release(ask, marker, future.exception() or future.result())
            raise
        if not isinstance(reply, list):
            raise StoreUnavailable(f"unexpected reply from the admit script: {reply!r}")
        allowed, kind, index, value = int(reply[0]), int(reply[1]), int(reply[2]), float(reply[3])
        self._offset = int(reply[4]) / 1e6 - self._wall()
        shadow = tuple(ask.rates[int(i) - 1].name for i in reply[5:])
        if allowed:
            return Verdict(True, shadow_denied=shadow,
                           charged=tuple(charged(r, c) for r, c in zip(ask.rates, ask.rate_costs, strict=True)))
        if kind == 1:
            return Verdict(False, value / 1e6, ask.rates[index - 1].name, shadow_denied=shadow)
        if kind == 2:
            return Verdict(False, 0.0, ask.budgets[index - 1].name, True, int(value), shadow)
        raise StoreUnavailable("the decision was released before it ran")  # its caller had given up on it

    def _release(self, ask: Ask, marker: str, reply: Any) -> None:
        """A decision's caller will never see `reply`: whatever it charged is voided, in the background.

        A failure means it may have run; only a denial (or a release that came first) charged nothing."""
        if isinstance(reply, list) and int(reply[0]) != 1:
            return
        args: list[Any] = [_MARKER_MS, marker, len(ask.rates)]
        for rate, cost in zip(ask.rates, ask.rate_costs, strict=True):
            args += [_num(1e6 / rate.per_second), _num(charged(rate, cost))]
        args += ask.budget_costs
        self._resend(Resend(ScriptCall(self._void, [*_marker_keys(ask.org), *ask.keys()], args),
                            time.monotonic() + RESERVATION_MARKER_SECONDS))

    def settle(self, ask: Ask, rate_deltas: tuple[float, ...], budget_deltas: tuple[int, ...],
               *, degraded: bool = False) -> None:
        """Queues the correction; a flush a few ms later sends all queued ones in one round trip."""
        self._pending.add(ask, rate_deltas, budget_deltas)
        if self._flusher is None or self._flusher.done():
            self._flusher = self._tasks.spawn(self._flush_soon(), name="limit-settle-flush")

    async def _flush_soon(self) -> None:
        while self._pending.by_org:  # also what was queued while the previous flush was in flight
            await asyncio.sleep(SETTLE_BATCH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        """Sends the queued corrections now (one SETTLE per org: one Cluster slot each, pipelined)
        and waits for that attempt. A batch that fails is reported to `on_failure` and resent in
        the background (applied once, however often it is sent) for `SETTLE_RESEND_SECONDS`."""
        futures = self._queue_settlements()
        if futures:
            await asyncio.wait(futures)  # a cancelled flush leaves them to the sender

    def _queue_settlements(self) -> list[asyncio.Future[Any]]:
        batch, self._pending = self._pending, Corrections()
        futures = []
        for org, keys in batch.by_org.items():
            number = next(self._batches)
            self._unanswered.add(number)
            args = [number, min(self._unanswered), _APPLIED_SET_MS,
                    *(part for entry in keys.values() for part in (_num(entry[0]), _num(entry[1])))]
            call = ScriptCall(self._settle, [f"sidecar:settled:{{{org}}}:{self._id}", *keys], args)
            future = self._submit(call)
            future.add_done_callback(partial(self._settlement_done, call, number))
            futures.append(future)
        return futures

    def _settlement_done(self, call: ScriptCall, number: int, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._unanswered.discard(number)
            return
        exc = StoreUnavailable("cancelled in flight") if future.cancelled() else future.exception()
        self.on_failure(exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc)))
        self._resend(Resend(call, time.monotonic() + SETTLE_RESEND_SECONDS, number))

    @property
    def resends_pending(self) -> int:
        """Voids and settlement batches not yet answered by Redis (queued or in flight)."""
        return len(self._resends) + len(self._resending)

    def _resend(self, resend: Resend) -> None:
        self._resends.append(resend)
        if not self._closing and (self._resender is None or self._resender.done()):
            self._resender = self._tasks.spawn(self._resend_all(), name="limit-store-resend")

    async def _resend_all(self) -> None:
        """Sends what waits to be resent, round after round, backing off while Redis fails."""
        delay = RESEND_FIRST_SECONDS
        while self._resends:
            if await self._resend_round():
                delay = RESEND_FIRST_SECONDS
            else:
                await asyncio.sleep(delay)
                delay = min(2 * delay, RESEND_MAX_SECONDS)

    async def _resend_round(self) -> bool:
        """One pipeline of every waiting resend; True when Redis answered all of them."""
        self._resending, self._resends = self._resends, []
        try:
            replies: list[Any] = await self._eval([resend.call for resend in self._resending])
        except StoreUnavailable as exc:
            replies = [exc] * len(self._resending)
        except BaseException:  # cancelled (at shutdown): they wait for the last round
            self._resends[:0] = self._resending
            self._resending = []
            raise
        now, gave_up = time.monotonic(), 0
        for resend, reply in zip(self._resending, replies, strict=True):
            if not isinstance(reply, BaseException):
                self._unanswered.discard(resend.batch)
            elif now < resend.deadline:
                self._resends.append(resend)
            else:
                self._unanswered.discard(resend.batch)
                gave_up += 1
        self._resending = []
        if gave_up:
            log.warning("limit store: gave up resending releases and settlements; those stay charged",
                        extra={"count": gave_up})
        return all(not isinstance(reply, BaseException) for reply in replies)

    async def ping(self, node: str = "") -> bool:
        """True when Redis answers; on a cluster, the slots are learned again first (a failover
        or a migration may have moved them), then `node` is asked. A node no longer in the
        cluster counts as answered: its orgs' keys are served elsewhere now."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._cluster is None:
                    return bool(await self._redis.ping())
                await self._cluster.nodes_manager.initialize()
                target = self._cluster.get_node(node_name=node) if node else None
                if node and (target is None or node not in self._owners()):
                    return True
                return bool(await self._cluster.ping(target_nodes=target or RedisCluster.PRIMARIES))
        except (RedisError, RedisClusterException, OSError, TimeoutError):
            return False

    def _owners(self) -> set[str]:
        """The names of the nodes that own slots now."""
        assert self._cluster is not None
        return {nodes[0].name for nodes in self._cluster.nodes_manager.slots_cache.values() if nodes}

    def _run(self, script: Script, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queues one script call; its reply (or StoreUnavailable) arrives on the returned future."""
        return self._submit(ScriptCall(script, keys, args))

    def _submit(self, call: ScriptCall) -> asyncio.Future[Any]:
        """Queues `call` for the next batch of its node's lane. Calls queued while a batch is in
        flight go out together as the next batch (automatic pipelining): under load many
        decisions share one write, one read and one connection."""
        future, lane = self._enqueue(call)
        if not lane.sending:
            lane.sending = True
            self._tasks.spawn(self._send_queued(lane), name="limit-store-batch")
        return future

    def _enqueue(self, call: ScriptCall) -> tuple[asyncio.Future[Any], Lane]:
        """Queues `call` in its node's lane (without starting the lane's sender)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        node = self._node_of_key(call.keys[0]) if call.keys else ""
        lane = self._lanes.get(node)
        if lane is None:
            lane = self._lanes[node] = Lane([])
        lane.queue.append((call, future))
        return future, lane

    async def _send_queued(self, lane: Lane) -> None:
        """Sends a lane's queued calls batch after batch until its queue is empty."""
        try:
            while lane.queue:
                await self._send_batch(lane)
        finally:
            lane.sending = False

    async def _send_batch(self, lane: Lane) -> None:
        """Sends what is queued in `lane` as one pipeline and answers every future. Waiting
        settlements ride along (those of this lane's orgs in this batch; the others start their
        own lane's), so a steady flow of calls needs no round trip of its own for them. A call whose
        caller left before it was sent is not sent."""
        self._queue_settlements()
        batch = [(call, future) for call, future in lane.queue if not future.cancelled()]
        lane.queue = []
        if not batch:
            return
        try:
            replies = await self._eval([call for call, _ in batch])
        except StoreUnavailable as exc:
            replies = [exc] * len(batch)
        except BaseException:  # cancelled in flight: nobody will answer these calls now
            for call, future in batch:
                future.cancel()
                if call.on_lost is not None:
                    call.on_lost(StoreUnavailable("cancelled in flight"))
            raise
        for (call, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller left: the reply goes where the verdict would have
                if call.on_lost is not None:
                    call.on_lost(reply)
            elif isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _eval(self, calls: list[ScriptCall]) -> list[Any]:
        """Each call's reply, or a `StoreUnavailable` in its place; raises `StoreUnavailable` when
        none was answered. On a cluster the calls go to their nodes side by side, one pipeline
        each, and a node that fails fails only its own calls."""
        if self._cluster is None:
            return await self._eval_on(calls)
        groups: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(self._node_of_key(call.keys[0]) if call.keys else "", []).append(i)
        if len(groups) == 1:
            return await self._eval_on(calls)
        results = await asyncio.gather(*(self._eval_on([calls[i] for i in group]) for group in groups.values()),
                                       return_exceptions=True)
        replies: list[Any] = [None] * len(calls)
        for group, result in zip(groups.values(), results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, StoreUnavailable):
                raise result
            for n, i in enumerate(group):
                replies[i] = result if isinstance(result, StoreUnavailable) else result[n]
        if all(isinstance(reply, StoreUnavailable) for reply in replies):
            raise replies[0]
        return replies

    async def _eval_on(self, calls: list[ScriptCall]) -> list[Any]:
        """EVALSHA each call in one round trip; after NOSCRIPT, the same calls again as EVAL.
        All of it within one timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                replies: list[Any] = [None] * len(calls)
                todo = list(range(len(calls)))
                for attempt in range(2):
                    pipe = self._redis.pipeline(transaction=False)
                    for i in todo:
                        call = calls[i]
                        if attempt:
                            pipe.eval(call.script.source, len(call.keys), *call.keys, *call.args)
                        else:
                            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                    results = await pipe.execute(raise_on_error=False)
                    missing = []
                    for i, result in zip(todo, results, strict=True):
                        if isinstance(result, NoScriptError) and not attempt:
                            missing.append(i)
                        elif isinstance(result, Exception):
                            replies[i] = StoreUnavailable(f"{type(result).__name__}: {result}")
                        else:
                            replies[i] = result
                    if not missing:
                        break
                    todo = missing
                return replies
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    def component(self) -> dict[str, Any]:
        return {"status": "ok", "store": self.name}

    async def aclose(self) -> None:
        """Waits (1 s at most) for the batches in flight, sends the last settlements, and gives
        what waits to be resent one last round."""
        self._closing = True
        if self._resender is not None:
            self._resender.cancel()  # its back-off would outlast a shutdown: one last round below
        await self._tasks.aclose(timeout=1.0)
        await self.flush()
        if self._resends:
            await self._resend_round()
            if self._resends:
                log.warning("limit store closed with releases and settlements unsent; those stay charged",
                            extra={"count": len(self._resends)})
        await self._redis.aclose()

    def __repr__(self) -> str:
        return f"<RedisLimitStore {self._where}>"


_MARKER_MS = int(RESERVATION_MARKER_SECONDS * 1000)
_APPLIED_SET_MS = int(APPLIED_SET_SECONDS * 1000)


def _marker_keys(org: str) -> list[str]:
    """The org's decision markers (a hash) and when each expires (a sorted set): in its slot."""
    return [f"sidecar:res:{{{org}}}", f"sidecar:resx:{{{org}}}"]


def _log_failure(exc: StoreUnavailable) -> None:
    log.warning("limit store settlement failed; resending it", extra={"error": str(exc)})


def _num(value: float) -> str:
    """A float argument for Lua, exact enough for microsecond arithmetic."""
    return repr(float(value))
