"""The audit stores: memory keeps the newest `max_records`; Redis (one Valkey or a 3-master
cluster) shares records with a TTL, and on a cluster a dead node loses only its own records."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from redis.crc import key_slot
from sidecar_client.sidecar.admin.v1 import admin_pb2

from sidecar.call import AttemptRecord, Call, begin_call
from sidecar.errors import SidecarError
from sidecar.redis_client import connect
from sidecar.usage.audit import MemoryAudit, RedisAudit, audit_record
from sidecar.usage.record import Usage
from tests.harness.redis_cluster import start_valkey_cluster


def ended(request_id: str, routing_decision: str = "",
          decisions: tuple[tuple[str, str, str], ...] = ()) -> tuple[Usage, Call]:
    """An ended call with its usage record, as the usage finisher hands them to the store."""
    call = begin_call("Infer", b"", (("x-request-id", request_id),), None)
    call.routing_decision = routing_decision
    call.decisions.extend(decisions)
    call.attempts.append(AttemptRecord("b", "OK", 1.5, "10.0.0.2:8001"))
    return Usage(request_id=request_id, org="acme", status="OK"), call


def expected(usage: Usage, call: Call) -> admin_pb2.AuditRecord:
    return audit_record(usage.record(), call)


async def test_memory_audit_keeps_the_newest() -> None:
    store = MemoryAudit(max_records=3)
    kept = [ended(f"r{i}", "primary", (("route", "primary", "b"),)) for i in range(5)]
    for usage, call in kept:
        store.put(usage, call)
    assert len(store) == 3
    assert await store.get("r1") is None
    assert await store.get("r4") == expected(*kept[4])
    assert (await store.get("r4")) == admin_pb2.AuditRecord(
        request_id="r4", usage=kept[4][0].record(), routing_decision="primary",
        decisions=[admin_pb2.Decision(stage="route", result="primary", detail="b")],
        attempts=[admin_pb2.Attempt(backend="b", address="10.0.0.2:8001", status="OK", duration_ms=1.5)])


@pytest.mark.parametrize("url_fixture", ["redis_url", "redis_cluster_url"])
async def test_redis_audit_is_shared_and_expires(url_fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(url_fixture)  # one Valkey, or a 3-master cluster
    writer = RedisAudit(connect(url, 2.0, socket_timeout=2.0), ttl_seconds=60)
    reader = RedisAudit(connect(url, 2.0, socket_timeout=2.0), ttl_seconds=60)  # another sidecar
    request_ids = [f"audit-{uuid.uuid4().hex}" for _ in range(12)]  # on a cluster: spread over the nodes
    calls = [ended(request_id, "failover", (("route", "failover", "b"),)) for request_id in request_ids]
    records = [expected(usage, call) for usage, call in calls]
    client = connect(url, 2.0, socket_timeout=2.0)
    try:
        for usage, call in calls:
            writer.put(usage, call)
        await writer.flush()
        assert [await reader.get(request_id) for request_id in request_ids] == records
        assert await reader.get("missing-" + request_ids[0]) is None
        for request_id in request_ids:
            assert 0 < await client.ttl(f"sidecar:audit:{request_id}") <= 60
    finally:
        await client.aclose()
        await writer.aclose()
        await reader.aclose()


async def test_a_dead_cluster_node_loses_only_its_own_audit_records(tmp_path: Path) -> None:
    cluster = start_valkey_cluster(tmp_path)
    writer = RedisAudit(connect(cluster.url, 0.5, socket_timeout=0.5), ttl_seconds=60)
    try:
        request_ids = [f"audit-{uuid.uuid4().hex}" for _ in range(30)]
        slots = {request_id: key_slot(f"sidecar:audit:{request_id}".encode()) for request_id in request_ids}
        assert await writer.get(request_ids[0]) is None  # the writer has learned the slots
        dead = {request_id for request_id, slot in slots.items() if cluster.owner_of_slot(slot) == 0}
        cluster.kill(0)
        for request_id in request_ids:
            writer.put(*ended(request_id))
        await writer.flush()
        assert dead and len(dead) < len(request_ids)
        for request_id in request_ids:
            if request_id in dead:
                with pytest.raises(SidecarError):
                    await writer.get(request_id)
            else:
                assert await writer.get(request_id) == expected(*ended(request_id))
    finally:
        await writer.aclose()
        cluster.stop()
