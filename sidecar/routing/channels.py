"""One shared `grpc.aio` channel per backend, with bytes-in/bytes-out method callables.

Created at start for every configured backend and closed at shutdown; a config reload keeps
the channels of addresses still in use, opens channels for new ones and drains the ones no
backend uses any more. The callables carry no (de)serializers: the sidecar forwards the caller's
request bytes and relays response bytes.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from sidecar.config import BackendConfig, Config

log = logging.getLogger("sidecar.routing")
INFER = "/inference.v1.Inference/Infer"
INFER_STREAM = "/inference.v1.Inference/InferStream"
# a call picked its backend just before a reload may start its backend call a moment later
# (after sending its response headers): a removed channel stays open this long before it closes
DRAIN_SETTLE_SECONDS = 1.0


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Options of the backend channels.

    No keepalive pings: grpc servers by default answer pings without calls more often than every
    5 minutes with GOAWAY (too_many_pings). Dead backends are found by health checks instead.
    """
    return [
        *message_options(max_message_bytes),
        # fail fast when a backend is down instead of waiting out the deadline in backoff
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_retries", 0),  # retries are the router's decision, not the channel's
    ]


@dataclass(eq=False)
class Backend:
    """A backend of one model: its config and the channel calls go through."""

    model: str
    config: BackendConfig
    channel: grpc.aio.Channel
    infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = field(init=False)
    infer_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.infer = self.channel.unary_unary(INFER)
        self.infer_stream = self.channel.unary_stream(INFER_STREAM)

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"<Backend {self.model}/{self.name} {self.config.address} w={self.config.weight:g}>"


class Channels:
    """Owns the channels: one per distinct backend address, shared by models that use it."""

    def __init__(self, config: Config) -> None:
        self._options = channel_options(config.max_message_bytes)
        self._by_address: dict[str, grpc.aio.Channel] = {}
        self._draining: set[grpc.aio.Channel] = set()
        self.backends = self._backends(config, {})

    def _backends(self, config: Config, reusable: dict[str, grpc.aio.Channel]) -> dict[str, list[Backend]]:
        return {model: [self._backend(model, b, reusable) for b in model_config.backends]
                for model, model_config in config.models.items()}

    def _backend(self, model: str, config: BackendConfig, reusable: dict[str, grpc.aio.Channel]) -> Backend:
        channel = self._by_address.get(config.address) or reusable.get(config.address)
        if channel is None:
            channel = grpc.aio.insecure_channel(config.address, options=self._options)
        self._by_address[config.address] = channel
        return Backend(model, config, channel)

    def reconfigure(self, config: Config) -> dict[str, grpc.aio.Channel]:
        """After a reload: new `backends` for `config` on the channels of addresses still in use
        and new channels for new addresses. Returns the channels no backend uses any more, by
        address, for `drain` (calls running on them finish there)."""
        previous, self._by_address = self._by_address, {}
        self.backends = self._backends(config, previous)
        removed = {address: channel for address, channel in previous.items() if address not in self._by_address}
        self._draining.update(removed.values())  # closed at shutdown if their drain has not ended
        return removed

    async def drain(self, address: str, channel: grpc.aio.Channel, grace: float) -> None:
        """Closes a channel a reload removed: no new calls go to it; those running get `grace`
        seconds (after `DRAIN_SETTLE_SECONDS`), then are cancelled. Run in a named task."""
        await asyncio.sleep(DRAIN_SETTLE_SECONDS)
        await channel.close(grace)
        self._draining.discard(channel)
        log.info("backend channel closed", extra={"address": address})

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._by_address[address]

    async def aclose(self) -> None:
        """At shutdown; also closes the channels still draining after a reload."""
        for channel in [*self._by_address.values(), *self._draining]:
            await channel.close()
        self._by_address.clear()
        self._draining.clear()

    def __repr__(self) -> str:
        return f"<Channels {len(self._by_address)} channels, models={sorted(self.backends)}>"
