"""One Redis client for a `limits.redis_url`: a single server, or a Redis Cluster.

The URL says which (`docs/operations/scale-out.md`):

1. `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS), `unix:///path`: one server
   (or a proxy in front of many, such as Envoy's redis proxy).
2. `redis+cluster://[user:password@]host:port[,host:port...]`, `rediss+cluster://...`: a Redis
   Cluster. Every listed node is a seed: the client learns the slots from whichever answers, and
   follows MOVED and ASK as slots move. Keys of one org share a hash tag (`{org}`), so each script
   and each pipeline touches one slot.

Both clients come without retries: the limit store bounds a round trip by its own deadline and
decides what a failure means; audit and overrides report a failure to their caller.

TLS (`rediss://`, `rediss+cluster://`) verifies the server against `limits.redis_tls.ca_file`
(else the system's roots) and the URL's host (or `server_name`), and presents a client
certificate when one is configured. Every new connection reads the files as they are then
(`TlsConnection`), so a rotated certificate is used from the next connection on.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

if TYPE_CHECKING:
    from sidecar.config_sections import ClientTlsConfig

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TLS_SCHEMES = ("rediss", "rediss+cluster")
DEFAULT_PORT = 6379

Client = aioredis.Redis | RedisCluster


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """The `host:port` seeds of a cluster URL, in order; ValueError when one is malformed."""
    netloc = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]
    seeds = []
    for part in netloc.split(","):
        part = part.strip()
        host, _, port = part.rpartition(":") if ":" in part else (part, "", str(DEFAULT_PORT))
        host = host.strip("[]")  # [::1]:7000
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not host:port")
        seeds.append((host, int(port)))
    return seeds


def where(url: str) -> str:
    """The URL without credentials, for logs and readiness."""
    if is_cluster(url):
        return "cluster " + ",".join(f"{host}:{port}" for host, port in cluster_seeds(url))
    parsed = urlsplit(url)
    return f"{parsed.hostname or parsed.path}:{parsed.port or ''}".rstrip(":")


class TlsConnection(SSLConnection):
    """A TLS connection that takes up rotated certificate files, and checks `server_name`.

    redis-py keeps the SSL context a connection object got at its first connect for as long as
    the object lives, and a pool reconnects the same objects: a client certificate replaced on
    disk (or a bad one fixed) would never be used. Here each connect asks again; redis-py shares
    contexts between connections by the files' stat signatures, so an unchanged file costs a
    few stat() calls per connect, and a changed one builds a new context."""

    def __init__(self, *, ssl_server_name: str | None = None, **kwargs: Any) -> None:
        self.server_name = ssl_server_name
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        self.ssl_context.context = None
        arguments = dict(super()._connection_arguments())
        if self.server_name:
            arguments["server_hostname"] = self.server_name  # SNI, and the name the certificate must have
        return arguments


def tls_options(tls: ClientTlsConfig | None) -> dict[str, Any]:
    """redis-py's TLS arguments for `limits.redis_tls` (None: the system's roots, the URL's host)."""
    if tls is None:
        return {"ssl_server_name": None}
    # password "": an encrypted key (refused at start, but a rotation could bring one) fails the
    # connection instead of OpenSSL asking for its passphrase on the terminal
    return {"ssl_ca_certs": tls.ca_file, "ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file,
            "ssl_password": "", "ssl_server_name": tls.server_name}


class SeededCluster(RedisCluster):
    """A cluster client that can start while a master is down.

    redis-py reads the command table (COMMAND) from the first master of the slot map during its
    first topology refresh, and gives up when that master does not answer: a sidecar started
    while that one master is down would then fail every command on every node. Here the table is
    read first from whichever seed answers.

    With TLS, every node's connections are `TlsConnection`s: the seeds' and those of nodes
    learnt later, which are made from the same connection arguments."""

    def __init__(self, *args: Any, ssl_server_name: str | None = None, ssl_password: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("ssl"):
            extra = {"ssl_server_name": ssl_server_name, "ssl_password": ssl_password}  # RedisCluster takes neither
            self.connection_kwargs.update(connection_class=TlsConnection, **extra)
            for node in self.nodes_manager.startup_nodes.values():
                node.connection_class = TlsConnection
                node.connection_kwargs.update(extra)

    async def initialize(self, *args: Any, **kwargs: Any) -> SeededCluster:
        if not self.commands_parser.commands:
            for seed in list(self.nodes_manager.startup_nodes.values()):
                node = ClusterNode(seed.host, seed.port, **self.nodes_manager.connection_kwargs)
                try:
                    await self.commands_parser.initialize(node)
                    break
                except (RedisError, OSError):
                    continue
                finally:
                    await node.disconnect()
        await super().initialize(*args, **kwargs)
        return self


def connect(url: str, timeout: float, *, socket_timeout: float | None, max_connections: int = 8,
            tls: ClientTlsConfig | None = None) -> Client:
    """A client for `url`. Connecting never blocks here: the first command connects (a cluster
    client learns its slots then, or at `initialize()`). `tls`: `limits.redis_tls`, used with a
    `rediss` URL (config validation refuses it with a plaintext one)."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout, "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0), "max_connections": max_connections,
    }
    scheme, rest = url.split("://", 1)
    if scheme in TLS_SCHEMES:
        options.update(tls_options(tls))
    if not is_cluster(url):
        if scheme in TLS_SCHEMES:
            options["connection_class"] = TlsConnection
        pool = aioredis.ConnectionPool.from_url(url, health_check_interval=0, **options)
        return aioredis.Redis(connection_pool=pool)
    userinfo = rest.split("/", 1)[0].rpartition("@")[0]
    username, _, password = userinfo.partition(":")
    return SeededCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster_seeds(url)],
        username=unquote(username) or None, password=unquote(password) or None,
        ssl=scheme in TLS_SCHEMES,
        # one slot's MOVED patches that slot; a topology refresh only when the store asks for one
        reinitialize_steps=0, **options)


def by_node(client: Client, keys: list[str]) -> list[list[int]]:
    """The indexes of `keys`, grouped by the node that owns them (one group for a single Redis,
    or while a cluster's slots are unknown): one pipeline per group, so that a dead node fails
    only its own keys' commands."""
    if not isinstance(client, RedisCluster):
        return [list(range(len(keys)))]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        try:
            node = client.nodes_manager.get_node_from_slot(key_slot(key.encode())).name
        except RedisClusterException:
            node = ""
        groups.setdefault(node, []).append(i)
    return list(groups.values())
