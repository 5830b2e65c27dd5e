"""Power of two choices over peak-EWMA latency (as in Finagle and Linkerd): pure, clock and rng passed in.

Each call draws two distinct backends at random (by weight) and sends to the cheaper, where cost
is `latency estimate x (calls in flight + 1)`. Comparing two instead of all keeps the choice
cheap and stops every replica herding onto the same momentarily-best backend, yet a slow or
overloaded backend loses nearly every comparison it is drawn into.

The estimate is a peak EWMA: a slower sample replaces it at once (a backend that starts to
struggle is avoided on its next reply), a faster one only pulls it down with time constant `tau`
(one lucky reply does not make a slow backend look fast).
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

DEFAULT_RTT = 0.05  # seconds: what `score` assumes of a backend with no estimate yet


class PeakEwma:
    """A backend's latency estimate: jumps up to a slower sample at once, decays toward faster
    ones with time constant `tau` seconds."""

    def __init__(self, tau: float = 10.0, initial: float = 0.0) -> None:
        if not tau > 0:
            raise ValueError(f"tau must be positive, not {tau}")
        self.tau = tau
        self._current = initial
        self._stamp: float | None = None  # when the last sample arrived; None before the first

    def observe(self, rtt: float, now: float) -> None:
        """One measured latency (seconds). The first sample replaces `initial` (a measurement
        beats a guess); after that, with w = exp(-elapsed / tau) and elapsed the time since the
        previous sample (0 if the clock went back): current = rtt if rtt > current, else
        current * w + rtt * (1 - w)."""
        if self._stamp is None or rtt > self._current:
            self._current = rtt
        else:
            w = math.exp(-max(now - self._stamp, 0.0) / self.tau)
            self._current = self._current * w + rtt * (1.0 - w)
        self._stamp = now

    def value(self, now: float) -> float:
        """The estimate at `now`: `initial` before any sample; after one, the estimate as of the
        last sample, decayed toward zero with `tau` while no sample arrives (Finagle and tower
        do the same on every read). Without that, a backend that was slow once and is then never
        picked would keep its old estimate, and never be tried again while load is low. Reading
        changes nothing: the next `observe` still starts from the undecayed estimate."""
        if self._stamp is None:
            return self._current
        return self._current * math.exp(-max(now - self._stamp, 0.0) / self.tau)

    def __repr__(self) -> str:
        return f"<PeakEwma {self._current:.6g}s tau={self.tau:g}>"


def score(ewma: PeakEwma, in_flight: int, now: float, default: float = DEFAULT_RTT) -> float:
    """The cost `pick_two` compares: latency estimate x (in_flight + 1), lower is better.

    A backend with no estimate yet (value 0: never measured, or decayed to nothing) is assumed to
    take `default` seconds, so it is tried early (and so measured) while in_flight still counts
    against it: it does not take every call until its first reply. Pass a larger default (e.g.
    the mean of the other backends' values) when calls last much longer than DEFAULT_RTT.
    """
    latency = ewma.value(now)
    return (latency if latency > 0 else default) * (in_flight + 1)


def pick_two(candidates: Sequence[T], weight: Callable[[T], float], cost: Callable[[T], float],
             rng: random.Random) -> T:
    """Draws two distinct candidates at random, each with probability proportional to its weight,
    and returns the one with the lower cost (ties: the first drawn). One candidate: that one.

    `cost` is called once for each of the two drawn, never for the others; `rng` is the only
    randomness. Weights must be finite and non-negative: a zero-weight candidate is never drawn
    (when only one has weight, that one is returned). ValueError with no candidates or no weight.
    """
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError("pick_two needs at least one candidate")
    weights = [float(weight(c)) for c in candidates]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
    first = _draw(weights, -1, rng)
    if not any(w for i, w in enumerate(weights) if i != first):
        return candidates[first]
    second = _draw(weights, first, rng)
    a, b = candidates[first], candidates[second]
    return a if cost(a) <= cost(b) else b


def _draw(weights: list[float], skip: int, rng: random.Random) -> int:
    """Index of a weighted random draw among positive weights, leaving out index `skip`."""
    point = rng.random() * sum(w for i, w in enumerate(weights) if i != skip)
    last = -1
    for i, w in enumerate(weights):
        if i == skip or w <= 0:
            continue
        last, point = i, point - w
        if point < 0:
            return i
    return last  # random() * total can round up to total with tiny weights
