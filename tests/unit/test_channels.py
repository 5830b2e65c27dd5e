"""Channels and health-check tasks across a config reload: kept for addresses that stay, opened
for new ones, drained and stopped for removed ones. Nothing listens on the addresses: channels
connect lazily, and the health checks go to a stand-in that records them (`HealthSpy`)."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest

from sidecar.config import parse_config
from sidecar.routing import channels as channels_module
from sidecar.routing.channels import ChannelKey, Channels
from sidecar.routing.health_checks import HealthChecker
from sidecar.routing.router import Router

BEFORE = """
models:
  chat:
    backends:
      - {name: a, address: "127.0.0.1:7201"}
      - {name: b, address: "127.0.0.1:7202"}
  embed:
    backends: [{name: e, address: "127.0.0.1:7201"}]
health_checks: {interval_ms: 60000}
"""
AFTER = """
models:
  chat:
    backends:
      - {name: a, address: "127.0.0.1:7201", weight: 2}
      - {name: c, address: "127.0.0.1:7203"}
health_checks: {interval_ms: 60000, timeout_ms: 100}
"""


def closed(channel: grpc.aio.Channel) -> bool:
    """Whether `channel` was closed (a closed channel can carry no more calls)."""
    return channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN


async def test_reconfigure_keeps_opens_and_drains_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the channels across reloads: one per address, kept for an address that stays, new for
    a new one; a removed one takes no new calls but stays open until drained, then closes; and
    shutdown closes every channel, including a removed one that was never drained."""
    monkeypatch.setattr(channels_module, "DRAIN_SETTLE_SECONDS", 0.0)
    channels = Channels(parse_config(BEFORE, environ={}))
    a_channel, b_channel = channels.channel(ChannelKey("127.0.0.1:7201")), channels.channel(ChannelKey("127.0.0.1:7202"))
    assert channels.backends["embed"][0].channel is a_channel  # one channel per address
    removed = channels.reconfigure(parse_config(AFTER, environ={}))
    assert removed == {ChannelKey("127.0.0.1:7202"): b_channel}
    assert channels.channel(ChannelKey("127.0.0.1:7201")) is a_channel
    c_channel = channels.channel(ChannelKey("127.0.0.1:7203"))
    assert c_channel is not a_channel and c_channel is not b_channel
    with pytest.raises(KeyError):
        channels.channel(ChannelKey("127.0.0.1:7202"))  # no backend uses it any more
    assert set(channels.backends) == {"chat"}
    assert [(b.name, b.config.weight, b.channel) for b in channels.backends["chat"]] == [
        ("a", 2.0, a_channel), ("c", 1.0, c_channel)]
    assert not any(closed(ch) for ch in (a_channel, b_channel, c_channel))  # b: calls running on it finish
    await channels.drain(ChannelKey("127.0.0.1:7202"), b_channel, grace=0.1)
    assert closed(b_channel) and not closed(a_channel) and not closed(c_channel)
    again = channels.reconfigure(parse_config(BEFORE, environ={}))  # b is back: on a new channel
    assert again == {ChannelKey("127.0.0.1:7203"): c_channel}
    new_b_channel = channels.channel(ChannelKey("127.0.0.1:7202"))
    assert new_b_channel is not b_channel and not closed(new_b_channel) and not closed(c_channel)
    await channels.aclose()
    assert all(closed(ch) for ch in (a_channel, new_b_channel, c_channel))  # c: never drained, closed too


class HealthSpy:
    """Stands in for the backends' Health service on the checker's channels: records every check
    as (address, timeout) and leaves it unanswered until the checker cancels it."""

    def __init__(self, channels: Channels) -> None:
        self._lookup = channels.channel  # the real one: a check needs a channel the Channels have
        self.started: list[tuple[str, float]] = []
        self.cancelled: list[str] = []

    def channel(self, key: ChannelKey) -> SimpleNamespace:
        self._lookup(key)
        address = key.address

        def unary_unary(method: str, **_: object) -> Callable[..., Awaitable[None]]:
            assert method == "/grpc.health.v1.Health/Check"
            return functools.partial(self._check, address)
        return SimpleNamespace(unary_unary=unary_unary)

    async def _check(self, address: str, request: HealthCheckRequest, timeout: float) -> None:
        self.started.append((address, timeout))
        try:
            await asyncio.get_running_loop().create_future()  # never answered
        except asyncio.CancelledError:
            self.cancelled.append(address)
            raise


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Lets the event loop run until `condition()` holds; fails after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.001)


async def run_loop_a_while() -> None:
    """Gives tasks just scheduled their first steps (a started check records itself in its first one)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_health_checks_follow_the_addresses_and_settings_of_a_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards which addresses are checked, and with which settings: nothing before `start`, then one
    check per address; after a reload new addresses are checked with the new settings, removed
    ones' checks are cancelled and the others keep running (not restarted); disabling checks
    cancels them all."""
    config = parse_config(BEFORE, environ={})
    channels = Channels(config)
    spy = HealthSpy(channels)
    monkeypatch.setattr(channels, "channel", spy.channel)
    router = Router(config, channels.backends)
    checker = HealthChecker(router, channels, config.health_checks)
    checker.reconfigure(config.health_checks)         # before start: nothing runs yet
    await run_loop_a_while()
    assert spy.started == []
    checker.start()
    await eventually(lambda: len(spy.started) >= 2, "checks of both addresses")
    before_timeout = config.health_checks.timeout_ms / 1000
    assert sorted(spy.started) == [("127.0.0.1:7201", before_timeout), ("127.0.0.1:7202", before_timeout)]

    after = parse_config(AFTER, environ={})
    channels.reconfigure(after)
    router.reconfigure(after, channels.backends)
    checker.reconfigure(after.health_checks)
    await eventually(lambda: len(spy.started) >= 3 and bool(spy.cancelled), "the reload's check changes")
    await run_loop_a_while()
    assert spy.started[2:] == [("127.0.0.1:7203", 0.1)]  # only the new address, with the new timeout
    assert spy.cancelled == ["127.0.0.1:7202"]            # 7201's check runs on

    off = parse_config(AFTER.replace("health_checks: {", "health_checks: {enabled: false, "), environ={})
    checker.reconfigure(off.health_checks)
    await eventually(lambda: len(spy.cancelled) >= 3, "every check cancelled")
    await run_loop_a_while()
    assert sorted(spy.cancelled) == ["127.0.0.1:7201", "127.0.0.1:7202", "127.0.0.1:7203"]
    assert len(spy.started) == 3
    await checker.aclose()
    await channels.aclose()
