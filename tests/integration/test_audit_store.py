"""The audit stores: memory keeps the newest `max_records`; Redis shares records with a TTL."""
from __future__ import annotations

import uuid

import redis.asyncio as aioredis
from sidecar_client.sidecar.admin.v1 import admin_pb2

from sidecar.usage.audit import MemoryAudit, RedisAudit


async def test_memory_audit_keeps_the_newest() -> None:
    store = MemoryAudit(max_records=3)
    for i in range(5):
        store.put(admin_pb2.AuditRecord(request_id=f"r{i}"))
    assert len(store) == 3
    assert await store.get("r1") is None and (await store.get("r4")) == admin_pb2.AuditRecord(request_id="r4")


async def test_redis_audit_is_shared_and_expires(redis_url: str) -> None:
    writer = RedisAudit(aioredis.Redis.from_url(redis_url), ttl_seconds=60)
    reader = RedisAudit(aioredis.Redis.from_url(redis_url), ttl_seconds=60)  # another sidecar
    request_id = f"audit-{uuid.uuid4().hex}"
    record = admin_pb2.AuditRecord(request_id=request_id, routing_decision="failover",
                                   decisions=[admin_pb2.Decision(stage="route", result="failover", detail="b")])
    try:
        writer.put(record)
        await writer.flush()
        assert await reader.get(request_id) == record
        assert await reader.get("missing-" + request_id) is None
        client = aioredis.Redis.from_url(redis_url)
        assert 0 < await client.ttl(f"sidecar:audit:{request_id}") <= 60
        await client.aclose()
    finally:
        await writer.aclose()
        await reader.aclose()
