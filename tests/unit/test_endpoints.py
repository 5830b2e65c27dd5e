"""Endpoint state: active-check streaks, passive outlier ejection, saturation. Pure, clock by hand."""
from __future__ import annotations

from sidecar.config import BackendConfig, OutlierDetectionConfig
from sidecar.routing.channels import Backend
from sidecar.routing.endpoints import Endpoint, may_eject

# 3 failures in a row eject; 10 s, 20 s, 30 s ... capped at 25 s
OUTLIER = OutlierDetectionConfig(consecutive_failures=3, base_ejection_ms=10_000, max_ejection_ms=25_000)
T0 = 1000.0


class NoChannel:
    """Endpoints never touch channels; Backend only asks for its two method callables."""

    def unary_unary(self, method: str) -> None:
        return None

    def unary_stream(self, method: str) -> None:
        return None


def endpoint(name: str = "a", max_in_flight: int | None = None) -> Endpoint:
    config = BackendConfig(name=name, address="127.0.0.1:6000", max_in_flight=max_in_flight)
    return Endpoint(Backend("chat", config, NoChannel()))  # type: ignore[arg-type]


def fail(e: Endpoint, now: float, times: int, allowed: bool = True) -> list[bool]:
    return [e.record_failure(now, OUTLIER, allowed) for _ in range(times)]


# --- active health checks ---------------------------------------------------------------------


def test_unhealthy_after_n_consecutive_failed_checks() -> None:
    e = endpoint()
    assert e.healthy and e.routable(T0)
    assert e.record_check(False, 3, 2) is False
    assert e.record_check(False, 3, 2) is False
    assert e.healthy and e.routable(T0)
    assert e.record_check(False, 3, 2) is True      # the third one flips it
    assert not e.healthy and not e.routable(T0)
    assert e.record_check(False, 3, 2) is False     # further failures change nothing
    assert not e.healthy


def test_healthy_again_after_m_consecutive_passed_checks() -> None:
    e = endpoint()
    for _ in range(3):
        e.record_check(False, 3, 2)
    assert not e.healthy
    assert e.record_check(True, 3, 2) is False
    assert not e.healthy
    assert e.record_check(True, 3, 2) is True
    assert e.healthy and e.routable(T0) and e.check_streak == 0


def test_one_disagreeing_check_resets_the_streak() -> None:
    e = endpoint()
    e.record_check(False, 3, 2)
    e.record_check(False, 3, 2)
    assert e.record_check(True, 3, 2) is False      # agrees with healthy: streak gone
    assert e.check_streak == 0
    e.record_check(False, 3, 2)
    e.record_check(False, 3, 2)
    assert e.healthy                                 # only two in a row since the pass
    assert e.record_check(False, 3, 2) is True

    # and the same on the way back up
    assert e.record_check(True, 3, 2) is False
    assert e.record_check(False, 3, 2) is False     # agrees with unhealthy: streak gone
    assert e.record_check(True, 3, 2) is False
    assert not e.healthy
    assert e.record_check(True, 3, 2) is True


def test_thresholds_of_one_flip_at_once() -> None:
    e = endpoint()
    assert e.record_check(False, 1, 1) is True and not e.healthy
    assert e.record_check(True, 1, 1) is True and e.healthy


# --- passive outlier ejection -----------------------------------------------------------------


def test_ejected_after_consecutive_failures_for_the_base_time() -> None:
    e = endpoint()
    assert fail(e, T0, 2) == [False, False]
    assert not e.ejected(T0) and e.routable(T0)
    assert e.record_failure(T0, OUTLIER, True) is True
    assert e.ejected(T0) and not e.routable(T0)
    assert e.times_ejected == 1 and e.failures == 0
    assert e.ejected_until == T0 + 10.0
    assert not e.routable(T0 + 9.999)
    assert e.routable(T0 + 10.0) and not e.ejected(T0 + 10.0)  # back on its own


def test_a_success_resets_the_failure_streak() -> None:
    e = endpoint()
    fail(e, T0, 2)
    e.record_success(T0, OUTLIER)
    assert e.failures == 0
    assert fail(e, T0, 2) == [False, False]
    assert e.routable(T0)                            # only two since the success
    assert e.record_failure(T0, OUTLIER, True) is True


def test_ejection_grows_with_times_ejected_and_is_capped() -> None:
    e = endpoint()
    now = T0
    spans = []
    for _ in range(4):
        assert fail(e, now, 3) == [False, False, True]
        spans.append(e.ejected_until - now)
        now = e.ejected_until + 1.0                  # back, and failing again before a base period
    assert spans == [10.0, 20.0, 25.0, 25.0]         # base x 1, x 2, then max
    assert e.times_ejected == 4


def test_failures_while_ejected_do_not_eject_again() -> None:
    e = endpoint()
    fail(e, T0, 3)
    until = e.ejected_until
    assert fail(e, T0 + 1, 5) == [False] * 5         # calls still in flight failing
    assert e.ejected_until == until and e.times_ejected == 1


def test_not_ejected_when_not_allowed_but_the_streak_goes_on() -> None:
    e = endpoint()
    assert fail(e, T0, 4, allowed=False) == [False] * 4
    assert e.routable(T0)
    assert e.record_failure(T0, OUTLIER, True) is True  # allowed again: the streak is long enough


def test_times_ejected_resets_after_a_base_period_back() -> None:
    e = endpoint()
    fail(e, T0, 3)                                   # ejected until T0 + 10, back for a base period at T0 + 20
    e.record_success(T0 + 19.9, OUTLIER)
    assert e.times_ejected == 1                      # not yet
    e.record_success(T0 + 20.0, OUTLIER)
    assert e.times_ejected == 0
    fail(e, T0 + 30, 3)
    assert e.ejected_until == T0 + 30 + 10.0         # the base again, not twice it


def test_times_ejected_does_not_reset_while_back_for_less_than_a_base_period() -> None:
    e = endpoint()
    fail(e, T0, 3)
    e.record_success(T0 + 15.0, OUTLIER)             # back 5 s of a 10 s base period
    fail(e, T0 + 15.0, 3)
    assert e.times_ejected == 2 and e.ejected_until == T0 + 15.0 + 20.0


def test_times_ejected_resets_after_a_long_quiet_period_even_without_a_success() -> None:
    """Back for far more than a base period without being ejected, then a failure streak: that
    is a first ejection again (base length), whether or not a success happened in between (a
    quiet model may send it no call at all, or only calls that end INVALID_ARGUMENT)."""
    e = endpoint()
    fail(e, T0, 3)                                   # ejected T0 .. T0 + 10
    later = T0 + 1000.0                              # back for 990 s, 99 base periods
    assert fail(e, later, 3) == [False, False, True]
    assert e.ejected_until - later == 10.0           # base x 1: the ejection count had expired
    assert e.times_ejected == 1


# --- max_ejection_percent ----------------------------------------------------------------------


def test_may_eject_always_allows_the_first() -> None:
    group = [endpoint("a")]
    assert may_eject(group, T0, 0)                   # even with 0 %
    assert may_eject([endpoint("a"), endpoint("b")], T0, 0)


def test_may_eject_respects_max_ejection_percent() -> None:
    group = [endpoint(n) for n in "abcd"]
    fail(group[0], T0, 3)
    assert may_eject(group, T0, 50)                  # 2 of 4 = 50 %
    assert not may_eject(group, T0, 49)
    fail(group[1], T0, 3)
    assert not may_eject(group, T0, 50)              # 3 of 4 would be 75 %
    assert may_eject(group, T0, 75)
    assert may_eject(group, T0 + 10.0, 50)           # both are back: none ejected


def test_may_eject_with_two_backends_and_half_allows_only_one() -> None:
    group = [endpoint("a"), endpoint("b")]
    assert may_eject(group, T0, 50)
    fail(group[0], T0, 3)
    assert not may_eject(group, T0, 50)
    assert may_eject(group, T0, 100)


# --- saturation ---------------------------------------------------------------------------------


def test_not_routable_while_max_in_flight_are_running() -> None:
    e = endpoint(max_in_flight=2)
    e.in_flight = 1
    assert e.routable(T0)
    e.in_flight = 2
    assert not e.routable(T0)
    assert e.healthy and not e.ejected(T0)           # full is neither unhealthy nor ejected
    e.in_flight = 1
    assert e.routable(T0)


def test_no_max_in_flight_means_no_limit() -> None:
    e = endpoint()
    e.in_flight = 10_000
    assert e.routable(T0)


def test_properties_and_repr() -> None:
    e = Endpoint(Backend("chat", BackendConfig(name="a", address="h:1", weight=2.5, priority=1),
                         NoChannel()))  # type: ignore[arg-type]
    assert (e.name, e.weight, e.priority) == ("a", 2.5, 1)
    assert repr(e) == "<Endpoint chat/a healthy in_flight=0>"
    e.record_check(False, 1, 1)
    assert repr(e) == "<Endpoint chat/a unhealthy in_flight=0>"
