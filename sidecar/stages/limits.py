"""RateLimit: every request limit that applies to the caller, decided in one step.

Runs after authentication (the org and key id are known) and before routing, so a throttled
call never takes a backend. Denial: RESOURCE_EXHAUSTED / RATE_LIMIT_EXCEEDED with `RetryInfo`
set to the real wait, and the limit's name in `ErrorInfo.metadata`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from sidecar.call import Call
from sidecar.config import Config, LimitRule, LimitsConfig, PerConfig
from sidecar.errors import SidecarError
from sidecar.limits.gcra import Rate
from sidecar.limits.memory_store import MemoryLimitStore
from sidecar.telemetry.metrics import RATE_LIMIT_DENIALS, RATE_LIMIT_SHADOW_DENIALS

log = logging.getLogger("sidecar.limits")


def request_rate(name: str, rule: LimitRule) -> Rate:
    burst = rule.burst if rule.burst is not None else rule.requests_per_minute  # one minute's amount
    return Rate(name, rule.requests_per_minute / 60.0, float(burst), rule.shadow)


class RateTable:
    """The `Rate`s of one config, by org and by key id."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.orgs = {org: request_rate(f"org:{org}:requests_per_minute", rule) for org, rule in limits.orgs.items()}
        self.keys = {key: request_rate(f"key:{key}:requests_per_minute", rule)
                     for key, rule in limits.api_keys.items()}

    def rates_for(self, org: str, key_id: str) -> list[Rate]:
        return [r for r in (self.orgs.get(org), self.keys.get(key_id)) if r is not None]


class RateLimit:
    def __init__(self, config: Callable[[], Config], store: MemoryLimitStore) -> None:
        self._config = config
        self._store = store
        self._rates = PerConfig(RateTable)

    async def __call__(self, call: Call) -> None:
        rates = self._rates.get(self._config().limits).rates_for(call.org, call.api_key_id)
        if not rates:
            return
        decision = await self._store.acquire(rates)
        for name in decision.shadow_denied:
            RATE_LIMIT_SHADOW_DENIALS.labels(call.org, name).inc()
            log.info("shadow limit would deny", extra={"request_id": call.request_id, "limit": name,
                                                       "org": call.org, "api_key_id": call.api_key_id})
        if not decision.allowed:
            RATE_LIMIT_DENIALS.labels(call.org, decision.denied_by).inc()
            raise rate_limited(decision.denied_by, decision.retry_after)


def rate_limited(limit: str, retry_after: float) -> SidecarError:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1_000_000, int(retry_after * 1e9)))  # at least 1 ms
    return SidecarError("RATE_LIMIT_EXCEEDED", f"rate limit {limit} exceeded; retry in {retry_after:.3f}s",
                        metadata={"limit": limit}, details=[error_details_pb2.RetryInfo(retry_delay=delay)])
