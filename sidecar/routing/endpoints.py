"""What routing knows of one backend of one model: health, ejection, load. Pure, clock passed in.

Three independent reasons keep a backend from new calls:
1. active health checks failed `unhealthy_threshold` times in a row (until `healthy_threshold`
   passes in a row);
2. passive outlier ejection: `consecutive_failures` real calls failed in a row, so it is ejected
   for `base_ejection × times ejected` (capped), and comes back on its own when that time is up;
3. saturation: `max_in_flight` calls are running on it;
4. an operator drained it (`overrides.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.config import OutlierDetectionConfig
from sidecar.routing.channels import Backend
from sidecar.routing.p2c import PeakEwma


@dataclass(eq=False, slots=True)
class Endpoint:
    backend: Backend
    healthy: bool = True          # by active checks; a backend starts healthy
    check_streak: int = 0         # consecutive checks that disagree with `healthy`
    failures: int = 0             # consecutive failed calls
    ejected_until: float = 0.0
    times_ejected: int = 0
    in_flight: int = 0
    announced: bool = True        # healthy-and-not-ejected as last reported (gauge, readiness)
    override_weight: float | None = None  # an operator's weight, instead of the configured one
    drained: bool = False         # by an operator: no new calls, running ones finish
    latency: PeakEwma = field(default_factory=PeakEwma)  # of answered calls, for p2c_ewma
    retired: bool = False         # a reload removed it: calls still running on it finish, nothing new
    tls_error: str = ""           # the cause of its last failed TLS handshake, until one succeeds
    tags: dict[str, object] = field(default_factory=dict)  # per-endpoint caches (metric children)

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def weight(self) -> float:
        return self.backend.config.weight if self.override_weight is None else self.override_weight

    @property
    def priority(self) -> int:
        return self.backend.config.priority

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def up(self, now: float) -> bool:
        """Healthy and not ejected: what readiness and `api_router_backend_healthy` show."""
        return self.healthy and now >= self.ejected_until

    def routable(self, now: float) -> bool:
        """Healthy, not ejected and not full: may take a new call."""
        limit = self.backend.config.max_in_flight
        return (self.healthy and now >= self.ejected_until and not self.drained
                and (limit is None or self.in_flight < limit))

    def record_check(self, passed: bool, unhealthy_threshold: int, healthy_threshold: int) -> bool:
        """One active check's result; True when it changed `healthy`."""
        if passed == self.healthy:
            self.check_streak = 0
            return False
        self.check_streak += 1
        if self.check_streak >= (healthy_threshold if passed else unhealthy_threshold):
            self.healthy, self.check_streak = passed, 0
            return True
        return False

    def record_success(self, now: float, outlier: OutlierDetectionConfig) -> None:
        self.failures = 0
        if self.times_ejected and now >= self.ejected_until + outlier.base_ejection_ms / 1000.0:
            self.times_ejected = 0  # back for a whole base period without being ejected again

    def record_failure(self, now: float, outlier: OutlierDetectionConfig, may_eject: bool) -> bool:
        """One failed call; True when it ejected the backend. Failures of calls still running
        when it was ejected do not count toward the next ejection."""
        if self.ejected(now):
            return False
        if self.times_ejected and now >= self.ejected_until + outlier.base_ejection_ms / 1000.0:
            self.times_ejected = 0  # back for a whole base period: a new streak starts from scratch
        self.failures += 1
        if self.failures < outlier.consecutive_failures or not may_eject:
            return False
        self.times_ejected += 1
        self.failures = 0
        span = min(outlier.base_ejection_ms * self.times_ejected, outlier.max_ejection_ms) / 1000.0
        self.ejected_until = now + span
        return True

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "unhealthy"
        return f"<Endpoint {self.backend.model}/{self.name} {state} in_flight={self.in_flight}>"


def may_eject(endpoints: list[Endpoint], now: float, max_percent: int) -> bool:
    """Whether one more of a model's backends may be ejected: always the first, then only while
    ejected ones stay within `max_percent` of them."""
    ejected = sum(e.ejected(now) for e in endpoints)
    return ejected == 0 or (ejected + 1) * 100 <= max_percent * len(endpoints)
