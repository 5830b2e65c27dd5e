"""`usage.sink: kafka`: every record goes to the write-ahead spool, then to an idempotent
confluent-kafka producer (`acks=all`, compressed, key = org, headers naming the schema).

- The call path only queues the record (`submit`). The spool writer's batch (every
  `fsync_interval_ms`, at once under `strict`) serializes and spools what queued, in one go: per
  record that is cheaper than doing each on its own call's path.
- A record is handed to the producer only once it is in its segment file (`Spool.stored`):
  right after the batch's write() under `interval`, after its fsync under `strict`. A record the
  disk does not take (full, failing) is not sent before it is written.

- A delivery report settles the record in the spool (`ack`). A retriable failure (a broker
  down past `delivery_timeout_ms`, a full producer queue) leaves it WAITING in the spool; the
  replay task sends WAITING records again from disk, with a backoff that doubles up to 30 s
  while Kafka keeps failing and resets on the next acknowledgement. Replay also runs at start,
  for what an earlier process left behind.
- A record Kafka rejects for good (bigger than the topic's `max_message_bytes`, not authorized,
  invalid) goes to the dead-letter store, then leaves the spool.
- A producer can end up unusable: a fatal error, or, after a broker lost its state (restarted
  empty), an endless run of epoch bumps that ends in timeouts. Either is detected (the fatal
  error, `producer_epoch` climbing in the statistics, or delivery timeouts) and the producer is
  replaced by a new one; what the old one had not delivered is sent again from the spool.
- Kafka is `up` while the producer has a broker connection and records in flight get delivery
  reports: a frozen or wedged broker keeps its TCP connections (librdkafka still calls it UP),
  so records in flight without any acknowledgement for `STALL_SECONDS` mark it down too.

Callbacks run on the event loop: a named task polls the producer every 50 ms. Each
callback carries its producer's generation; callbacks of a replaced producer are ignored.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.config import ConfigError, UsageConfig, UsageKafkaConfig
from sidecar.tasks import Tasks
from sidecar.telemetry.logging import REPEAT_LOG_SECONDS, LogThrottle
from sidecar.telemetry.metrics import (
    BUFFER_STORE_AGE,
    BUFFER_STORE_BYTES,
    BUFFER_STORE_RETRIES,
    BUFFER_STORE_SIZE,
    KAFKA_PRODUCER_REBUILDS,
    KAFKA_UP,
    USAGE_DEAD_LETTERED,
    USAGE_DLQ_RECORDS,
    USAGE_PUBLISH_SECONDS,
    USAGE_RECORDS_PUBLISHED,
)
from sidecar.usage.dlq import DeadLetters
from sidecar.usage.record import SCHEMA, Usage
from sidecar.usage.spool import IN_FLIGHT, WAITING, Spool

log = logging.getLogger("sidecar.usage.kafka")

HEADERS: list[tuple[str, str | bytes | None]] = [("schema", SCHEMA.encode()), ("content-type", b"application/x-protobuf")]
HEADER_BYTES = sum(len(k) + len(v or b"") for k, v in HEADERS)
POLL_SECONDS = 0.05        # delivery reports and statistics are read this often (bookkeeping only)
MAX_BACKOFF_SECONDS = 30.0
EPOCH_STORM = 3            # producer epoch bumps within one statistics interval: the producer is stuck
STALL_SECONDS = 5.0        # records in flight with no acknowledgement this long: Kafka is down
STATS_INTERVAL_MS = 1000
# errors that will not go away by sending the same record again
PERMANENT = {getattr(KafkaError, name): reason for name, reason in (
    ("MSG_SIZE_TOO_LARGE", "MSG_SIZE_TOO_LARGE"),
    ("INVALID_MSG_SIZE", "MSG_SIZE_TOO_LARGE"),
    ("TOPIC_AUTHORIZATION_FAILED", "TOPIC_AUTHORIZATION_FAILED"),
    ("INVALID_RECORD", "INVALID_RECORD"),
    ("INVALID_MSG", "INVALID_RECORD"),
    ("TOPIC_EXCEPTION", "INVALID_TOPIC"),
) if hasattr(KafkaError, name)}


class ClientLog:
    """librdkafka's own log lines (confluent-kafka calls `log(level, "%s [%s] %s", facility,
    client, text)` on the thread that polls), with repeats thinned out by a `LogThrottle`.

    librdkafka retries a failing broker every 50-500 ms and logs the same error each time (a
    SASL mismatch, a refused connection): one line per retry would bury everything else. A kind
    is the line with its digits blanked (addresses, "after 0ms", producer numbers) and without
    librdkafka's own "N identical error(s) suppressed", so the first line is logged in full and
    its repeats come at most once per `interval` with their count.
    """

    _VARYING = re.compile(r", \d+ identical error\(s\) suppressed|\d+")

    def __init__(self, logger: logging.Logger, interval: float = REPEAT_LOG_SECONDS) -> None:
        self.throttle = LogThrottle(logger, interval)

    def log(self, level: int, msg: str, *args: object) -> None:
        text = msg % args if args else msg
        self.throttle.log(level, self._VARYING.sub("#", text), "%s", text)

    def settle(self) -> int:
        """Kafka is reachable again: the repeats never reported; the next error logs in full."""
        return self.throttle.settle()


CLIENT_LOG = ClientLog(logging.getLogger("sidecar.usage.librdkafka"))
_ERROR_LOG = LogThrottle(log)   # the producers' error_cb reports, thinned out the same way


def producer_config(kafka: UsageKafkaConfig) -> dict[str, Any]:
    """librdkafka settings for the delivery guarantee; `properties` add security and the like."""
    return {
        **kafka.properties,
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": kafka.client_id,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": kafka.compression,
        "linger.ms": kafka.linger_ms,
        "message.timeout.ms": kafka.delivery_timeout_ms,
        "message.max.bytes": max(1000, kafka.max_message_bytes + 512),
        "statistics.interval.ms": STATS_INTERVAL_MS,
        "log_level": 4,
        "logger": CLIENT_LOG,
    }


def oversize(kafka: UsageKafkaConfig, key: bytes, payload: bytes) -> str:
    """Why the record cannot go to the topic because of its size ("" if it can)."""
    size = len(key) + len(payload) + HEADER_BYTES
    if size > kafka.max_message_bytes:
        return f"{size} bytes; usage.kafka.max_message_bytes is {kafka.max_message_bytes}"
    return ""


def org_of(payload: bytes) -> bytes:
    try:
        return usage_pb2.UsageRecord.FromString(payload).org.encode()
    except Exception:  # noqa: BLE001 - an unreadable record still has to go somewhere
        return b""


class KafkaSink:
    name = "kafka"
    can_refuse = True

    def __init__(self, config: UsageConfig, spool: Spool, dead_letters: DeadLetters) -> None:
        self._kafka = config.kafka
        self._topic = config.kafka.topic
        self._strict = config.durability == "strict"
        self.spool = spool
        self.dead_letters = dead_letters
        self._tasks = Tasks()
        self._generation = 0
        self._producer: Producer | None = None
        self._rebuilt_generation = -1
        self._base_backoff = config.kafka.replay_backoff_ms / 1000.0
        self._backoff = self._base_backoff
        self._paused_until = 0.0         # after a full producer queue, records wait in the spool
        self._replay_wanted = asyncio.Event()
        self._replay_at = 0.0
        self._last_epoch: int | None = None
        self.kafka_up = False
        self._broker_up = False          # librdkafka has a broker connection UP
        self._stalled = False            # records in flight, no acknowledgement for STALL_SECONDS
        self._acked_at = time.monotonic()  # the last acknowledgement, or the last moment nothing was in flight
        self._down_logged = False
        self._published = USAGE_RECORDS_PUBLISHED.labels(self.name)
        self._acked = 0                  # acknowledgements not yet added to the metric (per poll)
        self._publish_seconds = USAGE_PUBLISH_SECONDS.labels(self.name)
        self._closing = False
        self._queued: list[Usage] = []   # submitted, not spooled yet
        self._unproduced: list[tuple[int, bytes, bytes]] = []  # (seq, key, payload) spooled, not in its file yet
        spool.source = self._spool_queued
        spool.on_stored = self._produce_stored
        BUFFER_STORE_SIZE.set_function(spool.unsettled)
        BUFFER_STORE_BYTES.set_function(lambda: spool.size_bytes)
        BUFFER_STORE_AGE.set_function(spool.oldest_age)
        USAGE_DLQ_RECORDS.set_function(dead_letters.count)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """The first producer, then the spool and the replay of what an earlier run left. A
        producer librdkafka refuses to build (a property it does not know, an `ssl.*.location`
        it cannot load) is a config error: `sidecar run` exits 2 naming the key."""
        try:
            self._producer = self._new_producer()
        except KafkaException as exc:
            raise ConfigError([f"usage.kafka.properties: librdkafka refuses them: {exc.args[0].str()}"]) from None
        self.spool.start()
        self._tasks.spawn(self._poll_loop(), name="kafka-poll")
        self._tasks.spawn(self._replay_loop(), name="usage-replay")
        if self.spool.waiting():
            log.info("replaying spooled usage records", extra={"records": self.spool.waiting()})
            self._replay_wanted.set()

    def _new_producer(self) -> Producer:
        """A producer of the next generation; librdkafka reads the files its properties name
        (`ssl.*.location`) now, so a replaced producer takes up rotated certificates. Raises
        `KafkaException` when librdkafka refuses, leaving the generation as it was."""
        generation = self._generation + 1
        producer = Producer({**producer_config(self._kafka),
                             "error_cb": partial(self._on_error, generation),
                             "stats_cb": partial(self._on_stats, generation)})
        self._generation, self._last_epoch = generation, None
        return producer

    async def aclose(self, timeout: float = 5.0) -> None:
        """Waits up to `timeout` for outstanding deliveries; what is left stays in the spool."""
        self._closing = True
        await self.spool.flush()  # what is queued goes to the spool and the producer first
        deadline = time.monotonic() + min(timeout, self._kafka.delivery_timeout_ms / 1000.0)
        producer = self._producer
        while producer is not None and len(producer) and time.monotonic() < deadline:
            producer.poll(0)
            await asyncio.sleep(POLL_SECONDS)
        await self._tasks.aclose(timeout=0)
        self._published.inc(self._acked)
        self._acked = 0
        if producer is not None:
            left = len(producer)
            self._generation += 1  # late callbacks of this producer are ignored
            if left:
                log.warning("usage records not acknowledged at shutdown stay in the spool", extra={"records": left})
            await asyncio.to_thread(_dispose, producer)
        await self.spool.aclose()

    # --- the record path -------------------------------------------------------------------

    def submit(self, usage: Usage) -> Awaitable[None] | None:
        """Queues the record: the spool writer's next batch spools and produces it."""
        self._queued.append(usage)
        if len(self._queued) == 1:
            self.spool.wake()
        return self.spool.durable() if self._strict else None

    def _spool_queued(self) -> None:
        """The spool writer's `source`: each queued record is spooled, IN_FLIGHT to be produced
        once it is in its file (`_produce_stored`), or WAITING for replay while Kafka is paused."""
        queued, self._queued = self._queued, []
        paused = time.monotonic() < self._paused_until or self._producer is None
        for usage in queued:
            payload = usage.record().SerializeToString()
            if paused:
                self.spool.append(payload, WAITING)
            else:
                self._unproduced.append((self.spool.append(payload, IN_FLIGHT), usage.org.encode(), payload))
        if paused and queued:
            self._replay_soon()

    def _produce_stored(self) -> None:
        """The spool's `on_stored`: the records that are in their segment file now go to the
        producer (or back to WAITING, for replay, while Kafka is paused); the others wait."""
        records, self._unproduced = self._unproduced, []
        later: list[tuple[int, bytes, bytes]] = []
        for seq, key, payload in records:
            stored = self.spool.stored(seq)
            if stored is None:
                continue  # dropped (drop_oldest), or handed back to replay (a replaced producer)
            if not stored:
                later.append((seq, key, payload))
            elif time.monotonic() < self._paused_until or self._producer is None:
                self.spool.set_waiting(seq)
                self._replay_soon()
            else:
                self._produce(seq, key, payload)
        self._unproduced = later + self._unproduced

    def refusing(self) -> bool:
        return self.spool.refusing

    def _produce(self, seq: int, key: bytes, payload: bytes) -> bool:
        """Hands an IN_FLIGHT record to the producer; False when it had to stay in the spool."""
        too_large = oversize(self._kafka, key, payload)
        if too_large:
            self._dead_letter(seq, payload, "MSG_SIZE_TOO_LARGE", too_large)
            return True
        assert self._producer is not None
        try:
            self._producer.produce(self._topic, value=payload, key=key, headers=HEADERS,
                                   on_delivery=partial(self._delivered, self._generation, seq))
        except BufferError:
            self.spool.set_waiting(seq)
            self._pause("the producer's queue is full")
            return False
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            reason = PERMANENT.get(error.code())
            if reason is not None:
                self._dead_letter(seq, payload, reason, error.str())
                return True
            self.spool.set_waiting(seq)
            if _fatal(error):
                self._rebuild("fatal", error.str())
            else:
                self._pause(error.str())
            return False
        return True

    def _delivered(self, generation: int, seq: int, error: KafkaError | None, message: Any) -> None:
        if generation != self._generation:
            return
        if error is None:
            self.spool.ack(seq)
            self._acked += 1
            self._publish_seconds.observe(message.latency() or 0.0)  # from produce() to the broker's ack
            self._backoff = self._base_backoff
            self._acked_at = time.monotonic()
            if not self.kafka_up:
                self._broker_up, self._stalled = True, False
                self._update_up()
            return
        code = error.code()
        reason = PERMANENT.get(code)
        if reason is not None:
            self._acked_at = time.monotonic()  # the broker answered
            self._dead_letter(seq, message.value(), reason, error.str())
            return
        self.spool.set_waiting(seq)
        if _fatal(error):
            self._rebuild("fatal", error.str())
        elif code == KafkaError._MSG_TIMED_OUT:
            self._rebuild("timeout", error.str())
        self._replay_soon(failed=True)

    def _dead_letter(self, seq: int, payload: bytes, reason: str, detail: str) -> None:
        self._tasks.spawn(self._store_dead_letter(seq, payload, reason, detail), name="usage-dead-letter")

    async def _store_dead_letter(self, seq: int, payload: bytes, reason: str, detail: str) -> None:
        try:
            entry = await asyncio.to_thread(self.dead_letters.add, payload, reason, detail)
        except OSError as exc:
            log.error("cannot write to the DLQ; the record stays in the spool", extra={"error": str(exc)})
            self.spool.set_waiting(seq)
            self._replay_soon(failed=True)
            return
        self.spool.ack(seq)
        USAGE_DEAD_LETTERED.labels(reason).inc()
        log.error("usage record rejected by Kafka for good: moved to the DLQ", extra={
            "event_id": entry.event_id, "org": entry.org, "reason": reason, "detail": detail})

    # --- producer health -------------------------------------------------------------------

    def _on_error(self, generation: int, error: KafkaError) -> None:
        if generation != self._generation:
            return
        if _fatal(error):
            self._rebuild("fatal", error.str())
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._broker_up = False
            self._update_up()
        else:
            _ERROR_LOG.log(logging.DEBUG, error.name(), "kafka producer error", extra={"error": error.str()})

    def _on_stats(self, generation: int, text: str) -> None:
        if generation != self._generation:
            return
        stats = json.loads(text)
        brokers = stats.get("brokers", {}).values()
        self._broker_up = any(b.get("state") == "UP" for b in brokers)
        self._update_up()
        epoch = stats.get("eos", {}).get("producer_epoch")
        if isinstance(epoch, int) and epoch >= 0:
            if self._last_epoch is not None and epoch - self._last_epoch >= EPOCH_STORM and stats.get("msg_cnt", 0):
                self._rebuild("stuck", f"producer epoch went from {self._last_epoch} to {epoch} in "
                                       f"{STATS_INTERVAL_MS} ms without deliveries")
            self._last_epoch = epoch

    def _watch_stall(self, producer: Producer) -> None:
        """From the poll loop: records in flight with no acknowledgement for STALL_SECONDS (a
        frozen broker answers nothing, yet its connections stay UP) mean Kafka is down."""
        now = time.monotonic()
        in_flight = len(producer)
        if not in_flight:
            self._acked_at = now
        stalled = bool(in_flight) and now - self._acked_at > STALL_SECONDS
        if stalled != self._stalled:
            self._stalled = stalled
            if stalled:
                log.warning("kafka does not acknowledge: records in flight got no delivery report",
                            extra={"seconds": STALL_SECONDS, "in_flight": in_flight})
            self._update_up()

    def _update_up(self) -> None:
        up = self._broker_up and not self._stalled
        if up == self.kafka_up:
            return
        self.kafka_up = up
        KAFKA_UP.set(1 if up else 0)
        if up:
            _ERROR_LOG.settle()   # the same errors as librdkafka's lines: counted there
            log.info("kafka reachable", extra={"bootstrap_servers": self._kafka.bootstrap_servers,
                                               "client_errors_not_logged": CLIENT_LOG.settle()})
            self._down_logged = False
            if self.spool.waiting():
                self._replay_soon()
        elif not self._down_logged:
            self._down_logged = True
            log.warning("kafka unreachable: usage records wait in the spool",
                        extra={"bootstrap_servers": self._kafka.bootstrap_servers})

    def _rebuild(self, cause: str, detail: str) -> None:
        """Replaces the producer (once per generation); its undelivered records go back to WAITING."""
        if self._rebuilt_generation == self._generation or self._closing:
            return
        self._rebuilt_generation = self._generation
        old = self._producer
        try:
            self._producer = self._new_producer()
        except KafkaException as exc:  # e.g. certificate files rotated into a state librdkafka cannot load
            self._rebuilt_generation = -1  # tried again at the next failure
            _ERROR_LOG.log(logging.ERROR, "producer refused", "kafka producer cannot be replaced: librdkafka "
                           "refuses its properties; records wait in the spool",
                           extra={"cause": cause, "error": exc.args[0].str()})
            return
        requeued = self.spool.requeue_in_flight()  # what was not stored yet, too: replay sends it once it is
        self._unproduced.clear()
        self._broker_up = False  # until the new producer's statistics or acknowledgements say otherwise
        self._update_up()
        KAFKA_PRODUCER_REBUILDS.labels(cause).inc()
        log.warning("kafka producer replaced", extra={"cause": cause, "detail": detail, "requeued": requeued,
                                                      "generation": self._generation})
        if old is not None:
            self._tasks.spawn(asyncio.to_thread(_dispose, old), name="kafka-dispose")
        self._replay_soon()

    def _pause(self, why: str) -> None:
        if time.monotonic() >= self._paused_until:
            log.warning("usage records wait in the spool", extra={"why": why, "retry_in_s": self._backoff})
        self._paused_until = time.monotonic() + self._backoff
        self._replay_soon(failed=True)

    # --- replay ----------------------------------------------------------------------------

    def _replay_soon(self, failed: bool = False) -> None:
        """Asks for a replay pass: at once, or after the backoff when Kafka just failed."""
        if failed:
            self._replay_at = max(self._replay_at, time.monotonic() + self._backoff)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_SECONDS)
        if not self._replay_wanted.is_set():
            self._replay_wanted.set()

    async def _replay_loop(self) -> None:
        while True:
            await self._replay_wanted.wait()
            delay = max(self._replay_at - time.monotonic(), self._paused_until - time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
            self._replay_wanted.clear()
            sent = await self._replay_pass()
            if sent:
                BUFFER_STORE_RETRIES.inc(sent)
                log.info("usage records sent again from the spool", extra={"records": sent})
            if self.spool.waiting() and not self._replay_wanted.is_set():
                # not on disk yet, or the producer refused some: look again shortly
                self._replay_at = time.monotonic() + self._base_backoff
                self._replay_wanted.set()

    async def _replay_pass(self) -> int:
        sent = 0
        async for seq, payload in self.spool.waiting_records():
            if self._producer is None or time.monotonic() < self._paused_until:
                break
            if not self.spool.set_in_flight(seq):
                continue
            if not self._produce(seq, org_of(payload), payload):
                break
            sent += 1
            if sent % 500 == 0:
                self._producer.poll(0)
                await asyncio.sleep(0)
        return sent

    async def _poll_loop(self) -> None:
        while True:
            producer = self._producer
            if producer is not None:
                try:
                    producer.poll(0)
                except KafkaException as exc:  # a fatal error surfaces here too
                    error: KafkaError = exc.args[0]
                    if producer is self._producer and _fatal(error):
                        self._rebuild("fatal", error.str())
                    else:
                        log.warning("kafka producer error", extra={"error": error.str()})
                if self._acked:
                    self._published.inc(self._acked)
                    self._acked = 0
                self._watch_stall(producer)
            await asyncio.sleep(POLL_SECONDS)

    # --- state -----------------------------------------------------------------------------

    def component(self) -> dict[str, Any]:
        spool = self.spool.component()
        if spool["status"] != "ok":
            status = spool["status"]
        elif not self.kafka_up or spool["waiting"]:
            status = "degraded"
        else:
            status = "ok"
        return {"status": status, "sink": self.name, "topic": self._topic,
                "kafka": "up" if self.kafka_up else "down", "delivery_stalled": self._stalled,
                "producer_generation": self._generation,
                "queued": len(self._queued),  # submitted, spooled with the writer's next batch
                "unstored": len(self._unproduced),  # spooled, produced once they are in their file
                "in_flight": len(self._producer) if self._producer is not None else 0,
                "spool": spool, "dlq_open": self.dead_letters.count()}

    def __repr__(self) -> str:
        return f"<KafkaSink topic={self._topic} generation={self._generation} {self.spool!r}>"


def _fatal(error: KafkaError) -> bool:
    """The producer cannot go on (librdkafka reports it as a fatal error, or refuses with _FATAL)."""
    return bool(error.fatal()) or error.code() == KafkaError._FATAL


def _dispose(producer: Producer) -> None:
    """Drops a producer's undelivered messages and destroys it (blocking; runs in a thread)."""
    try:
        producer.purge()
        producer.flush(0)
    except KafkaException:
        pass
