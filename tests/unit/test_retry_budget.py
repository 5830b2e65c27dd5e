"""The retry budget: a floor per second, a share of recent calls, a sliding ten-second window."""
from __future__ import annotations

from sidecar.routing.retry_budget import WINDOW, RetryBudget


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def retries(budget: RetryBudget, tries: int = 10_000) -> int:
    """How many of `tries` retries the budget allows right now."""
    return sum(budget.try_retry() for _ in range(tries))


def test_the_window_is_ten_seconds() -> None:
    assert WINDOW == 10


def test_min_per_second_is_a_floor_without_calls() -> None:
    budget = RetryBudget(percent=20, min_per_second=3, clock=Clock())
    assert retries(budget) == 30                    # 3/s over the 10 s window


def test_no_floor_and_no_calls_means_no_retries() -> None:
    budget = RetryBudget(percent=20, min_per_second=0, clock=Clock())
    assert budget.try_retry() is False


def test_percent_of_recent_calls() -> None:
    budget = RetryBudget(percent=20, min_per_second=3, clock=Clock())
    for _ in range(1000):
        budget.record_call()
    assert retries(budget) == 200


def test_the_floor_wins_over_a_small_share() -> None:
    budget = RetryBudget(percent=20, min_per_second=3, clock=Clock())
    for _ in range(100):                             # 20 % = 20 < 30
        budget.record_call()
    assert retries(budget) == 30


def test_calls_after_the_budget_is_spent_make_room_again() -> None:
    budget = RetryBudget(percent=50, min_per_second=0, clock=Clock())
    for _ in range(10):
        budget.record_call()
    assert retries(budget) == 5
    budget.record_call()
    budget.record_call()
    assert retries(budget) == 1                      # 12 calls -> 6 retries, 5 used


def test_only_allowed_retries_are_counted() -> None:
    budget = RetryBudget(percent=10, min_per_second=0, clock=Clock())
    for _ in range(100):
        budget.record_call()
    assert retries(budget, 50) == 10                 # 40 refused ones used nothing
    assert "10 retries / 100 calls" in repr(budget)
    for _ in range(10):
        budget.record_call()
    assert budget.try_retry() is True                # 110 calls -> 11


def test_old_seconds_expire() -> None:
    clock = Clock(1000.0)
    budget = RetryBudget(percent=20, min_per_second=1, clock=clock)
    for _ in range(1000):
        budget.record_call()                         # all in second 1000
    clock.now = 1009.999                             # still inside the window
    assert repr(budget) == "<RetryBudget 0 retries / 1000 calls in 10s>"
    assert retries(budget, 150) == 150
    clock.now = 1010.0                               # second 1000 has left the window; 1009 has not
    assert retries(budget) == 0                      # 0 calls -> the floor (10), but 150 retries still count
    assert repr(budget) == "<RetryBudget 150 retries / 0 calls in 10s>"
    clock.now = 1019.0                               # second 1009 has left too
    assert retries(budget) == 10                     # the floor alone


def test_retries_expire_with_their_second() -> None:
    clock = Clock(1000.0)
    budget = RetryBudget(percent=0, min_per_second=1, clock=clock)
    assert retries(budget) == 10                     # the floor, all used at second 1000
    clock.now = 1005.0
    assert budget.try_retry() is False               # still counted
    clock.now = 1010.0
    assert retries(budget) == 10                     # used ones expired: the whole floor again


def test_the_window_slides_second_by_second() -> None:
    clock = Clock(1000.0)
    budget = RetryBudget(percent=10, min_per_second=0, clock=clock)
    for second in range(10):                         # 100 calls in each of ten seconds
        clock.now = 1000.0 + second + 0.5
        for _ in range(100):
            budget.record_call()
    assert repr(budget) == "<RetryBudget 0 retries / 1000 calls in 10s>"
    clock.now = 1012.0                               # seconds 1000..1002 have expired
    assert repr(budget) == "<RetryBudget 0 retries / 1000 calls in 10s>"  # repr does not advance
    assert retries(budget) == 70                     # 700 calls left in the window


def test_a_long_pause_clears_everything() -> None:
    clock = Clock(1000.0)
    budget = RetryBudget(percent=50, min_per_second=0, clock=clock)
    for _ in range(100):
        budget.record_call()
    assert retries(budget, 10) == 10
    clock.now = 1_000_000.0
    assert budget.try_retry() is False
    budget.record_call()
    budget.record_call()
    assert retries(budget) == 1
