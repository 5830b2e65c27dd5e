"""Consistent hashing with bounded loads: stable keys, even spread, minimal movement, the load cap;
and the prefix key of `affinity: prefix`."""
from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.routing.affinity import HashRing, input_prefix, stable_hash

NAMES = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
KEYS = [f"session-{i}" for i in range(10_000)]


def capacity(candidates: set[str], load: dict[str, int], bound: float = 1.25) -> int:
    """The cap, computed here independently of the module."""
    return math.ceil(bound * (sum(load.get(n, 0) for n in candidates) + 1) / len(candidates))


def assign(ring: HashRing, candidates: list[str]) -> dict[str, str | None]:
    return {key: ring.choose(key, candidates, {}) for key in KEYS}


# --- stability ---------------------------------------------------------------------------------

def test_a_fixed_key_maps_to_a_fixed_name_in_every_process() -> None:
    # computed once in another process: a randomized hash (the built-in hash()) would not repeat it
    assert stable_hash("alice") == 5614559425216174729
    expected = {"alice": "gpu-2", "bob": "gpu-0", "carol": "gpu-1", "dave": "gpu-1",
                "erin": "gpu-3", "frank": "gpu-3", "grace": "gpu-1", "heidi": "gpu-3"}
    for _ in range(2):
        ring = HashRing(NAMES)                          # a fresh ring each time
        assert {key: ring.choose(key, NAMES, {}) for key in expected} == expected
    assert HashRing(list(reversed(NAMES))).preference("alice") == ["gpu-2", "gpu-3", "gpu-0", "gpu-1"]


def test_a_fixed_prefix_maps_to_a_fixed_name_in_every_process() -> None:
    # bytes keys (affinity: prefix) hash like the same text would: blake2b of the same bytes
    assert stable_hash(b"alice") == stable_hash("alice") == 5614559425216174729
    assert stable_hash(b"You are a helpful assistant.") == 4505581556788146300  # computed in another process
    expected = {b"You are a helpful assistant.": "gpu-2", b"You are a pirate.": "gpu-1",
                b"Translate to French:": "gpu-0", "Résumé: ".encode(): "gpu-0"}
    for _ in range(2):
        ring = HashRing(NAMES)
        assert {key: ring.choose(key, NAMES, {}) for key in expected} == expected


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True),
       st.lists(st.text(max_size=20), min_size=1, max_size=20))
def test_same_key_same_name_while_nothing_changes(names: list[str], keys: list[str]) -> None:
    ring, twin = HashRing(names, points_per_name=20), HashRing(names[::-1], points_per_name=20)
    for key in keys:
        chosen = ring.choose(key, names, {})
        assert chosen in names
        assert ring.choose(key, names, {}) == chosen == twin.choose(key, set(names), {})


# --- spread and movement -----------------------------------------------------------------------

@pytest.mark.parametrize("names", [NAMES, ["a", "b", "c", "d"]])
def test_each_of_four_names_gets_about_a_quarter(names: list[str]) -> None:
    spread = Counter(assign(HashRing(names), names).values())
    assert set(spread) == set(names)
    # 100 points per name: each share is 25 % give or take a few points (measured 21.5-27.2 %)
    assert all(2000 <= count <= 3000 for count in spread.values()), spread


def test_removing_one_name_moves_only_its_keys() -> None:
    ring = HashRing(NAMES)
    before = assign(ring, NAMES)
    after = assign(ring, NAMES[1:])                     # gpu-0 unhealthy: no longer a candidate
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "gpu-0"}
    assert 2000 <= len(moved) <= 3000                   # about a quarter
    for key in moved:                                   # each to the next name clockwise
        assert after[key] == ring.preference(key)[1]
    assert assign(ring, NAMES) == before                # and back when it returns


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=6, unique=True),
       st.data(), st.lists(st.text(max_size=20), min_size=1, max_size=30))
def test_removing_or_adding_a_name_moves_only_keys_of_that_name(
        names: list[str], data: st.DataObject, keys: list[str]) -> None:
    gone = data.draw(st.sampled_from(names))
    rest = [n for n in names if n != gone]
    ring, smaller = HashRing(names, points_per_name=20), HashRing(rest, points_per_name=20)
    for key in keys:
        before = ring.choose(key, names, {})
        without = ring.choose(key, rest, {})            # `gone` is no longer a candidate
        assert (without == before) == (before != gone)
        assert smaller.choose(key, rest, {}) == without  # so adding `gone` to a ring moves keys only onto it


# --- the order names are tried in --------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True), st.text(max_size=20))
def test_preference_is_the_order_choose_falls_back_in(names: list[str], key: str) -> None:
    ring = HashRing(names, points_per_name=10)
    order = ring.preference(key)
    assert sorted(order) == sorted(names)
    for i, name in enumerate(order):                    # take away the first i: the i-th is chosen
        assert ring.choose(key, set(order[i:]), {}) == name


# --- the load bound ----------------------------------------------------------------------------

def test_a_full_name_is_skipped_to_the_next_clockwise() -> None:
    ring = HashRing(NAMES)
    first, second, third, _ = ring.preference("alice")
    others = {n: 2 for n in NAMES if n != first}        # 6 in flight elsewhere
    # 3 on `first`: capacity ceil(1.25 * 10 / 4) = 4, so it still takes the call ...
    assert capacity(set(NAMES), {**others, first: 3}) == 4
    assert ring.choose("alice", NAMES, {**others, first: 3}) == first
    # ... 4 on it: capacity still 4, it is full and the call goes one step clockwise
    assert capacity(set(NAMES), {**others, first: 4}) == 4
    assert ring.choose("alice", NAMES, {**others, first: 4}) == second
    # both full (capacity ceil(1.25 * 21 / 4) = 7): the third
    assert ring.choose("alice", NAMES, {first: 10, second: 10}) == third


def test_a_hot_key_spreads_but_never_past_the_capacity() -> None:
    ring = HashRing(NAMES)
    load, first_used = dict.fromkeys(NAMES, 0), list[str]()
    for _ in range(1000):                               # one hot session: every call has the same key
        chosen = ring.choose("hot", NAMES, load)
        assert chosen is not None and load[chosen] < capacity(set(NAMES), load)
        load[chosen] += 1
        if chosen not in first_used:
            first_used.append(chosen)
    assert first_used == ring.preference("hot")         # overflow goes clockwise, one name at a time
    assert max(load.values()) <= math.ceil(1.25 * 1000 / 4)   # without the bound: 1000 on one
    assert min(load.values()) > 0


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), st.integers(0, 50)),
       st.sets(st.sampled_from([*NAMES, "not-on-ring"])), st.text(max_size=20),
       st.floats(1.0, 3.0))
def test_choice_is_the_first_candidate_clockwise_below_capacity(
        load: dict[str, int], candidates: set[str], key: str, bound: float) -> None:
    ring = HashRing(NAMES, points_per_name=10)
    chosen = ring.choose(key, candidates, load, bound)
    members = candidates & set(NAMES)
    if not members:
        assert chosen is None
        return
    cap = capacity(members, load, bound)
    assert chosen in members and load.get(chosen, 0) < cap
    for name in ring.preference(key)[:ring.preference(key).index(chosen)]:
        assert name not in members or load.get(name, 0) >= cap


# --- edges -------------------------------------------------------------------------------------

def test_no_candidates_means_none() -> None:
    ring = HashRing(NAMES)
    assert ring.choose("alice", [], {}) is None
    assert ring.choose("alice", ["not-on-ring"], {}) is None
    assert HashRing([]).choose("alice", NAMES, {}) is None
    assert HashRing([]).preference("alice") == []


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="points_per_name"):
        HashRing(NAMES, points_per_name=0)
    with pytest.raises(ValueError, match="bound"):
        HashRing(NAMES).choose("alice", NAMES, {}, bound=0.9)


def test_repr_is_readable() -> None:
    assert repr(HashRing(["b", "a"], points_per_name=3)) == "<HashRing names=['a', 'b'] points=6>"


# --- the prefix key ----------------------------------------------------------------------------

def test_the_prefix_is_the_first_bytes_of_the_text_in_utf8() -> None:
    assert input_prefix("You are a helpful assistant. Question: why?", b"", 12) == b"You are a he"
    assert input_prefix("short", b"", 256) == b"short"          # shorter: all of it
    # 4 bytes: "é" is two bytes in UTF-8, so the cut falls inside the second one
    assert input_prefix("éé€", b"", 3) == "éé".encode()[:3] == b"\xc3\xa9\xc3"
    assert input_prefix("€€€€", b"", 5) == "€€".encode()[:5]
    assert input_prefix("a", b"", 1) == b"a"


def test_the_prefix_of_a_binary_input_is_its_first_bytes_and_text_comes_first() -> None:
    assert input_prefix("", b"\x00\x01\x02\x03", 2) == b"\x00\x01"
    assert input_prefix("", b"\x00", 256) == b"\x00"
    assert input_prefix("text", b"\x00\x01", 256) == b"text"   # both: the text is the prompt
    assert input_prefix("", b"", 256) == b""                    # neither: no key, balanced as usual


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.integers(1, 300))
def test_the_prefix_is_exactly_the_first_limit_bytes_of_the_encoded_text(text: str, limit: int) -> None:
    assert input_prefix(text, b"", limit) == text.encode()[:limit]
