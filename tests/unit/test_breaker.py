"""The circuit breaker: opens after N consecutive failures, a success resets and closes it."""
from __future__ import annotations

from sidecar.limits.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_n_consecutive_failures() -> None:
    clock = Clock()
    breaker = Breaker(failures=3, cooldown=1.0, clock=clock)
    assert not breaker.open
    assert breaker.record_failure() is False
    assert breaker.record_failure() is False
    assert not breaker.open
    clock.now = 105.0
    assert breaker.record_failure() is True      # this one opened it
    assert breaker.open and breaker.opened_at == 105.0


def test_further_failures_while_open_do_not_reopen() -> None:
    clock = Clock()
    breaker = Breaker(failures=1, cooldown=1.0, clock=clock)
    assert breaker.record_failure() is True
    clock.now = 200.0
    assert breaker.record_failure() is False     # already open: not reported again
    assert breaker.opened_at == 100.0            # still open since the first


def test_a_success_resets_the_count() -> None:
    breaker = Breaker(failures=3, cooldown=1.0, clock=Clock())
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.record_success() is False     # it was closed: nothing to report
    assert breaker.failures == 0
    assert breaker.record_failure() is False
    assert breaker.record_failure() is False
    assert not breaker.open                      # only two since the success
    assert breaker.record_failure() is True


def test_record_success_closes_an_open_breaker_and_reports_it() -> None:
    breaker = Breaker(failures=2, cooldown=1.0, clock=Clock())
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.open
    assert breaker.record_success() is True
    assert not breaker.open and breaker.opened_at is None and breaker.failures == 0
    assert breaker.record_success() is False     # reported once
    # and it takes the full count again to reopen
    assert breaker.record_failure() is False
    assert breaker.record_failure() is True


def test_threshold_of_one() -> None:
    """Every single failure opens a closed breaker, at the time of that failure."""
    clock = Clock()
    breaker = Breaker(failures=1, cooldown=0.5, clock=clock)
    assert breaker.record_failure() is True and breaker.open and breaker.opened_at == 100.0
    assert breaker.record_success() is True and not breaker.open
    clock.now = 130.0
    assert breaker.record_failure() is True and breaker.opened_at == 130.0


def test_repr_shows_state() -> None:
    breaker = Breaker(failures=2, cooldown=1.0, clock=Clock())
    breaker.record_failure()
    assert repr(breaker) == "<Breaker closed failures=1/2>"
    breaker.record_failure()
    assert repr(breaker) == "<Breaker open failures=2/2>"
    breaker.record_success()
    assert repr(breaker) == "<Breaker closed failures=0/2>"
