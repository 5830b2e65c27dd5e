"""A call's reservation: what the limit store charged ahead for it, beyond its request count.

Made by the `Limits` stage when the store admits a call whose token rates or budgets need
correcting afterwards; settled by `Limits.finish`, the one path that settles it, which runs
once for every call however it ended (see `server.CallScope`). A reservation the store made
but whose verdict never reached the call (cancelled or timed out while waiting) is the
store's own to release (`redis_store.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

from sidecar.limits.store import Ask


@dataclass(frozen=True, slots=True)
class Reservation:
    ask: Ask
    degraded: bool               # charged by the local fallback: settled there
    charged: tuple[float, ...]   # units each rate was charged (by the store that decided)
