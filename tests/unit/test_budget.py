"""Budget arithmetic: UTC calendar windows, token estimates, costs in micro-units, the room check."""
from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from sidecar.config import Price
from sidecar.limits.budget import (
    MICROS,
    Budget,
    Window,
    cost_micros,
    day_window,
    estimate_tokens,
    month_window,
    over_budget,
)


def at(*parts: int) -> float:
    """Epoch seconds of a UTC date-time given as (year, month, day, hour, minute, second, microsecond)."""
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is not UTC: windows must not depend on it."""
    monkeypatch.setenv("TZ", "LOCAL-14")  # POSIX for UTC+14: the local date differs from UTC's 14 h a day
    time.tzset()
    assert time.localtime(at(2026, 11, 25, 10)).tm_mday == 26  # the zone really is in effect
    yield
    monkeypatch.undo()
    time.tzset()


# --- windows ------------------------------------------------------------------------------


@pytest.mark.usefixtures("far_from_utc")
def test_day_window_is_the_utc_day() -> None:
    window = day_window(at(2026, 11, 25, 13, 30))
    assert window == Window("2026-11-25", at(2026, 11, 26))


@pytest.mark.usefixtures("far_from_utc")
def test_day_window_bounds() -> None:
    assert day_window(at(2026, 11, 25)).id == "2026-11-25"                       # first instant
    last = day_window(at(2026, 11, 25, 23, 59, 59, 999_999))                   # last instant
    assert last == Window("2026-11-25", at(2026, 11, 26))
    assert day_window(at(2026, 11, 25, 23, 59, 59)).id == "2026-11-25"         # last whole second
    assert day_window(at(2026, 11, 26)) == Window("2026-11-26", at(2026, 11, 27))  # midnight: the next day
    # 10:00 UTC is already the next day in UTC+14: still the UTC day
    assert day_window(at(2026, 11, 25, 10)).id == "2026-11-25"


@pytest.mark.usefixtures("far_from_utc")
def test_month_window_is_the_utc_month() -> None:
    assert month_window(at(2026, 11, 25, 13, 30)) == Window("2026-11", at(2026, 12, 1))
    assert month_window(at(2026, 2, 28, 23, 59, 59)) == Window("2026-02", at(2026, 3, 1))
    assert month_window(at(2028, 2, 29, 12)) == Window("2028-02", at(2028, 3, 1))  # leap year
    assert month_window(at(2026, 3, 1)).id == "2026-03"


@pytest.mark.usefixtures("far_from_utc")
def test_december_rolls_over_to_january_of_the_next_year() -> None:
    last_second = at(2026, 12, 31, 23, 59, 59)
    assert month_window(last_second) == Window("2026-12", at(2027, 1, 1))
    assert day_window(last_second) == Window("2026-12-31", at(2027, 1, 1))
    assert month_window(at(2027, 1, 1)) == Window("2027-01", at(2027, 2, 1))
    assert day_window(at(2027, 1, 1)) == Window("2027-01-01", at(2027, 1, 2))


def test_every_instant_lies_inside_its_windows() -> None:
    for now in (at(2026, 1, 1), at(2026, 6, 15, 7, 8, 9), at(2026, 12, 31, 23, 59, 59), 0.0, 1.5e9 + 0.25):
        day, month = day_window(now), month_window(now)
        assert day.resets_at - 86_400 <= now < day.resets_at
        assert now < month.resets_at <= now + 31 * 86_400
        assert day.resets_at <= month.resets_at


# --- estimates and costs -----------------------------------------------------------------


def test_estimate_tokens_from_size_and_max_output() -> None:
    assert estimate_tokens("", b"", 100) == (0, 100)
    assert estimate_tokens("abcd", b"", 7) == (1, 7)
    assert estimate_tokens("abcde", b"", 7) == (2, 7)          # rounded up
    assert estimate_tokens("ab", b"\x00\x01\x02", 1) == (2, 1)  # text and binary data both count
    assert estimate_tokens("é", b"", 1) == (1, 1)               # bytes, not characters: 2 bytes
    assert estimate_tokens("é" * 4, b"", 1) == (2, 1)           # 8 bytes


def test_cost_micros() -> None:
    price = Price(input_per_1k=0.5, output_per_1k=1.5)
    assert cost_micros(price, 1000, 2000) == 3_500_000
    assert cost_micros(price, 0, 0) == 0
    assert cost_micros(price, 1, 0) == 500          # 0.0005


def test_cost_micros_rounds_up() -> None:
    assert cost_micros(Price(input_per_1k=0.0005, output_per_1k=0), 1, 0) == 1  # half a micro-unit
    assert cost_micros(Price(input_per_1k=0.0001, output_per_1k=0), 3, 0) == 1  # 0.3 micro-units
    assert cost_micros(Price(input_per_1k=0, output_per_1k=0.0015), 0, 1) == 2  # 1.5 micro-units


def test_cost_micros_does_not_round_up_exact_amounts() -> None:
    # 0.003 / 1000 * 1e6 is 3.0000000000000004 in floating point: still 3, not 4
    assert cost_micros(Price(input_per_1k=0.003, output_per_1k=0), 1, 0) == 3
    assert cost_micros(Price(input_per_1k=0.001, output_per_1k=0.001), 1, 1) == 2
    assert cost_micros(Price(input_per_1k=0.1, output_per_1k=0.2), 7, 3) == 1300


def test_cost_without_a_price_is_zero() -> None:
    assert cost_micros(None, 10_000, 10_000) == 0


# --- the room check and scaling -----------------------------------------------------------


WINDOW = Window("2026-11-25", at(2026, 11, 26))


def test_over_budget_finds_the_first_budget_without_room() -> None:
    day, month = Budget("day", 100, WINDOW), Budget("month", 1000, WINDOW)
    assert over_budget([day, month], [0, 0], [100, 100]) is None         # exactly the cap fits
    assert over_budget([day, month], [1, 0], [100, 100]) == 0
    assert over_budget([day, month], [0, 950], [60, 60]) == 1
    assert over_budget([day, month], [99, 999], [5, 5]) == 0             # first one wins
    assert over_budget([], [], []) is None


def test_over_budget_with_zero_cost_only_fails_an_exceeded_budget() -> None:
    budget = Budget("cost", 10, WINDOW, is_cost=True)
    assert over_budget([budget], [10], [0]) is None
    assert over_budget([budget], [11], [0]) == 0  # a positive settle pushed it past the cap


def test_over_budget_needs_one_count_per_budget() -> None:
    with pytest.raises(ValueError):
        over_budget([Budget("a", 1, WINDOW)], [0, 0], [1])


def test_budget_scaled() -> None:
    budget = Budget("org:acme:tokens_per_day", 1000, WINDOW)
    half = budget.scaled(0.5)
    assert half == Budget("org:acme:tokens_per_day", 500, WINDOW)
    assert budget.scaled(1 / 3).limit == 333            # rounded down: replicas never exceed the cap together
    assert Budget("b", 7, WINDOW).scaled(0.5).limit == 3  # 3.5: down, not to the nearest
    assert budget.scaled(0.0001).limit == 1             # never zero
    cost = Budget("org:acme:cost_per_day", 5 * MICROS, WINDOW, is_cost=True).scaled(0.25)
    assert (cost.limit, cost.is_cost, cost.window) == (1_250_000, True, WINDOW)


def test_budget_describe() -> None:
    assert Budget("t", 10, WINDOW).describe(1234) == "1234"
    assert Budget("c", 10, WINDOW, is_cost=True).describe(1_500_000) == "1.5"
