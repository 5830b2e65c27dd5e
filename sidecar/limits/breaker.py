"""A circuit breaker for the shared limit store, pure: a clock in, a state out.

Closed: calls go to the store. After `failures` consecutive errors it opens: calls skip the
store (no call waits out a timeout on a dead Redis) until a probe finds it answering again,
which closes the breaker. The guard probes every `cooldown` seconds while it is open.
"""
from __future__ import annotations

from collections.abc import Callable


class Breaker:
    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float]) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self.failures = 0
        self.opened_at: float | None = None

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def record_failure(self) -> bool:
        """Counts one store error; True when this one opened the breaker."""
        self.failures += 1
        if self.opened_at is None and self.failures >= self.threshold:
            self.opened_at = self._clock()
            return True
        return False

    def record_success(self) -> bool:
        """The store answered; True when this closed an open breaker."""
        self.failures = 0
        was_open, self.opened_at = self.opened_at is not None, None
        return was_open

    def __repr__(self) -> str:
        return f"<Breaker {'open' if self.open else 'closed'} failures={self.failures}/{self.threshold}>"
