"""GCRA (generic cell rate algorithm): the rate-limit decision, pure and synchronous.

Each limit is a rate (`per_second`) and a burst. Its whole state is one number, the theoretical
arrival time (TAT): when the bucket would be empty again. A request costing `cost` units (1 for
a request rate, the estimated tokens for a token rate) moves the TAT forward by
`cost / per_second`; it is admitted when the new TAT is at most `burst / per_second` ahead of
now. The memory store calls these functions; the Redis store's Lua script is their line-by-line
twin (`redis_store.py`), so both stores decide alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EPSILON = 1e-6  # one microsecond: the resolution of the Redis store's clock


@dataclass(frozen=True, slots=True)
class Rate:
    name: str            # e.g. "org:acme:requests_per_minute"; shown to the caller and in metrics
    per_second: float    # sustained rate
    burst: float         # units admitted at once from an idle start
    shadow: bool = False # counts, never denies
    tokens: bool = False # a token rate: charged an estimate, settled to the usage

    @property
    def interval(self) -> float:
        return 1.0 / self.per_second

    def scaled(self, share: float) -> Rate:
        """This rate cut to `share` of itself (the local fallback's part of a shared limit)."""
        return Rate(self.name, self.per_second * share, max(1.0, self.burst * share), self.shadow, self.tokens)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after: float           # seconds until the request would be admitted (0 when allowed)
    denied_by: str = ""          # name of the (first) enforcing limit that denied
    shadow_denied: tuple[str, ...] = ()
    new_tats: tuple[float, ...] = ()  # the state to store, one per rate


def charged(rate: Rate, cost: float) -> float:
    """What a request is charged: at most the burst, so that one larger than the burst is
    admitted from a full bucket (and its real size settled afterwards) instead of never."""
    return min(cost, rate.burst)


def decide(rates: Sequence[Rate], tats: Sequence[float | None], now: float,
           costs: Sequence[float] | None = None) -> Decision:
    """All of a request's limits at once: admitted only if every enforcing limit admits it.

    `tats` holds each rate's stored TAT (None = never used); `costs` each rate's units (1 by
    default). A denied request changes nothing; an admitted one moves every rate's TAT, shadow
    ones included, except a shadow rate that would deny (it counts as that denial).
    """
    new_tats: list[float] = []
    worst_wait, denied_by, shadow_denied = 0.0, "", []
    for i, (rate, tat) in enumerate(zip(rates, tats, strict=True)):
        cost = charged(rate, 1.0 if costs is None else costs[i])
        start = now if tat is None or tat < now else tat
        new_tat = start + cost * rate.interval
        wait = new_tat - now - rate.burst * rate.interval
        if wait > EPSILON:
            if rate.shadow:
                shadow_denied.append(rate.name)
                new_tat = start
            elif wait > worst_wait:
                worst_wait, denied_by = wait, rate.name
        new_tats.append(new_tat)
    if denied_by:
        return Decision(False, worst_wait, denied_by, tuple(shadow_denied), tuple(new_tats))
    return Decision(True, 0.0, "", tuple(shadow_denied), tuple(new_tats))


def settled_tat(rate: Rate, tat: float | None, now: float, delta: float) -> float:
    """The TAT after correcting a reservation by `delta` units (actual minus reserved).

    A refund never takes the TAT below now: an idle bucket is full and cannot hold credit.
    """
    start = now if tat is None or tat < now else tat
    return max(now, start + delta * rate.interval)
