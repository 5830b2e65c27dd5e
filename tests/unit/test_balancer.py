"""Weighted choice within the lowest priority tier: pure, seeded, checked statistically."""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.config import BackendConfig
from sidecar.routing.balancer import WeightedRandom
from sidecar.routing.channels import Backend
from sidecar.routing.endpoints import Endpoint


class NoChannel:
    """The balancer never touches channels; Backend only asks for its two method callables."""

    def unary_unary(self, method: str) -> None:
        return None

    def unary_stream(self, method: str) -> None:
        return None


def backends(*specs: tuple[str, float, int]) -> list[Endpoint]:
    return [Endpoint(Backend("chat", BackendConfig(name=n, address=f"127.0.0.1:{6000 + i}", weight=w, priority=p),
                             NoChannel()))  # type: ignore[arg-type]
            for i, (n, w, p) in enumerate(specs)]


NOW = 1000.0


def split(balancer: WeightedRandom, n: int) -> Counter[str]:
    picks = Counter[str]()
    for _ in range(n):
        picked = balancer.pick("chat", NOW)
        assert picked is not None
        picks[picked[0].name] += 1
    return picks


def test_split_follows_weights() -> None:
    balancer = WeightedRandom({"chat": backends(("a", 3, 0), ("b", 1, 0))}, random.Random(7))
    picks = split(balancer, 20_000)
    # 3:1 -> 15,000 expected for a; 4 sigma of a binomial(20000, .75) is about 245
    assert abs(picks["a"] - 15_000) < 245


def test_only_the_lowest_tier_with_weight_is_used() -> None:
    balancer = WeightedRandom({"chat": backends(("a", 1, 0), ("b", 1, 0), ("failover", 5, 1))}, random.Random(1))
    assert set(split(balancer, 1000)) == {"a", "b"}


def test_a_tier_with_zero_weight_falls_through_to_the_next() -> None:
    balancer = WeightedRandom({"chat": backends(("a", 0, 0), ("failover", 1, 1))}, random.Random(1))
    assert set(split(balancer, 100)) == {"failover"}


def test_no_weight_anywhere_means_no_backend() -> None:
    balancer = WeightedRandom({"chat": backends(("a", 0, 0))}, random.Random(1))
    assert balancer.pick("chat", NOW) is None
    assert balancer.pick("unknown", NOW) is None


@settings(max_examples=200, deadline=None)
@example([(5e-324, 0)], 0)  # found by Hypothesis: random() * total rounded up to total
@given(st.lists(st.tuples(st.floats(0, 100), st.integers(0, 3)), min_size=1, max_size=8), st.integers())
def test_pick_is_always_from_the_first_tier_with_positive_weight(
        specs: list[tuple[float, int]], seed: int) -> None:
    pool = backends(*((f"b{i}", w, p) for i, (w, p) in enumerate(specs)))
    balancer = WeightedRandom({"chat": pool}, random.Random(seed))
    tiers = sorted({p for w, p in specs if w > 0})
    picked = balancer.pick("chat", NOW)
    if not tiers:
        assert picked is None
    else:
        assert picked is not None and picked[0].priority == tiers[0] and picked[0].weight > 0
        assert picked[1] == sorted({p for _, p in specs}).index(tiers[0])


def test_repr_is_readable() -> None:
    assert repr(backends(("a", 2, 0))[0].backend) == "<Backend chat/a 127.0.0.1:6000 w=2>"
    assert repr(WeightedRandom({"chat": []})) == "<WeightedRandom models=['chat']>"


# --- routability: unhealthy, ejected and full endpoints are skipped ---------------------------

def unhealthy(endpoint: Endpoint) -> None:
    while endpoint.healthy:
        endpoint.record_check(False, 1, 1)


def ejected(endpoint: Endpoint) -> None:
    endpoint.ejected_until = NOW + 30.0


def full(endpoint: Endpoint) -> None:
    endpoint.backend.config = endpoint.backend.config.model_copy(update={"max_in_flight": 1})
    endpoint.in_flight = 1


@pytest.mark.parametrize("make_unroutable", [unhealthy, ejected, full])
def test_an_unroutable_endpoint_is_skipped(make_unroutable: Callable[[Endpoint], None]) -> None:
    pool = backends(("a", 1, 0), ("b", 1, 0), ("failover", 1, 1))
    make_unroutable(pool[0])
    balancer = WeightedRandom({"chat": pool}, random.Random(3))
    assert set(split(balancer, 500)) == {"b"}


@pytest.mark.parametrize("make_unroutable", [unhealthy, ejected, full])
def test_a_wholly_unroutable_tier_0_falls_back_to_tier_1(make_unroutable: Callable[[Endpoint], None]) -> None:
    pool = backends(("a", 1, 0), ("b", 1, 0), ("c", 1, 1), ("d", 3, 1))
    make_unroutable(pool[0])
    make_unroutable(pool[1])
    balancer = WeightedRandom({"chat": pool}, random.Random(3))
    picks = Counter[str]()
    for _ in range(4000):
        picked = balancer.pick("chat", NOW)
        assert picked is not None and picked[1] == 1
        picks[picked[0].name] += 1
    assert set(picks) == {"c", "d"}
    assert abs(picks["d"] - 3000) < 120             # 1:3 within tier 1; 4 sigma is about 110


def test_tier_0_comes_back_when_its_ejection_ends() -> None:
    pool = backends(("a", 1, 0), ("failover", 1, 1))
    ejected(pool[0])
    balancer = WeightedRandom({"chat": pool}, random.Random(3))
    picked = balancer.pick("chat", NOW)
    assert picked is not None and (picked[0].name, picked[1]) == ("failover", 1)
    picked = balancer.pick("chat", NOW + 30.0)
    assert picked is not None and (picked[0].name, picked[1]) == ("a", 0)


def test_nothing_routable_anywhere_means_no_backend() -> None:
    pool = backends(("a", 1, 0), ("b", 1, 1))
    unhealthy(pool[0])
    full(pool[1])
    assert WeightedRandom({"chat": pool}, random.Random(3)).pick("chat", NOW) is None


def test_exclude_leaves_out_tried_endpoints() -> None:
    pool = backends(("a", 1, 0), ("b", 1, 0), ("c", 1, 0), ("failover", 1, 1))
    balancer = WeightedRandom({"chat": pool}, random.Random(5))
    for _ in range(300):
        picked = balancer.pick("chat", NOW, exclude=[pool[0]])
        assert picked is not None and picked[0].name in {"b", "c"} and picked[1] == 0
    picked = balancer.pick("chat", NOW, exclude={pool[0], pool[1], pool[2]})
    assert picked is not None and (picked[0].name, picked[1]) == ("failover", 1)
    assert balancer.pick("chat", NOW, exclude=pool) is None


def test_exclude_is_by_identity_not_by_name() -> None:
    pool = backends(("a", 1, 0))
    twin = backends(("a", 1, 0))[0]                  # same name, another endpoint
    picked = WeightedRandom({"chat": pool}, random.Random(5)).pick("chat", NOW, exclude=[twin])
    assert picked is not None and picked[0] is pool[0]


def test_split_unchanged_with_everything_healthy() -> None:
    pool = backends(("a", 3, 0), ("b", 1, 0), ("failover", 1, 1))
    for endpoint in pool:
        endpoint.record_check(True, 1, 1)            # passing checks, successes: nothing changes
        endpoint.in_flight = 5
    balancer = WeightedRandom({"chat": pool}, random.Random(7))
    picks = split(balancer, 20_000)
    assert set(picks) == {"a", "b"}
    assert abs(picks["a"] - 15_000) < 245


def test_a_routable_endpoint_in_the_picked_tier_is_not_penalised_by_a_full_neighbour() -> None:
    pool = backends(("a", 1, 0), ("b", 1, 0))
    full(pool[1])
    balancer = WeightedRandom({"chat": pool}, random.Random(7))
    assert split(balancer, 200) == Counter({"a": 200})
    pool[1].in_flight = 0                            # a slot freed: b takes calls again
    assert set(split(balancer, 200)) == {"a", "b"}
