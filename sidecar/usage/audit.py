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
from typing import Protocol

from redis.exceptions import RedisClusterException, RedisError
from sidecar_client.sidecar.admin.v1 import admin_pb2
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.call import Call
from sidecar.errors import SidecarError
from sidecar.redis_client import Client, by_node
from sidecar.tasks import Batcher

log = logging.getLogger("sidecar.audit")
BATCH_SECONDS = 0.05


class AuditStore(Protocol):
    def put(self, record: admin_pb2.AuditRecord) -> None: ...

    async def get(self, request_id: str) -> admin_pb2.AuditRecord | None: ...

    async def aclose(self) -> None: ...


class MemoryAudit:
    def __init__(self, max_records: int) -> None:
        self._max = max_records
        self._records: OrderedDict[str, admin_pb2.AuditRecord] = OrderedDict()

    def put(self, record: admin_pb2.AuditRecord) -> None:
        self._records[record.request_id] = record
        self._records.move_to_end(record.request_id)
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    async def get(self, request_id: str) -> admin_pb2.AuditRecord | None:
        return self._records.get(request_id)

    async def aclose(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._records)


class RedisAudit:
    def __init__(self, redis: Client, ttl_seconds: int) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._batches = Batcher(self._write, BATCH_SECONDS, name="audit-writer")

    def put(self, record: admin_pb2.AuditRecord) -> None:
        self._batches.add(record)

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
    return admin_pb2.AuditRecord(
        request_id=call.request_id, usage=usage, routing_decision=call.routing_decision,
        decisions=[admin_pb2.Decision(stage=s, result=r, detail=d) for s, r, d in call.decisions],
        attempts=[admin_pb2.Attempt(backend=a.backend, address=a.address, status=a.status, duration_ms=a.duration_ms)
                  for a in call.attempts])
