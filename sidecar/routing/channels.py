"""One shared `grpc.aio` channel per backend address and TLS setting, with bytes-in/bytes-out
method callables.

Created at start for every configured backend and closed at shutdown; a config reload keeps
the channels still in use, opens channels for new ones and drains the ones no backend uses any
more. A channel is keyed by its address *and* its backend TLS setting (`ChannelKey`): two models
reaching one address with different TLS get different channels, equal settings share one. The
certificate files of a TLS setting are read when its first channel is built; when they change,
`renew` builds new channels from the new files and hands back the old ones to drain (see
backend_tls.py). The callables carry no (de)serializers: the sidecar forwards the caller's
request bytes and relays response bytes.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from sidecar.config import BackendConfig, ClientTlsConfig, Config
from sidecar.routing.backend_tls import effective_tls
from sidecar.tls_client import ClientCredentials, files_of, read_credentials

log = logging.getLogger("sidecar.routing")
INFER = "/inference.v1.Inference/Infer"
INFER_STREAM = "/inference.v1.Inference/InferStream"
OIP_SERVICE = "/inference.GRPCInferenceService/"
OIP_ROUTED = ("ModelInfer", "ModelReady", "ModelMetadata")  # the OIP methods forwarded to a backend
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


@dataclass(frozen=True)
class ChannelKey:
    """What a channel is for: an address, reached in plaintext (`tls` None) or with these settings."""

    address: str
    tls: ClientTlsConfig | None = None

    def __str__(self) -> str:
        return self.address if self.tls is None else f"{self.address} (tls)"


@dataclass(eq=False)
class Backend:
    """A backend of one model: its config, TLS settings and the channel calls go through."""

    model: str
    config: BackendConfig
    channel: grpc.aio.Channel
    tls: ClientTlsConfig | None = None  # in effect (backend_tls.effective_tls); None: plaintext
    infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = field(init=False)
    infer_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = field(init=False)
    unary: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = field(init=False)  # by method name
    key: ChannelKey = field(init=False)

    def __post_init__(self) -> None:
        self.infer = self.channel.unary_unary(INFER)
        self.infer_stream = self.channel.unary_stream(INFER_STREAM)
        self.unary = {"Infer": self.infer, **{m: self.channel.unary_unary(OIP_SERVICE + m) for m in OIP_ROUTED}}
        self.key = ChannelKey(self.config.address, self.tls)

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        tls = " tls" if self.tls is not None else ""
        return f"<Backend {self.model}/{self.name} {self.config.address}{tls} w={self.config.weight:g}>"


Credentials = dict[ClientTlsConfig, ClientCredentials]


class Channels:
    """Owns the channels: one per distinct `ChannelKey`, shared by the backends that have it."""

    def __init__(self, config: Config) -> None:
        self._options = channel_options(config.max_message_bytes)
        self._by_key: dict[ChannelKey, grpc.aio.Channel] = {}
        self._credentials: Credentials = {}  # of the TLS settings in use, as read
        self._draining: set[grpc.aio.Channel] = set()
        self.config = config
        self.backends = self._backends(config, {})

    def _backends(self, config: Config, reusable: dict[ChannelKey, grpc.aio.Channel]) -> dict[str, list[Backend]]:
        """Backends of `config` on the channels of `reusable` where they have one, else on new
        ones (reading the files of TLS settings not in use yet: `TlsFilesError` if they cannot be)."""
        default = config.tls.backends
        settings = {model: [effective_tls(default, model_config, b) for b in model_config.backends]
                    for model, model_config in config.models.items()}
        known, self._credentials = self._credentials, {}
        for tls in {tls for group in settings.values() for tls in group if tls is not None}:
            self._credentials[tls] = known.get(tls) or read_credentials(tls)
        return {model: [self._backend(model, b, tls, reusable) for b, tls in zip(model_config.backends,
                                                                                settings[model], strict=True)]
                for model, model_config in config.models.items()}

    def _backend(self, model: str, config: BackendConfig, tls: ClientTlsConfig | None,
                 reusable: dict[ChannelKey, grpc.aio.Channel]) -> Backend:
        key = ChannelKey(config.address, tls)
        channel = self._by_key.get(key) or reusable.get(key)
        if channel is None:
            channel = self._open(key)
        self._by_key[key] = channel
        return Backend(model, config, channel, tls)

    def _open(self, key: ChannelKey) -> grpc.aio.Channel:
        if key.tls is None:
            return grpc.aio.insecure_channel(key.address, options=self._options)
        credentials = self._credentials[key.tls]
        return grpc.aio.secure_channel(key.address, credentials.channel_credentials(),
                                       options=[*self._options, *credentials.channel_options()])

    def reconfigure(self, config: Config) -> dict[ChannelKey, grpc.aio.Channel]:
        """After a reload: new `backends` for `config` on the channels still in use and new
        channels for new keys. Returns the channels no backend uses any more, for `drain` (calls
        running on them finish there). Nothing changes when a TLS file cannot be read."""
        previous, self._by_key = self._by_key, {}
        credentials = self._credentials
        try:
            self.backends = self._backends(config, previous)
        except BaseException:
            self._by_key, self._credentials = previous, credentials
            raise
        self.config = config
        return self._retire({key: channel for key, channel in previous.items() if key not in self._by_key})

    def _retire(self, removed: dict[ChannelKey, grpc.aio.Channel]) -> dict[ChannelKey, grpc.aio.Channel]:
        self._draining.update(removed.values())  # closed at shutdown if their drain has not ended
        return removed

    # --- rotation of TLS files -----------------------------------------------------------------

    def credential_files(self) -> list[str]:
        """The files of every TLS setting in use (what rotation watches)."""
        return sorted({path for tls in self._credentials for path in files_of(tls)})

    def stale_credentials(self) -> list[ClientTlsConfig]:
        """TLS settings in use whose files changed since they were read."""
        return [tls for tls, credentials in self._credentials.items() if credentials.stale()]

    def renew(self, fresh: list[ClientCredentials]) -> dict[ChannelKey, grpc.aio.Channel]:
        """Takes newly read credentials of TLS settings still in use: where the content changed,
        the backends using them get new channels (new connections, the new certificate). Returns
        the old channels, for `drain`."""
        changed: set[ClientTlsConfig] = set()
        for credentials in fresh:
            known = self._credentials.get(credentials.tls)
            if known is None:
                continue  # a reload took that setting out meanwhile
            self._credentials[credentials.tls] = credentials  # its stamps, even when only touched
            if credentials.digest != known.digest:
                changed.add(credentials.tls)
        old = {key: channel for key, channel in self._by_key.items() if key.tls in changed}
        if not old:
            return {}
        for key in old:
            self._by_key[key] = self._open(key)
        self.backends = {model: [Backend(model, b.config, self._by_key[b.key], b.tls) for b in group]
                         for model, group in self.backends.items()}
        return self._retire(old)

    # --- ending --------------------------------------------------------------------------------

    async def drain(self, key: ChannelKey, channel: grpc.aio.Channel, grace: float) -> None:
        """Closes a channel a reload or a rotation replaced: no new calls go to it; those running
        get `grace` seconds (after `DRAIN_SETTLE_SECONDS`), then are cancelled. Run in a named task."""
        await asyncio.sleep(DRAIN_SETTLE_SECONDS)
        await channel.close(grace)
        self._draining.discard(channel)
        log.info("backend channel closed", extra={"address": key.address, "tls": key.tls is not None})

    def channel(self, key: ChannelKey) -> grpc.aio.Channel:
        return self._by_key[key]

    async def aclose(self) -> None:
        """At shutdown; also closes the channels still draining after a reload."""
        for channel in [*self._by_key.values(), *self._draining]:
            await channel.close()
        self._by_key.clear()
        self._draining.clear()

    def __repr__(self) -> str:
        return f"<Channels {len(self._by_key)} channels ({len(self._credentials)} TLS), models={sorted(self.backends)}>"
