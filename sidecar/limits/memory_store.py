"""The embedded limit store: GCRA state in a dict, for one sidecar process.

The default (`limits.store: memory`). Decisions are made under the event loop's single thread,
so check-and-update is atomic without a lock. State is keyed by limit name, which comes from
config (org and key ids), never from caller input, so it stays bounded.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sidecar.limits.gcra import Decision, Rate, decide


class MemoryLimitStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}

    async def acquire(self, rates: Sequence[Rate], cost: float = 1.0) -> Decision:
        decision = decide(rates, [self._tats.get(r.name) for r in rates], self._clock(), cost)
        if decision.allowed:
            for rate, tat in zip(rates, decision.new_tats, strict=True):
                self._tats[rate.name] = tat
        return decision

    def __repr__(self) -> str:
        return f"<MemoryLimitStore {len(self._tats)} limits>"
