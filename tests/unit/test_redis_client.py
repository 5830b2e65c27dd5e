"""`limits.redis_url` forms: one server, or a cluster's seeds (`redis+cluster://a:1,b:2`)."""
from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from sidecar.redis_client import cluster_seeds, connect, is_cluster, where


@pytest.mark.parametrize(("url", "seeds"), [
    ("redis+cluster://10.0.0.1:7000", [("10.0.0.1", 7000)]),
    ("redis+cluster://a:7000,b:7001, c:7002/", [("a", 7000), ("b", 7001), ("c", 7002)]),
    ("rediss+cluster://user:p%40ss@a:7000,b", [("a", 7000), ("b", 6379)]),
    ("redis+cluster://[::1]:7000", [("::1", 7000)]),
])
def test_cluster_seeds(url: str, seeds: list[tuple[str, int]]) -> None:
    assert is_cluster(url) and cluster_seeds(url) == seeds


@pytest.mark.parametrize("url", ["redis+cluster://a:0", "redis+cluster://a:x", "redis+cluster://:7000,b:1"])
def test_malformed_seeds_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        cluster_seeds(url)


async def test_the_url_chooses_the_client_and_logs_no_password() -> None:
    single = connect("redis://:secret@127.0.0.1:6390/0", 0.1, socket_timeout=None)
    cluster = connect("rediss+cluster://user:secret@127.0.0.1:7000,127.0.0.1:7001", 0.1, socket_timeout=None)
    try:
        assert isinstance(single, Redis) and isinstance(cluster, RedisCluster)
        assert where("redis://:secret@127.0.0.1:6390/0") == "127.0.0.1:6390"
        assert where("rediss+cluster://user:secret@h1:7000,h2:7001") == "cluster h1:7000,h2:7001"
        assert not is_cluster("redis://h:1") and not is_cluster("unix:///tmp/redis.sock")
    finally:
        await single.aclose()
        await cluster.aclose()


async def test_rediss_urls_get_connections_that_take_up_rotated_files() -> None:
    """`rediss://` and `rediss+cluster://` connect with `TlsConnection` and `limits.redis_tls`
    (the connections are made, not connected: nothing listens here); plaintext URLs never do."""
    from sidecar.config import ClientTlsConfig
    from sidecar.redis_client import TlsConnection

    tls = ClientTlsConfig(ca_file="/ca.pem", cert_file="/c.pem", key_file="/c.key", server_name="redis.internal")
    single = connect("rediss://127.0.0.1:6390/0", 0.1, socket_timeout=None, tls=tls)
    cluster = connect("rediss+cluster://127.0.0.1:7000,127.0.0.1:7001", 0.1, socket_timeout=None, tls=tls)
    plain = connect("redis://127.0.0.1:6390/0", 0.1, socket_timeout=None)
    try:
        assert isinstance(single, Redis) and isinstance(cluster, RedisCluster)
        connection = single.connection_pool.make_connection()
        assert isinstance(connection, TlsConnection) and connection.server_name == "redis.internal"
        assert (connection.ca_certs, connection.certfile, connection.keyfile) == ("/ca.pem", "/c.pem", "/c.key")
        assert connection.ssl_context.password == ""  # an encrypted key fails, never prompts
        for node in cluster.nodes_manager.startup_nodes.values():
            assert node.connection_class is TlsConnection
            assert node.connection_kwargs["ssl_server_name"] == "redis.internal"
            assert node.connection_kwargs["ssl_password"] == ""
        assert cluster.nodes_manager.connection_kwargs["connection_class"] is TlsConnection  # nodes learnt later
        assert not isinstance(plain.connection_pool.make_connection(), TlsConnection)
    finally:
        for client in (single, cluster, plain):
            await client.aclose()
