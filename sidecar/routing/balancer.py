"""Backend choice: pure and synchronous, given the candidates and a `random.Random`.

For now a weighted random choice over a model's backends, lowest priority tier first. The full
routing engine (health, ejection, overrides, affinity) replaces `WeightedRandom` behind the same
`Balancer.pick()` interface.
"""
from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from typing import Protocol

from sidecar.routing.channels import Backend


class Balancer(Protocol):
    def pick(self, model: str) -> Backend | None:
        """The backend for the next call of `model`; None when no backend can take it."""


class _WeightedTable:
    """Cumulative weights of one tier, for O(log n) weighted choice."""

    __slots__ = ("cumulative", "items", "total")

    def __init__(self, items: Sequence[Backend]) -> None:
        self.items = list(items)
        self.cumulative = list(itertools.accumulate(b.config.weight for b in self.items))
        self.total = self.cumulative[-1] if self.cumulative else 0.0

    def choose(self, rng: random.Random) -> Backend:
        point = rng.random() * self.total
        # random() < 1, but the product can round up to `total` (tiny weights): clamp to the last
        return self.items[min(bisect.bisect_right(self.cumulative, point), len(self.items) - 1)]


class WeightedRandom:
    """Weighted random over the lowest priority tier with a positive total weight."""

    def __init__(self, backends: dict[str, list[Backend]], rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._tables: dict[str, _WeightedTable | None] = {
            model: _first_tier(candidates) for model, candidates in backends.items()
        }

    def pick(self, model: str) -> Backend | None:
        table = self._tables.get(model)
        return None if table is None else table.choose(self._rng)

    def __repr__(self) -> str:
        return f"<WeightedRandom models={sorted(self._tables)}>"


def _first_tier(backends: Sequence[Backend]) -> _WeightedTable | None:
    for priority in sorted({b.config.priority for b in backends}):
        table = _WeightedTable([b for b in backends if b.config.priority == priority and b.config.weight > 0])
        if table.total > 0:
            return table
    return None
