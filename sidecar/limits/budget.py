"""Budgets: spending caps per org over UTC calendar windows, pure arithmetic.

A budget counts one number per window: what calls have consumed, reservations included. A call
reserves its estimate before it is forwarded and is admitted only if every budget still has
room for the whole reservation; afterwards the reservation is corrected to the actual usage
(or released when nothing was served). So concurrent calls can overshoot a budget only by what
their actual usage exceeds their estimates, and never because two of them saw the same room.
Costs are counted in integer micro-units so that the store can add them exactly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sidecar.config import Price

MICROS = 1_000_000
BYTES_PER_TOKEN = 4  # a conservative estimate of input tokens before the backend has counted them


@dataclass(frozen=True, slots=True)
class Window:
    id: str            # "2026-11-25" or "2026-11": part of the store key
    resets_at: float   # epoch seconds of the window's end


def day_window(now: float) -> Window:
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return Window(day.strftime("%Y-%m-%d"), day.timestamp() + 86_400)


def month_window(now: float) -> Window:
    first = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(
        month=first.month + 1)
    return Window(first.strftime("%Y-%m"), following.timestamp())


@dataclass(frozen=True, slots=True)
class Budget:
    name: str          # "org:acme:tokens_per_day"; shown to the caller in QuotaFailure
    limit: int         # tokens, or cost in micro-units
    window: Window
    is_cost: bool = False

    def scaled(self, share: float) -> Budget:
        """This budget cut to `share` of itself (the local fallback's part of a shared budget)."""
        return Budget(self.name, max(1, int(self.limit * share)), self.window, self.is_cost)

    def describe(self, amount: int) -> str:
        return f"{amount / MICROS:.6g}" if self.is_cost else str(amount)


def estimate_tokens(text: str, data: bytes, max_output_tokens: int) -> tuple[int, int]:
    """(input, output) tokens to reserve before the call: input from its size, output from the
    request's max_output_tokens (the model's default when the request sets none)."""
    size = len(text.encode()) + len(data)
    return math.ceil(size / BYTES_PER_TOKEN), max_output_tokens


def cost_micros(price: Price | None, input_tokens: int, output_tokens: int, requests: int = 0) -> int:
    """Cost of a call in micro-units, rounded up so that many small calls cannot cost nothing;
    `requests` (1, or 0 when no backend worked on it) pays the model's `per_request` price."""
    if price is None:
        return 0
    cost = (input_tokens * price.input_per_1k + output_tokens * price.output_per_1k) / 1000 + \
        requests * price.per_request
    return math.ceil(cost * MICROS - 1e-6)


def over_budget(budgets: Sequence[Budget], consumed: Sequence[int], costs: Sequence[int]) -> int | None:
    """Index of the first budget without room for its cost, or None when all have room."""
    for i, (budget, used, cost) in enumerate(zip(budgets, consumed, costs, strict=True)):
        if used + cost > budget.limit:
            return i
    return None
