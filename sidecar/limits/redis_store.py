"""The shared limit store: every sidecar's rates and budgets in one Redis (or Valkey, or Cluster).

One call = one round trip: a Lua script decides every rate and budget of an `Ask` and charges
them only if all admit (the twin of `gcra.decide` and `budget.over_budget`). Decisions that
arrive while a batch is in flight go out together in the next pipeline. Settlements after calls
are summed per key and sent one script per org, with the next batch of decisions or after a
couple of milliseconds: a settlement costs a dict update, not a round trip of its own. Time is
Redis's own (`TIME`), so sidecars with skewed clocks share one timeline. Every key of an ask carries the
org as hash tag (`sidecar:rl:{acme}:...`), so a script's keys sit in one Cluster slot. Rate keys
expire once their bucket is full again; budget keys at the end of their window plus a day.

Scripts run by EVALSHA; after a NOSCRIPT (a restarted or flushed Redis) the script is loaded
again and the call repeated once. Every failure leaves here as `StoreUnavailable`: the guard
above decides what a failing store means for the call. No retries here: a slow store must cost
a call at most about two timeouts (its batch may wait behind the one in flight).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from sidecar.limits.gcra import charged
from sidecar.limits.store import Ask, StoreUnavailable, Verdict
from sidecar.tasks import Tasks

log = logging.getLogger("sidecar.limits")

# KEYS: n rate keys, then m budget keys.
# ARGV: n, m; per rate: interval_us, burst_us, cost_us, shadow (0/1); per budget: limit, cost, expire_at.
# Returns {allowed, kind (1 rate, 2 budget), index, value (wait_us or consumed), shadow indices...}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local new, shadow = {}, {}
local worst, denied = 0, 0
for i = 1, n do
  local a = 2 + (i - 1) * 4
  local burst, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local v = redis.call('GET', KEYS[i])
  local start = now
  if v and tonumber(v) > now then start = tonumber(v) end
  new[i] = start + cost
  local wait = new[i] - now - burst
  if wait > 1 then
    if ARGV[a + 4] == '1' then
      shadow[#shadow + 1] = i
      new[i] = start
    elseif wait > worst then
      worst, denied = wait, i
    end
  end
end
if denied > 0 then
  return {0, 1, denied, string.format('%.0f', worst), unpack(shadow)}
end
local used = {}
for j = 1, m do
  local a = 2 + n * 4 + (j - 1) * 3
  used[j] = tonumber(redis.call('GET', KEYS[n + j]) or '0')
  if used[j] + tonumber(ARGV[a + 2]) > tonumber(ARGV[a + 1]) then
    return {0, 2, j, string.format('%.0f', used[j]), unpack(shadow)}
  end
end
for i = 1, n do
  redis.call('SET', KEYS[i], string.format('%.0f', new[i]), 'PX', math.ceil((new[i] - now) / 1000) + 1000)
end
for j = 1, m do
  local a = 2 + n * 4 + (j - 1) * 3
  redis.call('INCRBY', KEYS[n + j], ARGV[a + 2])
  redis.call('EXPIREAT', KEYS[n + j], ARGV[a + 3])
end
return {1, 0, 0, '0', unpack(shadow)}
"""

# KEYS: the keys of one org to correct. ARGV per key: interval_us (0 = a budget counter), delta.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local interval, delta = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if interval > 0 then
    local v = redis.call('GET', KEYS[i])
    local start = now
    if v and tonumber(v) > now then start = tonumber(v) end
    local tat = math.max(now, start + delta * interval)
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  elseif redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('INCRBY', KEYS[i], delta) < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    end
  end
end
return 1
"""

SETTLE_BATCH_SECONDS = 0.002  # corrections of this long go to Redis in one round trip
BUDGET_KEY_GRACE_SECONDS = 86_400  # budget counters outlive their window by a day, for audits


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


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ScriptCall:
    script: Script
    keys: list[str]
    args: list[Any]


class RedisLimitStore:
    name = "redis"

    def __init__(self, url: str, timeout: float) -> None:
        # few connections: one batch is in flight at a time, plus a probe
        pool = aioredis.ConnectionPool.from_url(
            url, max_connections=8, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._queue: list[tuple[ScriptCall, asyncio.Future[Any]]] = []
        self._sending = False
        parsed = urlsplit(url)
        self._where = f"{parsed.hostname or parsed.path}:{parsed.port or ''}".rstrip(":")  # no password
        self._admit = Script(ADMIT)
        self._settle = Script(SETTLE)
        self._pending = Corrections()
        self._flusher: asyncio.Task[None] | None = None
        self._tasks = Tasks()
        # told when a batch of settlements is lost (they run in the background); the guard counts it
        self.on_failure: Callable[[StoreUnavailable], None] = _log_failure

    async def admit(self, ask: Ask) -> Verdict:
        args: list[Any] = [len(ask.rates), len(ask.budgets)]
        for rate, cost in zip(ask.rates, ask.rate_costs, strict=True):
            interval_us = 1e6 / rate.per_second
            args += [_num(interval_us), _num(rate.burst * interval_us), _num(charged(rate, cost) * interval_us),
                     1 if rate.shadow else 0]
        for budget, cost in zip(ask.budgets, ask.budget_costs, strict=True):
            args += [budget.limit, cost, int(budget.window.resets_at) + BUDGET_KEY_GRACE_SECONDS]
        reply = await self._run(self._admit, ask.keys(), args)
        if not isinstance(reply, list):
            raise StoreUnavailable(f"unexpected reply from the admit script: {reply!r}")
        allowed, kind, index, value = int(reply[0]), int(reply[1]), int(reply[2]), float(reply[3])
        shadow = tuple(ask.rates[int(i) - 1].name for i in reply[4:])
        if allowed:
            return Verdict(True, shadow_denied=shadow,
                           charged=tuple(charged(r, c) for r, c in zip(ask.rates, ask.rate_costs, strict=True)))
        if kind == 1:
            return Verdict(False, value / 1e6, ask.rates[index - 1].name, shadow_denied=shadow)
        return Verdict(False, 0.0, ask.budgets[index - 1].name, True, int(value), shadow)

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
        """Sends the queued corrections now: one SETTLE per org (one Cluster slot each), pipelined.

        A failure is reported to `on_failure` and the corrections are dropped: reservations then
        stay charged, which never under-counts (resending a timed-out script could apply a refund
        twice).
        """
        futures = self._queue_settlements()
        if futures:
            self._ensure_sender()
            await asyncio.gather(*futures, return_exceptions=True)

    def _queue_settlements(self) -> list[asyncio.Future[Any]]:
        batch, self._pending = self._pending, Corrections()
        futures = []
        for keys in batch.by_org.values():
            args = [part for entry in keys.values() for part in (_num(entry[0]), _num(entry[1]))]
            future = self._enqueue(ScriptCall(self._settle, list(keys), args))
            future.add_done_callback(self._settlement_done)
            futures.append(future)
        return futures

    def _settlement_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self.on_failure(StoreUnavailable("cancelled in flight; whether it was applied is unknown"))
        elif (exc := future.exception()) is not None:
            self.on_failure(exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc)))

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    def _run(self, script: Script, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queues one script call; its reply (or StoreUnavailable) arrives on the returned future.

        Calls queued while a batch is in flight go out together as the next batch (automatic
        pipelining): under load many decisions share one write, one read and one connection.
        """
        future = self._enqueue(ScriptCall(script, keys, args))
        self._ensure_sender()
        return future

    def _enqueue(self, call: ScriptCall) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        return future

    def _ensure_sender(self) -> None:
        if not self._sending:
            self._sending = True
            self._tasks.spawn(self._send_queued(), name="limit-store-batch")

    async def _send_queued(self) -> None:
        """Sends queued calls batch after batch until the queue is empty."""
        try:
            while self._queue:
                await self._send_batch()
        finally:
            self._sending = False

    async def _send_batch(self) -> None:
        """Sends what is queued as one pipeline and answers every future. Waiting settlements ride
        along, so a steady flow of calls needs no round trip of its own for them."""
        self._queue_settlements()
        batch, self._queue = self._queue, []
        try:
            replies = await self._eval([call for call, _ in batch])
        except StoreUnavailable as exc:
            replies = [exc] * len(batch)
        except BaseException:  # cancelled in flight: nobody will answer these calls now
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), reply in zip(batch, replies, strict=True):
            _resolve(future, reply)

    async def _eval(self, calls: list[ScriptCall]) -> list[Any]:
        """EVALSHA each call in one round trip; after NOSCRIPT, loads the script and resends those."""
        try:
            replies: list[Any] = [None] * len(calls)
            todo = list(range(len(calls)))
            for attempt in range(2):
                pipe = self._redis.pipeline(transaction=False)
                for i in todo:
                    call = calls[i]
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
                for script in {calls[i].script for i in missing}:
                    await self._redis.script_load(script.source)
                todo = missing
            return replies
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    def component(self) -> dict[str, Any]:
        return {"status": "ok", "store": self.name}

    async def aclose(self) -> None:
        await self._tasks.aclose(timeout=1.0)
        await self.flush()
        await self._redis.aclose()

    def __repr__(self) -> str:
        return f"<RedisLimitStore {self._where}>"


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():
        return  # its caller went away
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def _log_failure(exc: StoreUnavailable) -> None:
    log.warning("limit store settlement failed; reservations stay charged", extra={"error": str(exc)})


def _num(value: float) -> str:
    """A float argument for Lua, exact enough for microsecond arithmetic."""
    return repr(float(value))
