"""Backend choice: pure and synchronous, given the endpoints, the time and a `random.Random`.

Within the lowest priority tier that has a routable backend (healthy, not ejected, not
drained, not full) with positive weight: weighted random, or for `p2c_ewma` models the better
of two weighted draws by peak-EWMA latency x (in flight + 1). Tiers are only a fallback: while
any backend of tier 0 can take a call, tier 1 gets nothing. `exclude` leaves out backends a
call already tried.
"""
from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from sidecar.routing.endpoints import Endpoint
from sidecar.routing.p2c import DEFAULT_RTT, pick_two, score


class WeightedRandom:
    def __init__(self, endpoints: dict[str, list[Endpoint]], rng: random.Random | None = None,
                 p2c_models: Collection[str] = ()) -> None:
        self._rng = rng or random.Random()
        self._p2c = frozenset(p2c_models)
        # each model's endpoints grouped by priority, lowest first
        self._tiers: dict[str, list[list[Endpoint]]] = {
            model: [[e for e in group if e.priority == p] for p in sorted({e.priority for e in group})]
            for model, group in endpoints.items()
        }

    def pick(self, model: str, now: float, exclude: Collection[Endpoint] = ()) -> tuple[Endpoint, int] | None:
        """The endpoint for the next call of `model` and the index of its tier (0 = primary)."""
        index, candidates = self.candidates(model, now, exclude)
        if not candidates:
            return None
        if model in self._p2c:
            # a backend not measured yet is assumed as fast as the best measured one: it gets
            # tried, then judged on its own replies
            known = [v for e in candidates if (v := e.latency.value(now)) > 0]
            unknown = min(known) if known else DEFAULT_RTT
            return pick_two(candidates, _weight, lambda e: score(e.latency, e.in_flight, now, unknown),
                            self._rng), index
        return choose(candidates, self._rng), index

    def candidates(self, model: str, now: float, exclude: Collection[Endpoint] = ()) -> tuple[int, list[Endpoint]]:
        """The routable endpoints of the first tier that has any, and that tier's index."""
        for index, tier in enumerate(self._tiers.get(model, ())):
            candidates = [e for e in tier if e.weight > 0 and e.routable(now) and e not in exclude]
            if candidates:
                return index, candidates
        return 0, []

    def __repr__(self) -> str:
        return f"<WeightedRandom models={sorted(self._tiers)}>"


def _weight(endpoint: Endpoint) -> float:
    return endpoint.weight


def choose(candidates: Sequence[Endpoint], rng: random.Random) -> Endpoint:
    """Weighted random choice; weights are positive."""
    point = rng.random() * sum(e.weight for e in candidates)
    for endpoint in candidates:
        point -= endpoint.weight
        if point < 0:
            return endpoint
    return candidates[-1]  # random() * total can round up to total with tiny weights
