"""The embedded limit store: GCRA state and budget counters in dicts, for one sidecar process.

The default (`limits.store: memory`), and the local fallback behind the Redis store, which then
holds `share` (1/the sidecars counted in the fleet) of every limit, its buckets starting with one
second's worth. Decisions are made under the event loop's
single thread, so check-and-charge is atomic without a lock. Keys come from config (org, key
ids, models) and the calendar, never from caller input; windows past their end are pruned.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sidecar.limits.budget import over_budget
from sidecar.limits.gcra import charged, decide, settled_tat
from sidecar.limits.store import Ask, Verdict

_NOTHING = (0, 0.0)  # a budget window nothing was charged to yet: (consumed, window end)


class MemoryLimitStore:
    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 share: float = 1.0, start_empty: bool = False) -> None:
        self._clock = clock
        self._wall = wall
        self.share = share
        # the fallback's buckets start nearly empty (one second's worth): a store that flaps must
        # not hand out a burst each time
        self._start_empty = start_empty
        self._tats: dict[str, float] = {}
        self._consumed: dict[str, tuple[int, float]] = {}  # budget key -> (consumed, window end)

    async def start(self) -> None:
        return None

    async def admit(self, ask: Ask) -> Verdict:
        return self.admit_now(ask)

    def admit_now(self, ask: Ask) -> Verdict:
        rates = [r.scaled(self.share) for r in ask.rates] if self.share != 1.0 else ask.rates
        keys = ask.rate_keys or [ask.rate_key(i) for i in range(len(rates))]
        now = self._clock()
        if self._start_empty:
            for key, rate in zip(keys, rates, strict=True):
                if key not in self._tats:  # one second's worth in the bucket, not a whole burst
                    self._tats[key] = now + (rate.burst - min(rate.burst, rate.per_second)) * rate.interval
        tats = self._tats
        decision = decide(rates, [tats.get(k) for k in keys], now, ask.rate_costs)
        if not decision.allowed:
            return Verdict(False, decision.retry_after, decision.denied_by, shadow_denied=decision.shadow_denied)
        budgets = [b.scaled(self.share) for b in ask.budgets] if self.share != 1.0 else ask.budgets
        budget_keys = ask.budget_keys or [ask.budget_key(i) for i in range(len(budgets))]
        consumed = [self._consumed.get(k, _NOTHING)[0] for k in budget_keys]
        over = over_budget(budgets, consumed, ask.budget_costs)
        if over is not None:
            return Verdict(False, 0.0, budgets[over].name, True, consumed[over], decision.shadow_denied)
        for key, tat in zip(keys, decision.new_tats, strict=True):
            tats[key] = tat
        new_window = False
        for key, used, cost, budget in zip(budget_keys, consumed, ask.budget_costs, budgets, strict=True):
            new_window = new_window or key not in self._consumed
            self._consumed[key] = (used + cost, budget.window.resets_at)
        if new_window:
            self._prune()  # a window began: those that ended go
        return Verdict(True, shadow_denied=decision.shadow_denied, charged=tuple(map(charged, rates, ask.rate_costs)))

    def settle(self, ask: Ask, rate_deltas: tuple[float, ...], budget_deltas: tuple[int, ...],
               *, degraded: bool = False) -> None:
        now = self._clock()
        for i, delta in enumerate(rate_deltas):
            if delta:
                key = ask.rate_key(i)
                self._tats[key] = settled_tat(ask.rates[i].scaled(self.share), self._tats.get(key), now, delta)
        for i, delta in enumerate(budget_deltas):
            key = ask.budget_key(i)
            if delta and key in self._consumed:
                used, ends = self._consumed[key]
                self._consumed[key] = (max(0, used + delta), ends)

    async def flush(self) -> None:
        return None  # corrections are applied as they come

    def wall(self) -> float:
        return self._wall()

    def consumed(self, ask: Ask, i: int) -> int:
        return self._consumed.get(ask.budget_key(i), (0, 0.0))[0]

    def _prune(self) -> None:
        now = self._wall()
        for key in [k for k, (_, ends) in self._consumed.items() if ends <= now]:
            del self._consumed[key]

    def component(self) -> dict[str, Any]:
        return {"status": "ok", "store": self.name}

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        share = f" share={self.share:g}" if self.share != 1.0 else ""
        return f"<MemoryLimitStore {len(self._tats)} limits, {len(self._consumed)} budget windows{share}>"
