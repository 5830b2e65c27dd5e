"""Peak EWMA and power of two choices: exact estimates, the two-draw rule, statistics under a seeded rng."""
from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.routing.p2c import DEFAULT_RTT, PeakEwma, pick_two, score

# --- PeakEwma ----------------------------------------------------------------------------------

def test_a_slower_sample_raises_the_value_at_once() -> None:
    ewma = PeakEwma(tau=10.0)
    ewma.observe(0.1, 100.0)
    ewma.observe(0.5, 100.001)
    assert ewma.value(100.001) == 0.5


def test_faster_samples_pull_it_down_with_tau() -> None:
    ewma = PeakEwma(tau=10.0)
    ewma.observe(1.0, 100.0)
    ewma.observe(0.2, 105.0)                  # w = exp(-5 / 10)
    assert ewma.value(105.0) == pytest.approx(0.6852245277701068, rel=1e-12)
    assert ewma.value(105.0) == pytest.approx(1.0 * math.exp(-0.5) + 0.2 * (1 - math.exp(-0.5)), rel=1e-12)
    ewma.observe(0.2, 115.0)                  # w = exp(-10 / 10), from the estimate above
    assert ewma.value(115.0) == pytest.approx(0.3785041281187439, rel=1e-12)


def test_a_longer_tau_forgets_more_slowly() -> None:
    quick, slow = PeakEwma(tau=5.0), PeakEwma(tau=20.0)
    for ewma in (quick, slow):
        ewma.observe(1.0, 0.0)
        ewma.observe(0.2, 5.0)
    assert quick.value(5.0) == pytest.approx(1.0 * math.exp(-1) + 0.2 * (1 - math.exp(-1)))
    assert slow.value(5.0) == pytest.approx(1.0 * math.exp(-0.25) + 0.2 * (1 - math.exp(-0.25)))
    assert quick.value(5.0) < slow.value(5.0)


def test_steady_fast_samples_converge_from_above() -> None:
    ewma = PeakEwma(tau=10.0)
    ewma.observe(1.0, 0.0)
    values = []
    for second in range(1, 101):
        ewma.observe(0.2, float(second))
        values.append(ewma.value(float(second)))
    assert all(a > b > 0.2 for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(0.2 + 0.8 * math.exp(-10), rel=1e-9)


def test_value_decays_toward_zero_while_idle_and_reading_changes_nothing() -> None:
    ewma = PeakEwma(tau=10.0)
    ewma.observe(1.0, 0.0)
    assert ewma.value(0.0) == 1.0
    assert ewma.value(10.0) == pytest.approx(math.exp(-1))
    assert ewma.value(10.0) == pytest.approx(math.exp(-1))
    ewma.observe(0.5, 10.0)                   # from the stored 1.0, not the decayed 0.37
    assert ewma.value(10.0) == pytest.approx(math.exp(-1) + 0.5 * (1 - math.exp(-1)))


def test_the_first_sample_replaces_the_initial_guess() -> None:
    ewma = PeakEwma(initial=2.0)
    assert ewma.value(0.0) == ewma.value(1000.0) == 2.0   # a guess does not decay
    ewma.observe(0.3, 5.0)
    assert ewma.value(5.0) == 0.3
    assert PeakEwma().value(0.0) == 0.0


def test_a_clock_going_back_counts_as_no_time() -> None:
    ewma = PeakEwma(tau=10.0)
    ewma.observe(1.0, 10.0)
    ewma.observe(0.2, 5.0)                    # w = exp(0) = 1: the faster sample moves nothing
    assert ewma.value(5.0) == 1.0


def test_tau_must_be_positive() -> None:
    for tau in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="tau"):
            PeakEwma(tau=tau)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 60), st.floats(0, 30)), min_size=1, max_size=20))
def test_never_below_the_latest_sample_nor_above_the_slowest(samples: list[tuple[float, float]]) -> None:
    ewma, now = PeakEwma(tau=10.0, initial=99.0), 0.0
    for rtt, gap in samples:
        now += gap
        ewma.observe(rtt, now)
        slack = 1e-12 * max(rtt, 1.0)              # the blend of two equal values may round by an ulp
        assert rtt - slack <= ewma.value(now) <= max(r for r, _ in samples) + slack


def test_repr_is_readable() -> None:
    ewma = PeakEwma(tau=5.0)
    ewma.observe(0.25, 0.0)
    assert repr(ewma) == "<PeakEwma 0.25s tau=5>"


# --- score -------------------------------------------------------------------------------------

def test_score_is_latency_times_in_flight_plus_one() -> None:
    ewma = PeakEwma()
    ewma.observe(0.4, 0.0)
    assert score(ewma, 0, 0.0) == 0.4
    assert score(ewma, 3, 0.0) == pytest.approx(1.6)


def test_an_unseen_backend_is_tried_early_but_in_flight_still_counts() -> None:
    unseen, seen = PeakEwma(), PeakEwma()
    seen.observe(0.5, 0.0)
    assert score(unseen, 0, 0.0) == DEFAULT_RTT
    assert score(unseen, 4, 0.0) == pytest.approx(5 * DEFAULT_RTT)
    assert score(unseen, 0, 0.0) < score(unseen, 1, 0.0)          # not 0 x anything
    assert score(unseen, 0, 0.0) < score(seen, 0, 0.0)            # probed before a measured 0.5 s ...
    assert score(unseen, 20, 0.0) > score(seen, 0, 0.0)           # ... but not flooded
    assert score(unseen, 2, 0.0, default=1.0) == 3.0


# --- pick_two ----------------------------------------------------------------------------------

def picks(n: int, weights: dict[str, float], costs: dict[str, float], seed: int = 7) -> Counter[str]:
    rng, names = random.Random(seed), list(weights)
    return Counter(pick_two(names, weights.__getitem__, costs.__getitem__, rng) for _ in range(n))


def within(count: int, n: int, p: float) -> bool:
    """`count` of `n` is within 4 standard deviations of a binomial(n, p)."""
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_with_two_candidates_both_are_drawn_so_the_cheaper_always_wins() -> None:
    # draws are distinct: were they not, the heavy, costly one would be drawn twice ~98 % of the time
    assert picks(1000, {"cheap": 1.0, "costly": 100.0}, {"cheap": 1.0, "costly": 2.0}) == Counter(cheap=1000)


def test_a_costlier_backend_gets_less_than_its_fair_share() -> None:
    n = 12_000
    split = picks(n, dict.fromkeys("abcd", 1.0), {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    # of the 6 equally likely pairs, a wins 3, b 2, c 1 and d none: fair would be 1/4 each
    assert within(split["a"], n, 3 / 6) and within(split["b"], n, 2 / 6) and within(split["c"], n, 1 / 6)
    assert split["d"] == 0


def test_with_equal_costs_picks_follow_the_weights() -> None:
    n, weights = 20_000, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    split = picks(n, weights, dict.fromkeys(weights, 1.0))    # ties: the first drawn, drawn by weight
    assert all(within(split[name], n, w / 10) for name, w in weights.items()), split


def test_the_second_draw_is_by_weight_among_the_rest() -> None:
    weights, calls, rng = [1.0, 2.0, 3.0, 4.0], list[int](), random.Random(11)

    def cost(i: int) -> float:
        calls.append(i)                       # called for the two drawn, in the order drawn
        return 0.0

    for _ in range(20_000):
        pick_two(range(4), weights.__getitem__, cost, rng)
    after_d = Counter(second for first, second in zip(calls[::2], calls[1::2], strict=True) if first == 3)
    total = sum(after_d.values())
    assert within(total, 20_000, 4 / 10)
    assert all(within(after_d[i], total, weights[i] / 6) for i in range(3)), after_d


def test_a_zero_weight_candidate_is_never_drawn() -> None:
    assert set(picks(2000, {"a": 1.0, "b": 0.0, "c": 1.0}, {"a": 2.0, "b": 0.0, "c": 1.0})) == {"c"}
    assert set(picks(100, {"a": 0.0, "b": 5.0}, {"a": 0.0, "b": 1.0})) == {"b"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.integers(0, 3)), min_size=2, max_size=8), st.integers())
def test_returns_the_cheaper_of_the_two_drawn_ties_to_the_first(
        specs: list[tuple[float, int]], seed: int) -> None:
    calls: list[int] = []

    def cost(i: int) -> float:
        calls.append(i)
        return specs[i][1]

    positive = [i for i, (w, _) in enumerate(specs) if w > 0]
    if not positive:
        with pytest.raises(ValueError, match="weights"):
            pick_two(range(len(specs)), lambda i: specs[i][0], cost, random.Random(seed))
        return
    picked = pick_two(range(len(specs)), lambda i: specs[i][0], cost, random.Random(seed))
    if len(positive) == 1:
        assert (picked, calls) == (positive[0], [])
        return
    assert len(calls) == 2 and calls[0] != calls[1] and set(calls) <= set(positive)
    first, second = calls
    assert picked == (first if specs[first][1] <= specs[second][1] else second)


def test_one_candidate_is_returned_without_drawing() -> None:
    rng = random.Random(3)
    state = rng.getstate()
    assert pick_two(["only"], lambda _: 0.0, lambda _: math.inf, rng) == "only"
    assert rng.getstate() == state


def test_bad_input_is_refused() -> None:
    rng = random.Random(3)
    with pytest.raises(ValueError, match="at least one"):
        pick_two([], lambda _: 1.0, lambda _: 1.0, rng)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="weights"):
            pick_two(["a", "b"], {"a": bad, "b": 1.0}.__getitem__, lambda _: 1.0, rng)


def test_only_the_given_rng_is_used() -> None:
    weights, costs = dict.fromkeys("abcd", 1.0), {"a": 1.0, "b": 1.0, "c": 2.0, "d": 2.0}
    global_state = random.getstate()
    runs = []
    for _ in range(2):
        rng = random.Random(42)
        runs.append([pick_two(list("abcd"), weights.__getitem__, costs.__getitem__, rng) for _ in range(200)])
        random.seed()                         # reseeding the global rng changes nothing
    random.setstate(global_state)             # leave the global rng as other tests found it
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


# --- together: a slow backend under steady traffic ---------------------------------------------

def simulate(rtts: dict[str, float], calls: int, gap: float, seed: int) -> Counter[str]:
    """Calls every `gap` seconds, each finishing after its backend's fixed rtt and then observed."""
    rng = random.Random(seed)
    ewma = {name: PeakEwma(tau=10.0) for name in rtts}
    in_flight, done, split = dict.fromkeys(rtts, 0), list[tuple[float, str]](), Counter[str]()
    for i in range(calls):
        now = i * gap
        while done and done[0][0] <= now:
            at, name = heapq.heappop(done)
            in_flight[name] -= 1
            ewma[name].observe(rtts[name], at)
        scores = {n: score(ewma[n], in_flight[n], now) for n in rtts}
        name = pick_two(list(rtts), lambda _: 1.0, scores.__getitem__, rng)
        split[name] += 1
        in_flight[name] += 1
        heapq.heappush(done, (now + rtts[name], name))
    return split


def test_a_five_times_slower_backend_gets_far_less_than_its_quarter() -> None:
    split = simulate({"a": 0.1, "b": 0.1, "c": 0.1, "slow": 0.5}, calls=5000, gap=0.02, seed=1)
    assert 0 < split["slow"] < 0.05 * 5000                        # fair would be 1250
    assert all(within(split[n], 5000 - split["slow"], 1 / 3) for n in "abc"), split


def test_a_backend_avoided_after_one_slow_reply_is_tried_again_once_idle() -> None:
    fast, once_slow = PeakEwma(tau=10.0), PeakEwma(tau=10.0)
    once_slow.observe(5.0, 0.0)
    for second in range(61):                  # the fast one keeps serving and being measured ...
        fast.observe(0.1, float(second))
        if second == 1:
            assert score(once_slow, 0, 1.0) > score(fast, 0, 1.0) * 10
    # ... the other loses every comparison, so gets no sample: its estimate fades until it wins one
    assert score(once_slow, 0, 60.0) < score(fast, 0, 60.0)
