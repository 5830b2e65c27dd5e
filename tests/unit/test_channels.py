"""Channels and health-check tasks across a config reload: kept for addresses that stay, opened
for new ones, drained and stopped for removed ones. Nothing listens on the addresses: channels
connect lazily, and the checks just fail."""
from __future__ import annotations

import pytest

from sidecar.config import parse_config
from sidecar.routing import channels as channels_module
from sidecar.routing.channels import Channels
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


async def test_reconfigure_keeps_opens_and_drains_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels_module, "DRAIN_SETTLE_SECONDS", 0.0)
    channels = Channels(parse_config(BEFORE, environ={}))
    a_channel, b_channel = channels.channel("127.0.0.1:7201"), channels.channel("127.0.0.1:7202")
    assert channels.backends["embed"][0].channel is a_channel  # one channel per address
    removed = channels.reconfigure(parse_config(AFTER, environ={}))
    assert removed == {"127.0.0.1:7202": b_channel}
    assert channels.channel("127.0.0.1:7201") is a_channel
    assert [(b.name, b.config.weight, b.channel is a_channel) for b in channels.backends["chat"]] == [
        ("a", 2.0, True), ("c", 1.0, False)]
    assert repr(channels) == "<Channels 2 channels, models=['chat']>"
    await channels.drain("127.0.0.1:7202", b_channel, grace=0.1)
    c_channel = channels.channel("127.0.0.1:7203")
    again = channels.reconfigure(parse_config(BEFORE, environ={}))  # b is back: on a new channel
    assert again == {"127.0.0.1:7203": c_channel}
    assert channels.channel("127.0.0.1:7202") is not b_channel
    await channels.aclose()                           # c's channel, never drained, is closed too


async def test_health_checks_follow_the_addresses_and_settings_of_a_reload() -> None:
    config = parse_config(BEFORE, environ={})
    channels = Channels(config)
    router = Router(config, channels.backends)
    checker = HealthChecker(router, channels, config.health_checks)
    checker.reconfigure(config.health_checks)         # before start: nothing runs yet
    assert repr(checker) == "<HealthChecker [] every 60000 ms>"
    checker.start()
    assert repr(checker) == "<HealthChecker ['127.0.0.1:7201', '127.0.0.1:7202'] every 60000 ms>"
    after = parse_config(AFTER, environ={})
    channels.reconfigure(after)
    router.reconfigure(after, channels.backends)
    checker.reconfigure(after.health_checks)
    assert repr(checker) == "<HealthChecker ['127.0.0.1:7201', '127.0.0.1:7203'] every 60000 ms>"
    off = parse_config(AFTER.replace("health_checks: {", "health_checks: {enabled: false, "), environ={})
    checker.reconfigure(off.health_checks)
    assert repr(checker) == "<HealthChecker [] every 60000 ms>"
    await checker.aclose()
    await channels.aclose()
