"""Redis over TLS (`rediss://`, `limits.redis_tls`), through real `sidecar run` processes and a
real Redis serving TLS only (`start_redis_tls`), every handshake a real one.

With a client certificate Redis requires (`tls-auth-clients yes`), two sidecars share a rate
limit, the audit records and the routing overrides. Without the certificate, or trusting the
wrong CA, the store is unavailable: `on_store_error` decides, and `/readyz` names the TLS error
without any certificate content. A client certificate rotated on disk (an atomic symlink swap,
as Kubernetes does with a mounted Secret) is used by the next connection, without a restart.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from redis.crc import key_slot
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.grpc.test_proxy import INFER
from tests.harness.certs import Issued, Pki
from tests.harness.procs import wait_until
from tests.harness.redis_cluster import ClusterTls, start_valkey_cluster
from tests.harness.servers import TlsRedis, start_redis_tls
from tests.harness.sidecar import SIDECAR, BackendProc, SidecarProc, sidecar_config
from tests.harness.tls_checks import assert_nothing_leaked, swap

TOKEN = "adm-redis-tls-" + os.urandom(6).hex()
ADMIN = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("redis-pki"))


@pytest.fixture(scope="module")
def mtls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A Redis on TLS only that requires a client certificate signed by `pki`'s CA."""
    server = start_redis_tls(tmp_path_factory.mktemp("redis-tls"), pki, auth_clients="yes")
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Org:
    name: str
    key: str

    @classmethod
    def new(cls) -> Org:
        suffix = uuid.uuid4().hex[:8]  # the Redis is shared by the module's tests
        return cls(f"tls-{suffix}", f"sk-tls-{suffix}")


def tls_config(backend: BackendProc, url: str, tls: str, org: Org, *, on_error: str = "allow",
               extra: str = "") -> str:
    """One model, one org limited to a burst of 3 (then one call per 10 s), the limit store in
    Redis at `url` with `limits.redis_tls: {tls}`; a breaker that opens at the first error."""
    digest = hashlib.sha256(org.key.encode()).hexdigest()
    return sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{backend.address}"}}]
        """) + f"""health_checks: {{enabled: false}}
auth:
  api_keys: [{{id: app, sha256: "{digest}", org: {org.name}}}]
  admin_tokens: [{{id: ops, sha256: "{hashlib.sha256(TOKEN.encode()).hexdigest()}"}}]
limits:
  store: redis
  redis_url: {url}
  redis_tls: {tls}
  redis_timeout_ms: 1000
  on_store_error: {on_error}
  breaker_failures: 1
  breaker_cooldown_ms: 200
  orgs:
    {org.name}: {{requests_per_minute: 6, burst: 3}}
""" + extra


def mtls(pki: Pki, client: Issued) -> str:
    return f"{{ca_file: {pki.ca}, cert_file: {client.cert}, key_file: {client.key}}}"


def limits_component(sidecar: SidecarProc) -> dict[str, str]:
    component: dict[str, str] = sidecar.readyz()[1]["components"]["limits"]
    return component


def reason(sidecar: SidecarProc, org: Org, request_id: str = "") -> str | None:
    """One call of the org's; None when it was served, else the error's reason."""
    raw = InferRequest(model="chat", input="hello").SerializeToString()
    metadata = (("x-api-key", org.key), ("x-request-id", request_id or uuid.uuid4().hex))
    with grpc.insecure_channel(sidecar.listen) as channel:
        try:
            channel.unary_unary(INFER)(raw, timeout=5, metadata=metadata)
        except grpc.RpcError as error:
            return error_detail(error).reason
    return None


def decide_locally(sidecar: SidecarProc, org: Org) -> None:
    """A call decided by the sidecar alone (`on_store_error: allow`): it starts from one second's
    worth of the org's rate, not the burst, so this one is denied, locally, and counted."""
    before = metric(sidecar, "api_router_limit_degraded_decisions_total", {})
    assert reason(sidecar, org) in (None, "RATE_LIMIT_EXCEEDED")
    assert metric(sidecar, "api_router_limit_degraded_decisions_total", {}) == before + 1


def test_limits_audit_and_overrides_are_shared_over_mutual_tls(
        launch: Launcher, backend: BackendProc, pki: Pki, mtls_redis: TlsRedis, tmp_path: Path) -> None:
    org, client = Org.new(), pki.issue("sidecar", client=True, directory=tmp_path / "certs")
    shared = "audit: {store: redis}\noverrides: {store: redis, sync_interval_ms: 200}\n"
    one = launch.sidecar(tls_config(backend, mtls_redis.url, mtls(pki, client), org, extra=shared))
    two = launch.sidecar(tls_config(backend, mtls_redis.url, mtls(pki, client), org, extra=shared))

    # the burst of 3 is the org's across both sidecars: one limit, kept in Redis over TLS
    assert [reason(one, org), reason(two, org), reason(one, org)] == [None, None, None]
    assert reason(two, org) == reason(one, org) == "RATE_LIMIT_EXCEEDED"
    assert limits_component(one)["status"] == limits_component(two)["status"] == "ok"
    assert metric(one, "api_router_limit_degraded_decisions_total", {}) == 0

    # a call's audit record, written by one sidecar, is read by the other
    request_id = f"req-tls-{uuid.uuid4().hex[:8]}"
    assert reason(one, org, request_id) == "RATE_LIMIT_EXCEEDED"  # denials are audited too
    audit = admin_pb2_grpc.AuditStub(grpc.insecure_channel(two.admin_listen))

    def audited() -> admin_pb2.AuditRecord | None:
        try:
            record: admin_pb2.AuditRecord = audit.GetRequest(admin_pb2.GetRequestRequest(request_id=request_id),
                                                             metadata=ADMIN, timeout=5)
            return record
        except grpc.RpcError:
            return None
    record = wait_until(audited, 5, what="the audit record, through the other sidecar")
    assert isinstance(record, admin_pb2.AuditRecord)
    assert record.request_id == request_id and record.usage.org == org.name

    # an override set on one sidecar reaches the other
    routing = admin_pb2_grpc.RoutingAdminStub(grpc.insecure_channel(one.admin_listen))
    routing.SetOverride(admin_pb2.SetOverrideRequest(model="chat", backend="a", weight=0.5, ttl_seconds=60,
                                                     reason="tls"), metadata=ADMIN, timeout=5)
    other = admin_pb2_grpc.RoutingAdminStub(grpc.insecure_channel(two.admin_listen))
    wait_until(lambda: other.ListRoutes(admin_pb2.ListRoutesRequest(model="chat"), metadata=ADMIN,
                                        timeout=5).routes[0].overrides, 5, what="the override on the other sidecar")
    routing.ClearOverride(admin_pb2.ClearOverrideRequest(model="chat", backend="a"), metadata=ADMIN, timeout=5)
    assert_nothing_leaked(one, client.cert, client.key)


def test_without_the_client_certificate_the_store_is_unavailable_and_deny_refuses(
        launch: Launcher, backend: BackendProc, pki: Pki, mtls_redis: TlsRedis) -> None:
    org = Org.new()
    sidecar = launch.sidecar(tls_config(backend, mtls_redis.url, f"{{ca_file: {pki.ca}}}", org, on_error="deny"))
    assert reason(sidecar, org) == "SERVICE_UNAVAILABLE"
    component = limits_component(sidecar)
    assert component["status"] == "degraded" and component["on_store_error"] == "deny"
    assert "CERTIFICATE_REQUIRED" in component["error"], component  # Redis asked for one; none was sent
    assert reason(sidecar, org) == "SERVICE_UNAVAILABLE"  # still, while the breaker probes
    assert_nothing_leaked(sidecar, pki.ca)


def test_trusting_the_wrong_ca_makes_the_store_unavailable_and_allow_decides_locally(
        launch: Launcher, backend: BackendProc, pki: Pki, mtls_redis: TlsRedis, tmp_path: Path) -> None:
    org, client = Org.new(), pki.issue("sidecar", client=True, directory=tmp_path / "certs")
    other = Pki(tmp_path / "other", name="other-ca")
    tls = f"{{ca_file: {other.ca}, cert_file: {client.cert}, key_file: {client.key}}}"
    sidecar = launch.sidecar(tls_config(backend, mtls_redis.url, tls, org, on_error="allow"))
    decide_locally(sidecar, org)
    component = limits_component(sidecar)
    assert component["status"] == "degraded" and "CERTIFICATE_VERIFY_FAILED" in component["error"], component
    assert_nothing_leaked(sidecar, client.cert, client.key, other.ca)


def test_a_rotated_client_certificate_is_used_by_the_next_connection(
        launch: Launcher, backend: BackendProc, pki: Pki, mtls_redis: TlsRedis, tmp_path: Path) -> None:
    """The sidecar starts with a client certificate Redis does not accept (another CA signed it):
    degraded. The files are replaced by a good pair: the breaker's next probe connects with
    them, decisions are shared again. Then a bad pair again, and Redis drops the sidecar's
    connections (CLIENT KILL): the reconnection uses the new files, and fails. No restart."""
    org = Org.new()
    untrusted = Pki(tmp_path / "untrusted", name="untrusted-ca")
    generations = {"bad-1": untrusted.issue("client", client=True, directory=tmp_path / "bad-1"),
                   "good": pki.issue("client", client=True, directory=tmp_path / "good"),
                   "bad-2": untrusted.issue("client", client=True, directory=tmp_path / "bad-2")}
    live = tmp_path / "live"  # live/client.pem and live/client.key: always one pair
    swap(live, tmp_path / "bad-1")
    tls = f"{{ca_file: {pki.ca}, cert_file: {live}/client.pem, key_file: {live}/client.key}}"
    sidecar = launch.sidecar(tls_config(backend, mtls_redis.url, tls, org, on_error="allow"))
    decide_locally(sidecar, org)
    assert limits_component(sidecar)["status"] == "degraded"

    swap(live, tmp_path / "good")
    wait_until(lambda: limits_component(sidecar)["status"] == "ok", 10, what="the store back with the new certificate")
    assert [reason(sidecar, org) for _ in range(4)] == [None, None, None, "RATE_LIMIT_EXCEEDED"]
    with mtls_redis.client() as admin:
        assert admin.keys(f"sidecar:rl:{{{org.name}}}*"), "the decisions were not made in Redis"

    swap(live, tmp_path / "bad-2")
    with mtls_redis.client() as admin:
        admin.client_kill_filter(_type="normal")  # every client but this one: the sidecar must reconnect

    def degraded() -> bool:
        reason(sidecar, org)  # a decision: it meets the dropped connection, the next one reconnects
        return limits_component(sidecar)["status"] == "degraded"
    wait_until(degraded, 10, what="the reconnection with the rotated (untrusted) certificate to fail")
    assert "UNKNOWN_CA" in limits_component(sidecar)["error"].upper()
    assert_nothing_leaked(sidecar, *(f for issued in generations.values() for f in (issued.cert, issued.key)))


def test_limits_are_shared_on_a_redis_cluster_over_mutual_tls(
        launch: Launcher, backend: BackendProc, pki: Pki, tmp_path: Path) -> None:
    """`rediss+cluster://`: every node speaks TLS only (the cluster bus too) and requires a
    client certificate; the seeds and the nodes learnt from them all get the sidecar's."""
    cluster = start_valkey_cluster(tmp_path / "cluster", tls=ClusterTls(pki))
    try:
        org, client = Org.new(), pki.issue("sidecar", client=True, directory=tmp_path / "certs")
        assert cluster.url.startswith("rediss+cluster://")
        one = launch.sidecar(tls_config(backend, cluster.url, mtls(pki, client), org))
        two = launch.sidecar(tls_config(backend, cluster.url, mtls(pki, client), org))
        assert [reason(one, org), reason(two, org), reason(one, org)] == [None, None, None]
        assert reason(two, org) == "RATE_LIMIT_EXCEEDED"
        assert limits_component(one)["status"] == limits_component(two)["status"] == "ok"
        owner = cluster.owner_of_slot(key_slot(org.name.encode()))
        with cluster.client(owner) as node:
            assert node.keys(f"sidecar:rl:{{{org.name}}}*"), "the decisions were not made on the org's master"
        assert_nothing_leaked(one, client.cert, client.key)
    finally:
        launch.stop_all()
        cluster.stop()


def test_check_config_refuses_tls_files_that_cannot_be_used(pki: Pki, tmp_path: Path) -> None:
    """Read and checked at start (like the backends'): a key that is not the certificate's, a
    CA file without a certificate. `check-config` and `run` exit 2 naming the keys."""
    client, other = (pki.issue(name, client=True, directory=tmp_path) for name in ("client", "other"))
    garbage = tmp_path / "garbage-ca.pem"
    garbage.write_text("not a certificate\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"""limits:
  store: redis
  redis_url: rediss://127.0.0.1:6380/0
  redis_tls: {{ca_file: {pki.ca}, cert_file: {client.cert}, key_file: {other.key}}}
telemetry:
  otlp_endpoint: https://127.0.0.1:4317
  otlp_tls: {{ca_file: {garbage}}}
models:
  chat:
    backends: [{{name: a, address: 127.0.0.1:6001}}]
""")
    for command in (["check-config", str(config)], ["run", "--config", str(config)]):
        done = subprocess.run([*SIDECAR, *command], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              check=False)
        assert done.returncode == 2, done
        lines = (done.stdout + done.stderr).splitlines()
        assert f"limits.redis_tls.key_file: not the key of cert_file: {other.key}" in lines, lines
        assert f"telemetry.otlp_tls.ca_file: no PEM certificate in {garbage}" in lines, lines
        assert not any(marker in done.stdout + done.stderr for marker in ("-----BEGIN", "PRIVATE KEY"))
