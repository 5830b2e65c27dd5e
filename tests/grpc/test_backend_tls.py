"""TLS and mutual TLS to backends through the public interface: real certificates made at test
time (tests/harness/certs.py), demo backends serving TLS as separate processes, a real `sidecar
run`. Calls and health checks over TLS and mTLS, the clear error of each failed handshake (with
its metric, one log line and an unhealthy backend), settings per backend, model and default,
reload, and certificate files rotated under load."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.grpc.test_proxy import INFER, INFER_STREAM
from tests.grpc.test_reload import logged, replace_file
from tests.harness.certs import Issued, Pki
from tests.harness.load import Load
from tests.harness.procs import wait_until
from tests.harness.sidecar import SIDECAR, BackendProc, SidecarProc, backend_tls_args, readyz, sidecar_config

CHECKS = "health_checks: {interval_ms: 400, timeout_ms: 400, unhealthy_threshold: 2, healthy_threshold: 1}\n"
# slower to turn unhealthy: the sidecar is ready, and calls reach the backend, before it does
SLOW_CHECKS = "health_checks: {interval_ms: 1000, timeout_ms: 500, unhealthy_threshold: 4, healthy_threshold: 1}\n"
TOKEN = "adm-tls-31f0"
AUTH = f"""auth:
  api_keys: [{{id: app, sha256: "{hashlib.sha256(b"sk-app").hexdigest()}", org: acme}}]
  admin_tokens: [{{id: ops, sha256: "{hashlib.sha256(TOKEN.encode()).hexdigest()}"}}]
"""
KEY = (("x-api-key", "sk-app"),)
TLS_ERRORS = "api_router_backend_tls_errors_total"
FAILED = "backend TLS handshake failed"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def tls(ca: Path | None = None, client: Issued | None = None, server_name: str | None = None) -> str:
    """A `tls:` mapping in flow style."""
    keys = [f'ca_file: "{ca}"'] if ca else []
    keys += [f'cert_file: "{client.cert}"', f'key_file: "{client.key}"'] if client else []
    keys += [f"server_name: {server_name}"] if server_name else []
    return "{" + ", ".join(keys) + "}"


def config(models: dict[str, list[tuple[str, BackendProc, str]]], default: str = "", extra: str = "",
           checks: str = CHECKS, model_tls: dict[str, str] | None = None) -> str:
    """Models over (name, backend, the backend's own `tls` value or ""), `default` as
    `tls.backends`, `model_tls` as models' own `tls`, fast health checks and `extra` top-level text."""
    own = model_tls or {}
    text = "".join(f"{model}:\n  timeout_ms: 5000\n" + (f"  tls: {own[model]}\n" if model in own else "")
                   + "  backends:\n" + "".join(
        f'    - {{name: {name}, address: "{b.address}"' + (f", tls: {own}" if own else "") + "}\n"
        for name, b, own in backends) for model, backends in models.items())
    top = f"tls:\n  backends: {default}\n" if default else ""
    return sidecar_config(text) + checks + top + extra


def call(target: str, model: str = "chat", stream: bool = False,
         metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError | None:
    request = InferRequest(model=model, input="over tls").SerializeToString()
    with grpc.insecure_channel(target) as channel:
        try:
            if stream:
                list(channel.unary_stream(INFER_STREAM)(request, timeout=10, metadata=metadata))
            else:
                channel.unary_unary(INFER)(request, timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return error
    return None


def state(sidecar: SidecarProc, model: str, backend: str) -> str:
    value: str = readyz(sidecar.ops_url)[1]["components"]["backends"]["models"][model][backend]
    return value


def route_health(sidecar: SidecarProc, model: str, backend: str) -> str:
    with grpc.insecure_channel(sidecar.admin_listen) as channel:
        routes = admin_pb2_grpc.RoutingAdminStub(channel).ListRoutes(
            admin_pb2.ListRoutesRequest(model=model), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
    health = next(b.health for b in routes.routes[0].backends if b.name == backend)
    return str(admin_pb2.BackendHealth.Name(health))


def secrets_of(*issued: Issued) -> list[str]:
    """Lines of the PEM files that must never show up anywhere: the base64 body of each key and
    certificate, and any PEM armour."""
    lines = ["-----BEGIN", "PRIVATE KEY"]
    for item in issued:
        for path in (item.cert, item.key):
            lines += [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]
    return lines


def assert_nothing_leaks(sidecar: SidecarProc, *issued: Issued, also: str = "") -> None:
    with urllib.request.urlopen(f"{sidecar.ops_url}/healthz", timeout=5) as response:
        healthz = response.read().decode()
    seen = sidecar.proc.log_path.read_text() + healthz + json.dumps(readyz(sidecar.ops_url)[1]) + also
    assert [secret for secret in secrets_of(*issued) if secret in seen] == []


def test_calls_and_health_checks_go_over_tls(launch: Launcher, pki: Pki) -> None:
    """The sidecar verifies the backend against `ca_file`; unary and streamed calls get through,
    health checks pass on the same credentials, and no client certificate is presented."""
    backend = launch.backend(*backend_tls_args(pki.issue("backend")))
    assert call(backend.address) is not None  # the backend takes no plaintext: TLS really is in use
    sidecar = launch.sidecar(config({"chat": [("a", backend, tls(pki.ca))]}))
    assert call(sidecar.listen) is None
    assert call(sidecar.listen, stream=True) is None
    time.sleep(1.5)  # several rounds of health checks
    assert state(sidecar, "chat", "a") == "healthy"
    assert [c.get("client_cn") for c in backend.calls()] == [None, None]


def test_mutual_tls_presents_the_client_certificate(launch: Launcher, pki: Pki) -> None:
    """`tls.backends`, the default of every backend: the sidecar presents its client certificate
    to a backend that requires one."""
    backend = launch.backend(*backend_tls_args(pki.issue("backend"), client_ca=pki.ca))
    sidecar = launch.sidecar(config({"chat": [("a", backend, "")]},
                                    default=tls(pki.ca, pki.issue("sidecar-client", client=True))))
    assert call(sidecar.listen) is None and call(sidecar.listen, stream=True) is None
    assert [c["client_cn"] for c in backend.calls()] == ["sidecar-client", "sidecar-client"]
    time.sleep(1.5)
    assert state(sidecar, "chat", "a") == "healthy"


BROKEN = ["unknown_ca", "name_mismatch", "expired", "client_cert_rejected"]


@pytest.mark.parametrize("cause", BROKEN)
def test_a_failed_handshake_is_a_clear_error_counted_logged_once_and_unhealthy(
        launch: Launcher, pki: Pki, tmp_path: Path, cause: str) -> None:
    """Each way a handshake fails: callers get UNAVAILABLE / BACKEND_TLS_ERROR naming the cause
    (no address, no certificate), the metric counts it by cause, one log line says it however
    many calls and checks fail, and the backend turns unhealthy in /readyz and ListRoutes."""
    server = {"name_mismatch": pki.issue("elsewhere", names=("elsewhere.example",)),
              "expired": pki.issue("stale", expired=True)}.get(cause, pki.issue("backend"))
    backend = launch.backend(*backend_tls_args(server, client_ca=pki.ca if cause == "client_cert_rejected" else None))
    trusted = Pki(tmp_path / "other", name="other-ca").ca if cause == "unknown_ca" else pki.ca
    sidecar = launch.sidecar(config({"chat": [("a", backend, tls(trusted))]}, extra=AUTH, checks=SLOW_CHECKS))
    errors = [call(sidecar.listen, metadata=KEY) for _ in range(3)]
    for error in errors:
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        detail = error_detail(error)
        assert (detail.reason, dict(detail.metadata)) == ("BACKEND_TLS_ERROR", {
            "model": "chat", "backend": "a", "cause": cause})
        assert error.details().startswith("backend 'a' failed the TLS handshake: ")
        assert backend.address.rpartition(":")[2] not in error.details()  # no internal address
    wait_until(lambda: state(sidecar, "chat", "a") == "unhealthy", 10, what="backend unhealthy")
    assert route_health(sidecar, "chat", "a") == "BACKEND_HEALTH_UNHEALTHY"
    assert readyz(sidecar.ops_url)[1]["components"]["backends"]["tls_errors"] == {"chat": {"a": cause}}
    assert metric(sidecar, TLS_ERRORS, {"model": "chat", "backend": "a", "cause": cause}) >= 5  # 3 calls + checks
    assert metric(sidecar, "api_router_backend_errors_total", {"backend": "a", "error_type": "UNAVAILABLE"}) == 3
    lines = logged(sidecar, FAILED)
    assert [(line["backend"], line["cause"], line["seen_by"]) for line in lines] in (
        [("a", cause, "call")], [("a", cause, "health_check")])
    assert backend.calls() == []
    assert_nothing_leaks(sidecar, server, also=" ".join(error.details() for error in errors if error))


def test_server_name_is_the_name_checked_and_sent(launch: Launcher, pki: Pki) -> None:
    """A certificate for `backend.internal` served at 127.0.0.1: verified with `server_name`."""
    backend = launch.backend(*backend_tls_args(pki.issue("internal", names=("backend.internal",))))
    sidecar = launch.sidecar(config({"chat": [("a", backend, tls(pki.ca, server_name="backend.internal")),
                                              ("b", backend, tls(pki.ca))]}))
    wait_until(lambda: state(sidecar, "chat", "b") == "unhealthy", 10, what="b (no server_name) unhealthy")
    assert [call(sidecar.listen) for _ in range(5)] == [None] * 5  # all on a
    assert state(sidecar, "chat", "a") == "healthy"
    assert readyz(sidecar.ops_url)[1]["components"]["backends"]["tls_errors"] == {"chat": {"b": "name_mismatch"}}


def test_settings_per_backend_model_and_default_on_one_sidecar(launch: Launcher, pki: Pki, tmp_path: Path) -> None:
    """The most specific `tls` wins: `tls.backends` for model `chat`, `tls: false` opts model
    `plain` out to a plaintext backend, and model `other` reaches chat's address with its own
    (wrong) CA -- on a channel of its own, so chat's calls and health are not affected."""
    secure, plain = launch.backend(*backend_tls_args(pki.issue("backend"))), launch.backend()
    wrong = Pki(tmp_path / "other", name="other-ca").ca
    sidecar = launch.sidecar(config({"chat": [("a", secure, "")], "plain": [("p", plain, "")],
                                     "other": [("o", secure, tls(wrong))]},
                                    default=tls(pki.ca), model_tls={"plain": "false"}))
    assert call(sidecar.listen) is None and call(sidecar.listen, "plain") is None
    failure = call(sidecar.listen, "other")
    assert failure is not None and dict(error_detail(failure).metadata)["cause"] == "unknown_ca"
    wait_until(lambda: state(sidecar, "other", "o") == "unhealthy", 10, what="other/o unhealthy")
    assert (state(sidecar, "chat", "a"), state(sidecar, "plain", "p")) == ("healthy", "healthy")
    assert readyz(sidecar.ops_url)[0] == 200


def test_a_reload_changes_a_backends_tls(launch: Launcher, pki: Pki) -> None:
    """A reload applies new TLS settings (new channel); one whose file cannot be read is refused
    naming the key path, and the running settings go on."""
    backend = launch.backend(*backend_tls_args(pki.issue("backend")))
    plaintext = config({"chat": [("a", backend, "")]})
    sidecar = launch.sidecar(plaintext)
    assert error_detail(call(sidecar.listen)).reason == "BACKEND_UNAVAILABLE"  # type: ignore[arg-type]
    replace_file(sidecar.config_path, plaintext + f"tls:\n  backends: {tls(pki.ca)}\n")
    wait_until(lambda: call(sidecar.listen) is None, 15, what="calls over TLS after the reload")
    missing = pki.directory / "missing-ca.pem"
    replace_file(sidecar.config_path, plaintext + f"tls:\n  backends: {tls(missing)}\n")
    wait_until(lambda: logged(sidecar, "config reload rejected"), 15, what="the reload refused")
    assert logged(sidecar, "config reload rejected")[0]["problems"] == [
        f"tls.backends.ca_file: cannot be read: {missing}: No such file or directory"]
    assert call(sidecar.listen) is None


def kubernetes_secret(directory: Path, version: str, ca: Path, client: Issued) -> None:
    """Writes the files as a Kubernetes secret volume holds them: in `..<version>/`, reached
    through the `..data` symlink, which is swapped atomically to publish a new version."""
    data = directory / f"..{version}"
    data.mkdir(parents=True)
    for name, source in (("ca.crt", ca), ("tls.crt", client.cert), ("tls.key", client.key)):
        (data / name).write_bytes(source.read_bytes())
        if not (directory / name).exists():
            (directory / name).symlink_to(f"..data/{name}")
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, directory / "..data")


def test_a_rotated_client_certificate_is_used_without_dropping_calls(launch: Launcher, pki: Pki,
                                                                      tmp_path: Path) -> None:
    """Under steady load, the client certificate is replaced as a secret volume does it (the
    `..data` symlink swapped): new connections present the new certificate, no call fails."""
    backend = launch.backend(*backend_tls_args(pki.issue("backend"), client_ca=pki.ca), "--delay-ms", "20")
    secret = tmp_path / "secret"
    kubernetes_secret(secret, "v1", pki.ca, pki.issue("client-v1", client=True))
    sidecar = launch.sidecar(config({"chat": [("a", backend, tls(secret / "ca.crt", Issued(
        secret / "tls.crt", secret / "tls.key")))]}))
    load = Load(sidecar.listen).start()
    try:
        wait_until(lambda: len(backend.calls()) >= 20, 15, what="calls with the first certificate")
        load.phase = "rotation"
        kubernetes_secret(secret, "v2", pki.ca, pki.issue("client-v2", client=True))
        wait_until(lambda: any(c.get("client_cn") == "client-v2" for c in backend.calls()), 15,
                   what="a call with the new certificate")
        count = len(backend.calls())
        wait_until(lambda: len(backend.calls()) >= count + 20, 15, what="calls after the rotation")
    finally:
        load.finish()
    names = [c.get("client_cn") for c in backend.calls()]
    switch = names.index("client-v2")
    assert set(names[:switch]) == {"client-v1"} and names[-10:] == ["client-v2"] * 10
    assert set(load.total()) == {"OK"}, load.outcomes
    assert [line["channels"] for line in logged(sidecar, "backend TLS credentials reloaded")] == [
        [f"{backend.address} (tls)"]]
    assert all(c["outcome"] == "ok" for c in backend.calls())
    assert_nothing_leaks(sidecar, Issued(secret / "tls.crt", secret / "tls.key"))


def test_a_certificate_written_before_its_key_waits_for_the_key(launch: Launcher, pki: Pki,
                                                                tmp_path: Path) -> None:
    """Files replaced one by one (not a symlink swap): while the new certificate's key is not
    there yet, the sidecar keeps the old pair (one warning) and calls keep working; the new key
    completes the pair and new connections use it."""
    backend = launch.backend(*backend_tls_args(pki.issue("backend"), client_ca=pki.ca))
    first, second = pki.issue("client-v1", client=True), pki.issue("client-v2", client=True)
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    sidecar = launch.sidecar(config({"chat": [("a", backend, tls(pki.ca, Issued(cert, key)))]}))
    assert call(sidecar.listen) is None
    replace_file(cert, second.cert.read_text())
    wait_until(lambda: logged(sidecar, "backend TLS files changed but cannot be used yet"), 10,
               what="the half-rotated pair noticed")
    assert [call(sidecar.listen) for _ in range(3)] == [None] * 3
    replace_file(key, second.key.read_text())
    wait_until(lambda: logged(sidecar, "backend TLS credentials reloaded"), 10, what="the new pair used")
    assert call(sidecar.listen) is None
    assert [c["client_cn"] for c in backend.calls()] == ["client-v1"] * 4 + ["client-v2"]
    assert len(logged(sidecar, "backend TLS files changed but cannot be used yet")) == 1
    assert "not the key of cert_file" in logged(sidecar, "backend TLS files changed but cannot be used yet")[0]["problems"]


def test_a_rotated_ca_file_mends_a_broken_trust(launch: Launcher, pki: Pki, tmp_path: Path) -> None:
    """The CA file rotates like the certificate: a backend that failed as unknown_ca comes back
    once the file holds its CA, without a reload."""
    backend = launch.backend(*backend_tls_args(pki.issue("backend")))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Pki(tmp_path / "other", name="other-ca").ca.read_bytes())
    sidecar = launch.sidecar(config({"chat": [("a", backend, tls(ca))]}))
    wait_until(lambda: state(sidecar, "chat", "a") == "unhealthy", 10, what="unknown_ca: unhealthy")
    replace_file(ca, pki.ca.read_text())
    wait_until(lambda: state(sidecar, "chat", "a") == "healthy", 10, what="healthy with the new CA file")
    assert call(sidecar.listen) is None
    assert "tls_errors" not in readyz(sidecar.ops_url)[1]["components"]["backends"]
    assert [line["backend"] for line in logged(sidecar, "backend TLS handshakes succeed again")] == ["a"]


def check_config(path: Path) -> tuple[int, list[str]]:
    done = subprocess.run([*SIDECAR, "check-config", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr.strip().splitlines() + done.stdout.strip().splitlines()


def test_check_config_and_run_refuse_tls_files_that_cannot_be_used(pki: Pki, tmp_path: Path) -> None:
    """Files are read and checked before use: missing, not PEM, a key of another certificate --
    each one line naming its key path, never the files' content; `run` refuses the same config."""
    client, other = pki.issue("client", client=True), pki.issue("other", client=True)
    not_pem = tmp_path / "not-pem.txt"
    not_pem.write_text("hello\n")
    path = tmp_path / "bad.yaml"
    path.write_text(f"""
tls:
  backends: {{ca_file: "{tmp_path / 'nowhere.pem'}"}}
models:
  chat:
    tls: {{ca_file: "{not_pem}"}}
    backends:
      - {{name: a, address: "127.0.0.1:1", tls: {{cert_file: "{client.cert}", key_file: "{other.key}"}}}}
      - {{name: b, address: "127.0.0.1:2"}}
""")
    code, lines = check_config(path)
    assert (code, lines) == (2, [
        f"tls.backends.ca_file: cannot be read: {tmp_path / 'nowhere.pem'}: No such file or directory",
        f"models.chat.tls.ca_file: no PEM certificate in {not_pem}",
        f"models.chat.backends[0].tls.key_file: not the key of cert_file: {other.key}"])
    assert [secret for secret in secrets_of(client, other) if secret in "\n".join(lines)] == []
    run = subprocess.run([*SIDECAR, "run", "--config", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == lines


def test_demo_backend_refuses_half_a_tls_setting(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "sidecar", "demo-backend", "--listen", "127.0.0.1:0",
                           "--tls-cert", str(tmp_path / "c.pem")], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--tls-cert and --tls-key go together" in done.stderr

