"""The shared limit store: every sidecar's rates and budgets in one Redis (or Valkey, or Cluster).

One call = one round trip: a Lua script decides every rate and budget of an `Ask` and charges
them only if all admit (the twin of `gcra.decide` and `budget.over_budget`). Time is Redis's own
(`TIME`), so sidecars with skewed clocks share one timeline. Every key of an ask carries the
org as hash tag (`sidecar:rl:{acme}:...`), so a script's keys sit in one Cluster slot. Rate keys
expire once their bucket is full again; budget keys at the end of their window plus a day.

Scripts run by EVALSHA; after a NOSCRIPT (a restarted or flushed Redis) the script is loaded
again and the call repeated once. Every failure leaves here as `StoreUnavailable`: the guard
above decides what a failing store means for the call. No retries here: a slow store must cost
a call at most one timeout.
"""
from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from sidecar.limits.gcra import charged
from sidecar.limits.store import Ask, StoreUnavailable, Verdict

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
    return {0, 2, j, tostring(used[j]), unpack(shadow)}
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

# KEYS as ADMIT. ARGV: n, m; per rate: interval_us, delta (units); per budget: delta.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, n do
  local a = 2 + (i - 1) * 2
  local delta = tonumber(ARGV[a + 2])
  if delta ~= 0 then
    local v = redis.call('GET', KEYS[i])
    local start = now
    if v and tonumber(v) > now then start = tonumber(v) end
    local tat = math.max(now, start + delta * tonumber(ARGV[a + 1]))
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
end
for j = 1, m do
  local delta = tonumber(ARGV[2 + n * 2 + j])
  if delta ~= 0 and redis.call('EXISTS', KEYS[n + j]) == 1 then
    if redis.call('INCRBY', KEYS[n + j], delta) < 0 then
      redis.call('SET', KEYS[n + j], 0, 'KEEPTTL')
    end
  end
end
return 1
"""

BUDGET_KEY_GRACE_SECONDS = 86_400  # budget counters outlive their window by a day, for audits


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class RedisLimitStore:
    name = "redis"

    def __init__(self, url: str, timeout: float, max_connections: int = 64) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._redis = aioredis.Redis(connection_pool=pool)
        parsed = urlsplit(url)
        self._where = f"{parsed.hostname or parsed.path}:{parsed.port or ''}".rstrip(":")  # no password
        self._admit = Script(ADMIT)
        self._settle = Script(SETTLE)

    async def admit(self, ask: Ask) -> Verdict:
        args: list[Any] = [len(ask.rates), len(ask.budgets)]
        for rate, cost in zip(ask.rates, ask.rate_costs, strict=True):
            interval_us = 1e6 / rate.per_second
            args += [_num(interval_us), _num(rate.burst * interval_us), _num(charged(rate, cost) * interval_us),
                     1 if rate.shadow else 0]
        for budget, cost in zip(ask.budgets, ask.budget_costs, strict=True):
            args += [budget.limit, cost, int(budget.window.resets_at) + BUDGET_KEY_GRACE_SECONDS]
        reply = await self._run(self._admit, ask.keys(), args)
        allowed, kind, index, value = int(reply[0]), int(reply[1]), int(reply[2]), float(reply[3])
        shadow = tuple(ask.rates[int(i) - 1].name for i in reply[4:])
        if allowed:
            return Verdict(True, shadow_denied=shadow)
        if kind == 1:
            return Verdict(False, value / 1e6, ask.rates[index - 1].name, shadow_denied=shadow)
        return Verdict(False, 0.0, ask.budgets[index - 1].name, True, int(value), shadow)

    async def settle(self, ask: Ask, rate_deltas: tuple[float, ...], budget_deltas: tuple[int, ...],
                     *, degraded: bool = False) -> None:
        args: list[Any] = [len(ask.rates), len(ask.budgets)]
        for rate, delta in zip(ask.rates, rate_deltas, strict=True):
            args += [_num(1e6 / rate.per_second), _num(delta)]
        args += list(budget_deltas)
        await self._run(self._settle, ask.keys(), args)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def _run(self, script: Script, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            try:
                reply = await self._redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._redis.script_load(script.source)
                reply = await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        return list(reply) if isinstance(reply, list) else [reply]

    def component(self) -> dict[str, Any]:
        return {"status": "ok", "store": self.name}

    async def aclose(self) -> None:
        await self._redis.aclose()

    def __repr__(self) -> str:
        return f"<RedisLimitStore {self._where}>"


def _num(value: float) -> str:
    """A float argument for Lua, exact enough for microsecond arithmetic."""
    return repr(float(value))
