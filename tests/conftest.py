"""Shared pytest fixtures.

Sections are owned by different parts of the suite; add new fixtures in their own
clearly headed section rather than inside another one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.redis_cluster import ValkeyCluster, start_valkey_cluster
from tests.harness.servers import TANSU_STOP_TIMEOUT, TansuBroker, start_tansu, start_valkey
from tests.harness.sidecar import BackendProc, SidecarProc, start_backend, start_sidecar

# --- external servers: Valkey, Tansu ---
#
# Real servers on ephemeral loopback ports, stopped by pid at teardown even when
# the test fails. Set REDIS_URL / KAFKA_BOOTSTRAP to reuse servers you run yourself.


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``redis://`` URL shared by the whole session: $REDIS_URL, or a Valkey started once.

    Tests share the database, so use unique key names (e.g. a uuid prefix).
    """
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    proc, url = start_valkey(tmp_path_factory.mktemp("valkey"))
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """A 3-master Redis Cluster (valkey-server nodes joined by the harness) shared by the session.

    Tests share it, so use unique key names (a uuid org); a test that kills or reshapes nodes
    starts its own with `start_valkey_cluster`."""
    cluster = start_valkey_cluster(tmp_path_factory.mktemp("valkey-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[ValkeyCluster]:
    """A 3-master Redis Cluster owned by one test: free to kill masters and move slots."""
    cluster = start_valkey_cluster(tmp_path / "own-cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: ValkeyCluster) -> str:
    """The `redis+cluster://` URL of the session's cluster (every node a seed)."""
    return redis_cluster.url


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka bootstrap ``host:port`` shared by the session: $KAFKA_BOOTSTRAP, or a Tansu started once.

    Tests share the broker, so use unique topic names. Never kill or freeze this
    one -- use ``fresh_tansu`` for chaos.
    """
    external = os.environ.get("KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    proc, bootstrap = start_tansu(tmp_path_factory.mktemp("tansu"))
    try:
        yield bootstrap
    finally:
        proc.stop(timeout=TANSU_STOP_TIMEOUT)


@pytest.fixture
def fresh_tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A Tansu broker owned by this test alone, for chaos: kill, SIGSTOP/SIGCONT, restart.

    Teardown stops whatever process ``broker.proc`` is at the end (after restarts).
    """
    workdir = tmp_path_factory.mktemp("fresh-tansu")
    proc, bootstrap = start_tansu(workdir)
    broker = TansuBroker(proc=proc, bootstrap=bootstrap, workdir=workdir)
    try:
        yield broker
    finally:
        broker.stop()


# --- end external servers ---


# --- the project's own processes: demo backends, sidecars ---
#
# Started through their console commands as separate processes; stopped by pid at teardown.


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendProc]:
    """One demo backend (8 tokens, no delay) shared by the session; tests filter its log by request id."""
    proc = start_backend(tmp_path_factory.mktemp("backend"))
    try:
        yield proc
    finally:
        proc.proc.stop()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Starts backends and sidecars for one test and stops all of them afterwards."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


class Launcher:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[BackendProc | SidecarProc] = []

    def backend(self, *args: str, port: int | None = None) -> BackendProc:
        proc = start_backend(self.workdir, *args, port=port)
        self._procs.append(proc)
        return proc

    def sidecar(self, config_text: str) -> SidecarProc:
        proc = start_sidecar(self.workdir, config_text)
        self._procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for item in reversed(self._procs):
            item.proc.stop()


# --- end project processes ---
