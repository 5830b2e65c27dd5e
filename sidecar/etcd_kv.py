"""The few etcd v3 calls the config source (config_etcd.py) and `sidecar config` make: read a
key, now or as it was at a past revision; write it; watch it.

Over etcd3aio's generated stubs on a `grpc.aio` channel of our own, for three reasons:
1. its watch reconnects by itself, forever and silently, while readiness must show that etcd is
   out, and after a reconnect the key must be read again before watching on (config_etcd.py);
2. its channel joins the endpoints with `ipv4:` for round-robin, which takes IP addresses only,
   and etcd members usually have DNS names: here each endpoint gets a channel of its own, and a
   failed call moves on to the next endpoint for the next call;
3. gRPC and etcd errors are mapped here, in one place (`_mapped`), into `EtcdUnavailable`
   (cannot reach or use etcd: the caller waits and tries again, starts from its cache, or exits)
   and `RevisionCompacted` (an old revision etcd no longer keeps: `sidecar config history`).

With `username`/`password` every channel authenticates first and sends the token etcd gives;
an expired token is replaced once per call.

etcd3aio is imported on first use (`_pb`), not with this module: it puts its generated protos'
directory first on `sys.path` (their `google.api` included), which a sidecar reading a file
has no reason to carry.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import grpc

from sidecar.config import ConfigError, ConfigSourceConfig

_KEEPALIVE = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
              ("grpc.keepalive_permit_without_calls", 1)]  # a silent network cut shows within ~15 s
_DELETE = 1  # mvccpb.Event.EventType


@cache
def _pb() -> Any:
    """etcd3aio's generated etcd v3 messages and stubs (see above, 1.)."""
    from etcd3aio import _protobuf

    return _protobuf


class EtcdUnavailable(Exception):
    """etcd cannot be reached or refused the request; the message says which endpoint and why."""


class RevisionCompacted(Exception):
    """The revision asked for is older than what etcd keeps."""


@dataclass(frozen=True)
class KeyValue:
    value: bytes
    mod_revision: int      # the revision that wrote this value
    create_revision: int
    version: int           # writes of the key since it was created


class EtcdKV:
    def __init__(self, source: ConfigSourceConfig) -> None:
        self._source = source
        self._timeout = source.timeout_ms / 1000.0
        self._credentials = _credentials(source)
        self._index = 0                            # the endpoint in use
        self._channel: grpc.aio.Channel | None = None
        self._retired: list[grpc.aio.Channel] = []  # channels of endpoints left behind, to close
        self._token: str | None = None

    def __repr__(self) -> str:
        return f"<EtcdKV {self.endpoint} key={self._source.key!r}>"

    @property
    def endpoint(self) -> str:
        return self._source.endpoints[self._index]

    async def get(self, key: str, revision: int = 0) -> tuple[KeyValue | None, int]:
        """The value of `key` (at `revision`, 0: now), or None when it does not exist; and the
        revision of the store the answer describes."""
        request = _pb().RangeRequest(key=key.encode(), revision=revision)
        response = await self._unary("read", lambda channel: _pb().KVStub(channel).Range, request)
        kvs = list(response.kvs)
        value = _key_value(kvs[0]) if kvs else None
        return value, int(response.header.revision)

    async def put(self, key: str, value: bytes) -> int:
        """Writes `value`; returns the revision that wrote it."""
        request = _pb().PutRequest(key=key.encode(), value=value)
        response = await self._unary("write", lambda channel: _pb().KVStub(channel).Put, request)
        return int(response.header.revision)

    async def watch(self, key: str, start_revision: int) -> AsyncIterator[KeyValue | None]:
        """Every write of `key` from `start_revision` on: the new value, or None when the key was
        deleted. Runs until the stream breaks, which raises `EtcdUnavailable` (etcd went away, or
        canceled the watch, e.g. because `start_revision` was compacted)."""
        channel, metadata = await self._connection()
        create = _pb().WatchCreateRequest(key=key.encode(), start_revision=start_revision)

        async def requests() -> AsyncIterator[Any]:
            yield _pb().WatchRequest(create_request=create)
            await asyncio.Event().wait()  # nothing more to send; the stream stays open

        call = _pb().WatchStub(channel).Watch(requests(), metadata=metadata)
        try:
            with self._mapped("watch"):
                async for response in call:
                    if response.canceled or response.compact_revision:
                        reason = response.cancel_reason or f"revision {start_revision} was compacted"
                        raise EtcdUnavailable(f"watch at {self.endpoint} canceled by etcd: {reason}")
                    for event in response.events:
                        yield None if event.type == _DELETE else _key_value(event.kv)
            raise EtcdUnavailable(f"watch at {self.endpoint}: the stream ended")
        except _TokenRejected:
            self._token = None  # the next connection authenticates again
            raise EtcdUnavailable(f"watch at {self.endpoint}: the auth token was refused") from None
        finally:
            call.cancel()

    async def aclose(self) -> None:
        if self._channel is not None:
            self._retired.append(self._channel)
            self._channel = None
        await self._close_retired()

    async def _close_retired(self) -> None:
        while self._retired:
            await self._retired.pop().close()

    # --- channels, credentials, errors --------------------------------------------------------

    async def _unary(self, what: str, method: Callable[[grpc.aio.Channel], Any], request: Any) -> Any:
        """One request, with the timeout, on the endpoint in use; when that one cannot be
        reached, on the next ones in turn (each once). A rejected token is renewed once."""
        endpoints_left, renewed = len(self._source.endpoints), False
        while True:
            index = self._index
            try:
                channel, metadata = await self._connection()
                with self._mapped(what):
                    return await method(channel)(request, metadata=metadata, timeout=self._timeout)
            except _TokenRejected:
                self._token = None
                if renewed:
                    raise EtcdUnavailable(f"{what} at {self.endpoint}: the auth token was refused") from None
                renewed = True
            except EtcdUnavailable:
                endpoints_left -= 1
                if endpoints_left <= 0 or self._index == index:  # all tried, or not a connection problem
                    raise

    async def _connection(self) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...] | None]:
        await self._close_retired()
        if self._channel is None:
            options: list[tuple[str, Any]] = [*_KEEPALIVE]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.endpoint, options=options)
            else:
                tls = self._source.tls
                if tls is not None and tls.server_name:
                    options.append(("grpc.ssl_target_name_override", tls.server_name))
                self._channel = grpc.aio.secure_channel(self.endpoint, self._credentials, options=options)
        if self._source.username is None:
            return self._channel, None
        if self._token is None:
            request = _pb().AuthenticateRequest(name=self._source.username, password=self._source.password or "")
            with self._mapped("authenticate"):
                response = await _pb().AuthStub(self._channel).Authenticate(request, timeout=self._timeout)
            self._token = str(response.token)
        return self._channel, (("token", self._token),)

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """gRPC errors -> ours. A call that could not reach etcd, or timed out, moves the next
        call to the next endpoint."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            self._fail(what, exc)

    def _fail(self, what: str, exc: grpc.aio.AioRpcError) -> NoReturn:
        code, details = exc.code(), (exc.details() or "")[:300]  # gRPC's can run long
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            raise RevisionCompacted(details) from None
        if code == grpc.StatusCode.UNAUTHENTICATED and self._token is not None and "token" in details:
            raise _TokenRejected from None
        where = f"{what} at {self.endpoint}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            self._next_endpoint()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise EtcdUnavailable(f"{where}: no answer within {self._source.timeout_ms} ms") from None
        raise EtcdUnavailable(f"{where}: {code.name}: {details}") from None

    def _next_endpoint(self) -> None:
        """The next call goes to the next endpoint, on a new channel (the old one is closed then)."""
        self._index = (self._index + 1) % len(self._source.endpoints)
        if self._channel is not None:
            self._retired.append(self._channel)
        self._channel, self._token = None, None


class _TokenRejected(Exception):
    pass


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(value=bytes(kv.value), mod_revision=int(kv.mod_revision),
                    create_revision=int(kv.create_revision), version=int(kv.version))


def _credentials(source: ConfigSourceConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials from the PEM files `tls` names (read once, at start), or None."""
    tls = source.tls
    if tls is None:
        return None

    def read(name: str, path: str | None) -> bytes | None:
        try:
            return Path(path).read_bytes() if path is not None else None
        except OSError as exc:
            raise ConfigError([f"config_source.tls.{name}: cannot read {path}: {exc.strerror or exc}"]) from None

    return grpc.ssl_channel_credentials(root_certificates=read("ca_file", tls.ca_file),
                                        private_key=read("key_file", tls.key_file),
                                        certificate_chain=read("cert_file", tls.cert_file))
