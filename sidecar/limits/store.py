"""What a call asks of the limit store, what the store answers, and the store's interface.

One `Ask` carries every rate and budget that applies to one call, so a store decides them all
at once: in one Lua call for Redis, in one synchronous step for memory. Corrections after the
call (`settle`) never make a caller wait. Both stores implement
`LimitStore`; `GuardedStore` puts a breaker and a local fallback around the shared one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.limits.budget import Budget
from sidecar.limits.gcra import Rate


class StoreUnavailable(Exception):
    """The shared store did not answer (refused, timed out, or failed); adapters raise only this."""


def rate_key(org: str, rate: Rate) -> str:
    """The store key of one of an org's rates (the org in braces: a Redis Cluster hash tag)."""
    return f"sidecar:rl:{{{org}}}:{rate.name}"


def budget_key(org: str, budget: Budget) -> str:
    """The store key of one of an org's budgets, in its current window."""
    return f"sidecar:budget:{{{org}}}:{budget.name}:{budget.window.id}"


@dataclass(frozen=True, slots=True)
class Ask:
    org: str                         # every key of one ask carries the org as its hash tag
    rates: tuple[Rate, ...]
    rate_costs: tuple[float, ...]    # units per rate: 1 for requests, estimated tokens for tokens
    budgets: tuple[Budget, ...] = ()
    budget_costs: tuple[int, ...] = ()
    # the store keys of the rates and budgets, when the asker has them at hand (the limits stage
    # keeps them per config and day: no formatting per call); empty: made from the names
    rate_keys: tuple[str, ...] = ()
    budget_keys: tuple[str, ...] = ()

    def rate_key(self, i: int) -> str:
        if self.rate_keys:
            return self.rate_keys[i]
        return rate_key(self.org, self.rates[i])

    def budget_key(self, i: int) -> str:
        if self.budget_keys:
            return self.budget_keys[i]
        return budget_key(self.org, self.budgets[i])

    def keys(self) -> list[str]:
        return [*(self.rate_key(i) for i in range(len(self.rates))),
                *(self.budget_key(i) for i in range(len(self.budgets)))]


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0          # for a rate denial: seconds until the call would be admitted
    denied_by: str = ""               # the denying rate's or budget's name
    over_budget: bool = False         # denied by a budget (else by a rate)
    budget_used: int = 0              # for a budget denial: what its window has consumed
    shadow_denied: tuple[str, ...] = ()
    degraded: bool = False            # decided by the local fallback while the shared store is out
    charged: tuple[float, ...] = ()   # when admitted: the units each rate was charged (capped at its burst)


class LimitStore(Protocol):
    name: str

    async def start(self) -> None:
        """Before the first call: learns what deciding needs (the Redis store: Redis's clock).
        Never fails: a store that does not answer learns it from its first decision instead."""

    async def admit(self, ask: Ask) -> Verdict:
        """Decides every rate and budget of `ask`; an admitted ask is charged, a denied one is not."""

    def settle(self, ask: Ask, rate_deltas: tuple[float, ...], budget_deltas: tuple[int, ...],
               *, degraded: bool = False) -> None:
        """Corrects an admitted ask's charge by the deltas (actual minus reserved; negative refunds).

        Never blocks the caller: the memory store applies it at once, the Redis store within a
        few milliseconds, together with the other corrections of that moment (`flush`).
        `degraded` is the verdict's: a charge the local fallback took is corrected there."""

    async def flush(self) -> None:
        """Applies every correction still waiting (at shutdown, and in tests)."""

    def wall(self) -> float:
        """Now, in epoch seconds, by the clock the store decides on: budget windows are chosen by
        it, so that every sidecar sharing the store charges the same day at the same moment."""

    def component(self) -> dict[str, Any]:
        """Readiness detail: `{"status": "ok" | "degraded", ...}`."""

    async def aclose(self) -> None: ...
