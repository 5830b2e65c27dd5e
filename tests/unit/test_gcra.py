"""The GCRA decision: exact waits, all-or-nothing across limits, shadow mode, token costs, the rate bound.

`decide` is pure; the memory store (with a fake clock) is used where state must carry from one
call to the next. The same behaviours against both real stores: tests/integration/test_limit_stores.py.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.limits.gcra import EPSILON, Rate, charged, decide, settled_tat
from sidecar.limits.memory_store import MemoryLimitStore
from sidecar.limits.store import Ask, Verdict


class Clock:
    """A clock the test moves by hand (a plain callable, not a mock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admit(store: MemoryLimitStore, *rates: Rate, costs: tuple[float, ...] | None = None) -> Verdict:
    return store.admit_now(Ask("acme", rates, costs if costs is not None else (1.0,) * len(rates)))


def test_burst_then_one_per_interval() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    rate = Rate("org:acme", per_second=2.0, burst=3)
    assert [admit(store, rate).allowed for _ in range(3)] == [True, True, True]
    denied = admit(store, rate)
    assert (denied.allowed, denied.denied_by) == (False, "org:acme")
    assert denied.retry_after == pytest.approx(0.5, abs=1e-9)
    clock.now += denied.retry_after - 0.001
    assert not admit(store, rate).allowed
    clock.now += 0.001
    assert admit(store, rate).allowed
    # and from then on exactly one per interval (0.5 s)
    for _ in range(5):
        assert not admit(store, rate).allowed
        clock.now += 0.5
        assert admit(store, rate).allowed


def test_decide_from_idle_charges_cost_times_interval() -> None:
    rate = Rate("r", per_second=4.0, burst=10)
    decision = decide([rate], [None], now=50.0)
    assert decision.allowed and decision.retry_after == 0.0
    assert decision.new_tats == (pytest.approx(50.25),)
    # a TAT in the past counts as idle: it never hands out credit
    assert decide([rate], [10.0], now=50.0).new_tats == (pytest.approx(50.25),)


def test_a_denied_decision_changes_nothing() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    rate = Rate("r", per_second=1.0, burst=1)
    assert admit(store, rate).allowed
    key = Ask("acme", (rate,), (1.0,)).rate_key(0)
    tat = store._tats[key]
    for _ in range(5):
        assert not admit(store, rate).allowed
    assert store._tats[key] == tat


def test_a_denial_consumes_nothing_anywhere() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    org, key = Rate("org", 10.0, 100), Rate("key", 1.0, 1)
    assert admit(store, org, key).allowed
    for _ in range(5):
        verdict = admit(store, org, key)
        assert not verdict.allowed and verdict.denied_by == "key"
    # the org limit was not charged for the five denials: 99 more fit in its burst
    assert sum(admit(store, org).allowed for _ in range(100)) == 99


def test_the_longest_wait_is_reported() -> None:
    decision = decide([Rate("a", 1.0, 1), Rate("b", 0.1, 1)], [1001.0, 1010.0], now=1000.0)
    assert not decision.allowed and decision.denied_by == "b"
    assert decision.retry_after == pytest.approx(10.0, abs=1e-9)  # (1010 + 10) - 1000 - 10
    # the order of the rates does not matter
    decision = decide([Rate("b", 0.1, 1), Rate("a", 1.0, 1)], [1010.0, 1001.0], now=1000.0)
    assert decision.denied_by == "b" and decision.retry_after == pytest.approx(10.0, abs=1e-9)


def test_shadow_limits_count_but_never_deny() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    shadow = Rate("shadow", 1.0, 2, shadow=True)
    results = [admit(store, shadow) for _ in range(4)]
    assert all(v.allowed for v in results)
    assert [v.shadow_denied for v in results] == [(), (), ("shadow",), ("shadow",)]
    # a shadow denial is not charged: after one interval exactly one more fits
    clock.now += 1.0
    assert [admit(store, shadow).shadow_denied for _ in range(2)] == [(), ("shadow",)]


def test_a_shadow_denial_does_not_hide_a_real_one() -> None:
    shadow, real = Rate("shadow", 1.0, 1, shadow=True), Rate("real", 1.0, 1)
    decision = decide([shadow, real], [1001.0, 1001.0], now=1000.0)
    assert not decision.allowed and decision.denied_by == "real"
    assert decision.shadow_denied == ("shadow",)


# --- token costs --------------------------------------------------------------------------


def test_charged_is_the_cost_capped_at_the_burst() -> None:
    rate = Rate("tokens", per_second=100.0, burst=1000)
    assert charged(rate, 10.0) == 10.0
    assert charged(rate, 1000.0) == 1000.0
    assert charged(rate, 5000.0) == 1000.0


def test_token_costs_move_the_tat_by_cost_over_rate() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    tokens = Rate("tokens", per_second=100.0, burst=1000)
    assert admit(store, tokens, costs=(600.0,)).allowed
    denied = admit(store, tokens, costs=(600.0,))
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(2.0, abs=1e-9)  # 200 tokens missing at 100/s
    assert admit(store, tokens, costs=(400.0,)).allowed        # exactly fills the burst


def test_a_cost_larger_than_the_burst_is_admitted_from_a_full_bucket_only() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    tokens = Rate("tokens", per_second=100.0, burst=1000)
    assert admit(store, tokens, costs=(5000.0,)).allowed   # charged 1000, not never
    denied = admit(store, tokens, costs=(5000.0,))
    assert not denied.allowed and denied.retry_after == pytest.approx(10.0, abs=1e-9)  # full again after 10 s
    clock.now += 10.0
    assert admit(store, tokens, costs=(5000.0,)).allowed


def test_each_rate_is_charged_its_own_cost() -> None:
    requests, tokens = Rate("requests", 1.0, 10), Rate("tokens", 100.0, 1000)
    decision = decide([requests, tokens], [None, None], now=0.0, costs=[1.0, 250.0])
    assert decision.allowed and decision.new_tats == (pytest.approx(1.0), pytest.approx(2.5))


# --- settling a reservation ---------------------------------------------------------------


def test_settled_tat_refund_never_goes_below_now() -> None:
    rate = Rate("tokens", per_second=10.0, burst=100)
    assert settled_tat(rate, 1005.0, 1000.0, -20.0) == pytest.approx(1003.0)
    assert settled_tat(rate, 1005.0, 1000.0, -1000.0) == 1000.0   # no credit beyond a full bucket
    assert settled_tat(rate, None, 1000.0, -5.0) == 1000.0
    assert settled_tat(rate, 990.0, 1000.0, -5.0) == 1000.0       # an idle bucket is already full


def test_settled_tat_positive_delta_extends() -> None:
    rate = Rate("tokens", per_second=10.0, burst=100)
    assert settled_tat(rate, 1005.0, 1000.0, 30.0) == pytest.approx(1008.0)
    assert settled_tat(rate, None, 1000.0, 30.0) == pytest.approx(1003.0)
    assert settled_tat(rate, 990.0, 1000.0, 30.0) == pytest.approx(1003.0)  # from now, not a past TAT


def test_settle_through_the_memory_store() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    tokens = Rate("tokens", per_second=10.0, burst=100)
    ask = Ask("acme", (tokens,), (80.0,))
    assert store.admit_now(ask).allowed
    assert not store.admit_now(ask).allowed
    store.settle(ask, (-70.0,), ())          # used 10 of the 80 reserved
    assert store.admit_now(ask).allowed            # 10 + 80 fits in 100
    store.settle(ask, (50.0,), ())           # that one used 130
    denied = store.admit_now(Ask("acme", (tokens,), (1.0,)))
    assert not denied.allowed and denied.retry_after == pytest.approx(4.1, abs=1e-9)  # 141 - 100 tokens at 10/s


def test_scaled_rate_keeps_at_least_one_unit_of_burst() -> None:
    rate = Rate("r", per_second=10.0, burst=3, shadow=True)
    half = rate.scaled(0.5)
    assert (half.name, half.per_second, half.burst, half.shadow) == ("r", 5.0, 1.5, True)
    assert rate.scaled(0.1).burst == 1.0


def test_a_fallback_store_starts_with_one_seconds_worth() -> None:
    clock = Clock()
    store = MemoryLimitStore(clock, share=0.5, start_empty=True)
    rate = Rate("r", per_second=10.0, burst=100)        # locally 5/s, burst 50
    verdicts = [admit(store, rate) for _ in range(6)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert verdicts[-1].retry_after == pytest.approx(0.2, abs=1e-9)
    clock.now += 20.0                                  # long idle: then the whole (local) burst
    assert sum(admit(store, rate).allowed for _ in range(60)) == 50


def test_a_full_store_starts_with_the_burst() -> None:
    store = MemoryLimitStore(Clock(), share=0.5)
    assert sum(admit(store, Rate("r", per_second=10.0, burst=100)).allowed for _ in range(60)) == 50


# --- properties ---------------------------------------------------------------------------


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
        admitted += admit(store, rate).allowed
        assert admitted <= burst + per_second * (clock.now - start) + 1e-6


@settings(max_examples=200, deadline=None)
@given(per_second=st.floats(0.1, 100), burst=st.integers(1, 20), calls=st.integers(1, 60))
def test_retry_after_is_exact(per_second: float, burst: int, calls: int) -> None:
    clock = Clock()
    store = MemoryLimitStore(clock)
    rate = Rate("r", per_second, burst)
    denials = 0
    for _ in range(calls):
        verdict = admit(store, rate)
        if not verdict.allowed:
            denials += 1
            wait = verdict.retry_after
            assert wait > 0
            clock.now += wait * 0.999
            assert not admit(store, rate).allowed or wait * 0.001 < EPSILON
            clock.now += wait * 0.001 + 1e-6
            assert admit(store, rate).allowed
    assert denials == max(0, calls - burst)  # no time passes except to wait out a denial


@settings(max_examples=200, deadline=None)
@given(per_second=st.floats(1, 1000), burst=st.integers(1, 2000),
       calls=st.lists(st.tuples(st.floats(0, 2), st.integers(1, 5000)), min_size=1, max_size=100))
def test_token_units_never_exceed_burst_plus_rate_times_elapsed_plus_one_request(
        per_second: float, burst: int, calls: list[tuple[float, int]]) -> None:
    """Each admitted call is settled to its full size (the reservation is capped at the burst),
    so a call larger than the burst overshoots, but never by more than one request's cost."""
    clock = Clock()
    store = MemoryLimitStore(clock)
    tokens = Rate("tokens", per_second, burst)
    start, admitted, charged_units = clock.now, 0.0, 0.0
    largest = max(cost for _, cost in calls)
    slack = EPSILON * per_second * (1 + len(calls))
    for gap, cost in calls:
        clock.now += gap
        ask = Ask("acme", (tokens,), (float(cost),))
        if store.admit_now(ask).allowed:
            reserved = charged(tokens, cost)
            charged_units += reserved
            admitted += cost
            store.settle(ask, (cost - reserved,), ())
        elapsed = clock.now - start
        assert admitted <= burst + per_second * elapsed + largest + slack
        assert charged_units <= burst + per_second * elapsed + slack


def test_bound_is_tight_for_a_steady_stream() -> None:
    """Not only an upper bound: a caller at exactly the rate is never refused."""
    clock = Clock()
    store = MemoryLimitStore(clock)
    rate = Rate("r", per_second=5.0, burst=2)
    for _ in range(100):
        assert admit(store, rate).allowed
        clock.now += 0.2
