"""The GCRA decision: exact waits, all-or-nothing across limits, shadow mode, the rate bound."""
from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.limits.gcra import Rate, decide
from sidecar.limits.memory_store import MemoryLimitStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def acquire(store: MemoryLimitStore, *rates: Rate) -> tuple[bool, float, str]:
    decision = asyncio.run(store.acquire(rates))
    return decision.allowed, decision.retry_after, decision.denied_by


def test_burst_then_one_per_interval() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    rate = Rate("org:acme", per_second=2.0, burst=3)
    assert [acquire(store, rate)[0] for _ in range(3)] == [True, True, True]
    allowed, wait, by = acquire(store, rate)
    assert (allowed, by) == (False, "org:acme") and abs(wait - 0.5) < 1e-9
    clock.now += wait - 0.001
    assert not acquire(store, rate)[0]
    clock.now += 0.001
    assert acquire(store, rate)[0]


def test_a_denial_consumes_nothing_anywhere() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    org, key = Rate("org", 10.0, 100), Rate("key", 1.0, 1)
    assert acquire(store, org, key)[0]
    for _ in range(5):
        allowed, _, by = acquire(store, org, key)
        assert not allowed and by == "key"
    # the org limit was not charged for the five denials: 99 more fit in its burst
    assert sum(acquire(store, org)[0] for _ in range(100)) == 99


def test_the_longest_wait_is_reported() -> None:
    decision = decide([Rate("a", 1.0, 1), Rate("b", 0.1, 1)], [1001.0, 1010.0], now=1000.0)
    assert not decision.allowed and decision.denied_by == "b" and abs(decision.retry_after - 10.0) < 1e-9  # (1010 + 10) - 1000 - 10


def test_shadow_limits_count_but_never_deny() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    shadow = Rate("shadow", 1.0, 2, shadow=True)
    results = [asyncio.run(store.acquire([shadow])) for _ in range(4)]
    assert all(d.allowed for d in results)
    assert [d.shadow_denied for d in results] == [(), (), ("shadow",), ("shadow",)]


@settings(max_examples=200, deadline=None)
@given(per_second=st.floats(0.1, 100), burst=st.integers(1, 50),
       gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=300))
def test_never_more_than_burst_plus_rate_times_elapsed(per_second: float, burst: int, gaps: list[float]) -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    rate = Rate("r", per_second, burst)
    start, admitted = clock.now, 0
    for gap in gaps:
        clock.now += gap
        admitted += acquire(store, rate)[0]
        assert admitted <= burst + per_second * (clock.now - start) + 1e-6


@settings(max_examples=200, deadline=None)
@given(per_second=st.floats(0.1, 100), burst=st.integers(1, 20), calls=st.integers(1, 60))
def test_retry_after_is_exact(per_second: float, burst: int, calls: int) -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    rate = Rate("r", per_second, burst)
    for _ in range(calls):
        allowed, wait, _ = acquire(store, rate)
        if not allowed:
            clock.now += wait * 0.999
            assert not acquire(store, rate)[0] or wait * 0.001 < 1e-6
            clock.now += wait * 0.001 + 1e-6
            assert acquire(store, rate)[0]
