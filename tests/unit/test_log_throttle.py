"""`LogThrottle`: the first line of a kind in full, then one summary per interval with the count."""
from __future__ import annotations

import logging

import pytest

from sidecar.telemetry.logging import LogThrottle


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int | None]]:
    return [(r.getMessage(), getattr(r, "repeats", None)) for r in caplog.records if r.name == "tests.throttle"]


def test_repeats_are_counted_and_summarized_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = LogThrottle(logging.getLogger("tests.throttle"), 60, clock=clock)
    with caplog.at_level(logging.INFO, "tests.throttle"):
        assert throttle.log(logging.ERROR, "auth", "auth failed %s", "broker-1")
        for _ in range(960):                 # every 62.5 ms (exact in binary) for a minute
            clock.now += 0.0625
            throttle.log(logging.ERROR, "auth", "auth failed %s", "broker-1")
        throttle.log(logging.WARNING, "other", "another kind")
    assert lines(caplog) == [("auth failed broker-1", None), ("auth failed broker-1", 960), ("another kind", None)]
    summary = next(r for r in caplog.records if getattr(r, "repeats", None))
    assert summary.levelno == logging.ERROR and vars(summary)["repeats_seconds"] == 60.0


def test_settle_reports_what_was_not_logged_and_starts_over(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = LogThrottle(logging.getLogger("tests.throttle"), 60, clock=clock)
    with caplog.at_level(logging.INFO, "tests.throttle"):
        for _ in range(5):
            throttle.log(logging.ERROR, "refused", "connection refused")
        assert throttle.settle() == 4
        assert throttle.settle() == 0
        assert throttle.log(logging.ERROR, "refused", "connection refused")
    assert lines(caplog) == [("connection refused", None)] * 2


def test_a_rare_repeat_logs_each_time_with_its_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = LogThrottle(logging.getLogger("tests.throttle"), 60, clock=clock)
    with caplog.at_level(logging.INFO, "tests.throttle"):
        for _ in range(3):
            throttle.log(logging.INFO, "rare", "rare")
            clock.now += 600
    assert lines(caplog) == [("rare", None), ("rare", 1), ("rare", 1)]


def test_kinds_are_bounded() -> None:
    throttle = LogThrottle(logging.getLogger("tests.throttle"), 60, max_kinds=3, clock=Clock())
    assert all(throttle.log(logging.DEBUG, f"kind-{n}", "x") for n in range(10))
    assert not throttle.log(logging.DEBUG, "kind-9", "x")
    assert throttle.log(logging.DEBUG, "kind-0", "x")   # forgotten: logs in full again
