"""The audit store: each recent call's decision record, by request id, for `Audit.GetRequest`.

Bounded: in memory (the default) the oldest records go once `max_records` are kept; in Redis
(`audit.store: redis`, the limit store's Redis) records expire after `ttl_seconds`, and every
sidecar sharing that Redis can answer for any of them. Writing to Redis is batched every 50 ms
in the background: a caller never waits for its audit record.

Each record is small (about a kilobyte), so `max_records` bounds the memory: every string a caller
sends that a record keeps (model, session, request id) is bounded when the call arrives, and a
request refused for it is refused before authentication and leaves no record (`call.py`). Before
that bound, 90 calls with a 4 MB model name held 1.27 GB here.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisClusterException, RedisError
from sidecar_client.sidecar.admin.v1 import admin_pb2
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.call import AttemptRecord, Call
from sidecar.errors import SidecarError
from sidecar.redis_client import Client, by_node
from sidecar.tasks import Batcher
from sidecar.usage.record import Usage

log = logging.getLogger("sidecar.audit")
BATCH_SECONDS = 0.05


class AuditStore(Protocol):
    def put(self, usage: Usage, call: Call) -> None:
        """Keeps the ended call's audit record: its usage record, decisions and attempts."""

    async def get(self, request_id: str) -> admin_pb2.AuditRecord | None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Kept:
    """What an audit record is made of, kept as it is: the record itself is built only when it
    is asked for (`Audit.GetRequest`, rare), not for every call (~10 µs each)."""

    usage: Usage
    routing_decision: str
    decisions: tuple[tuple[str, str, str], ...]
    attempts: tuple[AttemptRecord, ...]

    def record(self) -> admin_pb2.AuditRecord:
        return _record(self.usage.record(), self.routing_decision, self.decisions, self.attempts)


class MemoryAudit:
    def __init__(self, max_records: int) -> None:
        self._max = max_records
        self._records: OrderedDict[str, _Kept] = OrderedDict()

    def put(self, usage: Usage, call: Call) -> None:
        request_id = call.request_id
        self._records[request_id] = _Kept(usage, call.routing_decision, tuple(call.decisions), tuple(call.attempts))
        self._records.move_to_end(request_id)
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    async def get(self, request_id: str) -> admin_pb2.AuditRecord | None:
        kept = self._records.get(request_id)
        return kept.record() if kept is not None else None

    async def aclose(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._records)


class RedisAudit:
    def __init__(self, redis: Client, ttl_seconds: int) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._batches = Batcher(self._write, BATCH_SECONDS, name="audit-writer")

    def put(self, usage: Usage, call: Call) -> None:
        self._batches.add(audit_record(usage.record(), call))

    async def flush(self) -> None:
        await self._batches.flush()

    async def _write(self, batch: list[admin_pb2.AuditRecord]) -> None:
        """One pipeline per node (on a Redis Cluster): a dead node loses only its own records."""
        groups = by_node(self._redis, [_key(record.request_id) for record in batch])
        await asyncio.gather(*(self._write_some([batch[i] for i in group]) for group in groups))

    async def _write_some(self, records: list[admin_pb2.AuditRecord]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for record in records:
            pipe.set(_key(record.request_id), record.SerializeToString(), ex=self._ttl)
        try:
            await pipe.execute()
        except (RedisError, RedisClusterException) as exc:
            log.warning("audit records lost: Redis unavailable", extra={"records": len(records), "error": str(exc)})

    async def get(self, request_id: str) -> admin_pb2.AuditRecord | None:
        try:
            raw = await self._redis.get(_key(request_id))
        except (RedisError, RedisClusterException):
            raise SidecarError("SERVICE_UNAVAILABLE", "the audit store (Redis) is unavailable") from None
        if raw is None:
            return None
        return admin_pb2.AuditRecord.FromString(raw if isinstance(raw, bytes) else raw.encode("latin-1"))

    async def aclose(self) -> None:
        await self._batches.aclose()
        await self._redis.aclose()


def _key(request_id: str) -> str:
    return f"sidecar:audit:{request_id}"


def audit_record(usage: usage_pb2.UsageRecord, call: Call) -> admin_pb2.AuditRecord:
    """The audit record of an ended call: its usage record, decisions and attempts."""
    return _record(usage, call.routing_decision, call.decisions, call.attempts)


def _record(usage: usage_pb2.UsageRecord, routing_decision: str, decisions: Sequence[tuple[str, str, str]],
            attempts: Sequence[AttemptRecord]) -> admin_pb2.AuditRecord:
    return admin_pb2.AuditRecord(
        request_id=usage.request_id, usage=usage, routing_decision=routing_decision,
        decisions=[admin_pb2.Decision(stage=s, result=r, detail=d) for s, r, d in decisions],
        attempts=[admin_pb2.Attempt(backend=a.backend, address=a.address, status=a.status, duration_ms=a.duration_ms)
                  for a in attempts])
