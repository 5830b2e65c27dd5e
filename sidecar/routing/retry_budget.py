"""The retry budget: retries may be at most `percent` of recent calls, or `min_per_second`.

Pure with a clock. Counts calls and retries in one-second buckets over a ten-second window, so a
backend outage cannot turn every call into two (a retry storm), while a quiet sidecar can still
retry a few calls.
"""
from __future__ import annotations

from collections.abc import Callable

WINDOW = 10  # seconds


class RetryBudget:
    def __init__(self, percent: float, min_per_second: float, clock: Callable[[], float]) -> None:
        self.percent = percent
        self.min_per_second = min_per_second
        self._clock = clock
        self._calls = [0] * WINDOW
        self._retries = [0] * WINDOW
        self._second = int(clock())

    def _advance(self) -> int:
        second = int(self._clock())
        if second != self._second:
            for s in range(max(self._second + 1, second - WINDOW + 1), second + 1):
                self._calls[s % WINDOW] = self._retries[s % WINDOW] = 0
            self._second = second
        return second % WINDOW

    def record_call(self) -> None:
        self._calls[self._advance()] += 1

    def try_retry(self) -> bool:
        """True (and counted) when one more retry fits the budget."""
        slot = self._advance()
        allowed = max(self.min_per_second * WINDOW, sum(self._calls) * self.percent / 100.0)
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True

    def __repr__(self) -> str:
        return f"<RetryBudget {sum(self._retries)} retries / {sum(self._calls)} calls in {WINDOW}s>"
