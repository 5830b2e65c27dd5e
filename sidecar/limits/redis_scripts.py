"""The Lua scripts of the Redis limit store (`redis_store.py`), each one round trip.

`ADMIT` is the twin of `gcra.decide` and `budget.over_budget`; `_CORRECT` of `gcra.settled_tat`
and the memory store's budget settle. `SETTLE` applies a numbered batch of corrections once;
`VOID` releases a decision whose caller never saw its verdict. Every key of one call shares the
org's hash tag, so each script runs in one Cluster slot.

A decision's marker is a field of its org's marker hash (with its expiry in a sorted set beside
it), not a key of its own: on a cluster, a script whose keys do not all exist yet gets TRYAGAIN
while its slot is being moved, and a key per decision would both never exist beforehand and fill
the slot with thousands of keys to move. An org's few keys exist while it is busy, and move in one
batch. Each admission forgets up to `_FORGET` expired markers, so the hash stays as large as the
decisions of the last `RESERVATION_MARKER_SECONDS`.
"""
from __future__ import annotations

import hashlib

# KEYS: n rate keys, then m budget keys, then the org's marker hash and its expiry set.
# ARGV: n, m, marker_ttl_ms, the decision's marker field; per rate: interval_us, burst_us, cost_us, shadow
# (0/1); per budget: limit, cost, expire_at. Returns {allowed, kind (1 rate, 2 budget, 3 released before it
# ran), index, value (wait_us or consumed), now_us, shadow indices...}. The marker holds 'c' and a flag per
# rate: '1' charged, '0' a shadow rate that would have denied (not charged).
_FORGET = 4  # expired markers an admission deletes, at most
ADMIT = f"local FORGET = {_FORGET}" + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local new, shadow = {}, {}
local worst, denied = 0, 0
for i = 1, n do
  local a = 4 + (i - 1) * 4
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
  return {0, 1, denied, string.format('%.0f', worst), now, unpack(shadow)}
end
local used = {}
for j = 1, m do
  local a = 4 + n * 4 + (j - 1) * 3
  used[j] = tonumber(redis.call('GET', KEYS[n + j]) or '0')
  if used[j] + tonumber(ARGV[a + 2]) > tonumber(ARGV[a + 1]) then
    return {0, 2, j, string.format('%.0f', used[j]), now, unpack(shadow)}
  end
end
local flags = string.rep('1', n)
if #shadow > 0 then
  local f = {}
  for i = 1, n do f[i] = '1' end
  for _, i in ipairs(shadow) do f[i] = '0' end
  flags = table.concat(f)
end
local marks, expiries = KEYS[n + m + 1], KEYS[n + m + 2]
if redis.call('HSETNX', marks, ARGV[4], 'c' .. flags) == 0 then
  return {0, 3, 0, '0', now, unpack(shadow)}
end
local now_ms = math.floor(now / 1000)
local expired = redis.call('ZRANGEBYSCORE', expiries, '-inf', now_ms, 'LIMIT', 0, FORGET)
if #expired > 0 then
  redis.call('HDEL', marks, unpack(expired))
  redis.call('ZREM', expiries, unpack(expired))
end
redis.call('ZADD', expiries, now_ms + tonumber(ARGV[3]), ARGV[4])
redis.call('PEXPIRE', marks, ARGV[3])
redis.call('PEXPIRE', expiries, ARGV[3])
for i = 1, n do
  redis.call('SET', KEYS[i], string.format('%.0f', new[i]), 'PX', math.ceil((new[i] - now) / 1000) + 1000)
end
for j = 1, m do
  local a = 4 + n * 4 + (j - 1) * 3
  redis.call('INCRBY', KEYS[n + j], ARGV[a + 2])
  redis.call('EXPIREAT', KEYS[n + j], ARGV[a + 3])
end
return {1, 0, 0, '0', now, unpack(shadow)}
"""

# One correction (the twin of `gcra.settled_tat` and the memory store's budget settle): a rate key's
# TAT moves by delta units (never below now); a budget counter by delta (never below zero, and only
# while its window's key exists).
_CORRECT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function correct(key, interval, delta)
  if interval > 0 then
    local v = redis.call('GET', key)
    local start = now
    if v and tonumber(v) > now then start = tonumber(v) end
    local tat = math.max(now, start + delta * interval)
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  elseif redis.call('EXISTS', key) == 1 then
    if redis.call('INCRBY', key, delta) < 0 then
      redis.call('SET', key, 0, 'KEEPTTL')
    end
  end
end
"""

# KEYS: this store's set of applied settlement batches (in the org's slot), then the keys of one org to
# correct. ARGV: batch number, the lowest number whose outcome this store does not know yet, the set's
# ttl_ms; per key: interval_us (0 = a budget counter), delta. Returns 1 when applied, 0 for a batch
# applied before (a resend).
SETTLE = _CORRECT + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
local fresh = redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if fresh == 0 then return 0 end
for i = 2, #KEYS do
  correct(KEYS[i], tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1]))
end
return 1
"""

# KEYS: the org's marker hash and its expiry set, then the decision's n rate keys and its budget keys.
# ARGV: marker_ttl_ms, the marker field, n; per rate: interval_us, units charged; per budget: the amount
# charged. Returns 1 when it released the charge, 0 when there was none (not run yet: the tombstone 'v'
# makes it charge nothing; denied; released before).
VOID = _CORRECT + """
local mark = redis.call('HGET', KEYS[1], ARGV[2])
if not mark then
  redis.call('HSET', KEYS[1], ARGV[2], 'v')
  redis.call('ZADD', KEYS[2], math.floor(now / 1000) + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  return 0
end
if string.sub(mark, 1, 1) ~= 'c' then return 0 end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
local n = tonumber(ARGV[3])
for i = 1, n do
  if string.sub(mark, i + 1, i + 1) == '1' then
    correct(KEYS[i + 2], tonumber(ARGV[2 + 2 * i]), -tonumber(ARGV[3 + 2 * i]))
  end
end
for j = 1, #KEYS - 2 - n do
  correct(KEYS[2 + n + j], 0, -tonumber(ARGV[3 + 2 * n + j]))
end
return 1
"""


# The sidecars sharing this store, for the share each takes while the store is out. KEYS: the fleet's
# sorted set (member: a store's id, score: when its registration expires, in Redis ms). ARGV: the
# store's id, ttl_ms (0: leaving). Returns how many sidecars are registered now.
FLEET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
"""


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
