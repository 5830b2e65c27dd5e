"""GCRA (generic cell rate algorithm): the rate-limit decision, pure and synchronous.

Each limit is a rate (`per_second`) and a burst. Its whole state is one number, the theoretical
arrival time (TAT): when the bucket would be empty again. A request of `cost` units moves the
TAT forward by `cost / per_second`; it is admitted when the new TAT is at most `burst /
per_second` ahead of now. The same function serves the memory store and (as the Lua script's
reference) the Redis store, so both decide alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rate:
    name: str            # e.g. "org:acme:requests_per_minute"; shown to the caller and in metrics
    per_second: float    # sustained rate
    burst: float         # units admitted at once from an idle start
    shadow: bool = False # counts, never denies

    @property
    def interval(self) -> float:
        return 1.0 / self.per_second


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after: float           # seconds until the request would be admitted (0 when allowed)
    denied_by: str = ""          # name of the (first) enforcing limit that denied
    shadow_denied: tuple[str, ...] = ()
    new_tats: tuple[float, ...] = ()  # the state to store, one per rate (only when allowed)


def decide(rates: Sequence[Rate], tats: Sequence[float | None], now: float, cost: float = 1.0) -> Decision:
    """All of a request's limits at once: admitted only if every enforcing limit admits it.

    `tats` holds each rate's stored TAT (None = never used). A denied request changes nothing;
    an admitted one moves every rate's TAT, shadow ones included.
    """
    new_tats: list[float] = []
    worst_wait, denied_by, shadow_denied = 0.0, "", []
    for rate, tat in zip(rates, tats, strict=True):
        start = now if tat is None or tat < now else tat
        new_tat = start + cost * rate.interval
        wait = new_tat - now - rate.burst * rate.interval
        if wait > 1e-9:
            if rate.shadow:
                shadow_denied.append(rate.name)
                new_tat = start  # a shadow denial counts as a denial would: nothing consumed
            elif wait > worst_wait:
                worst_wait, denied_by = wait, rate.name
        new_tats.append(new_tat)
    if denied_by:
        return Decision(False, worst_wait, denied_by, tuple(shadow_denied))
    return Decision(True, 0.0, "", tuple(shadow_denied), tuple(new_tats))
