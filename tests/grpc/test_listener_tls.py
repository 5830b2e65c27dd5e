"""TLS and mutual TLS on the sidecar's gRPC listeners (issue 17), through the public interface:
real `sidecar run` processes, certificates made at test time, real TLS handshakes, and the
project's own clients (`sidecar call`, `sidecar admin`, `sidecar smoke`).

- `listen` over TLS serves calls and the health service; plaintext and untrusted clients fail.
- `admin_listen` with `client_ca_file` (on 0.0.0.0, which it may then use) refuses a client
  without a certificate or with one from another CA, serves the right one, still wants a token.
- The loopback rule: `admin_listen` beyond loopback without TLS is exit 2 naming the key; `listen`
  there is a warning.
- Unusable certificate files: exit 2 naming the key path (and never their content).
- Rotation the way Kubernetes does it (a Secret volume's `..data` symlink swapped): under load,
  no call fails and new connections get the new certificate; unusable new files keep the old
  certificate (one error); a new client CA takes effect for new connections.
No PEM content and no key material ever shows in logs, errors, /healthz or /readyz.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from tests.harness.certs import Issued, Pki
from tests.harness.load import INFER, Load
from tests.harness.procs import free_port, wait_until
from tests.harness.sidecar import (
    SIDECAR,
    BackendProc,
    SidecarProc,
    channel,
    health_status,
    one_model,
    readyz,
    start_sidecar,
    tls_credentials,
)

KEY, TOKEN = "sk-tls-test-key", "tls-test-admin-token"
AUTH = (f"{{api_keys: [{{id: app, sha256: '{hashlib.sha256(KEY.encode()).hexdigest()}', org: acme}}], "
        f"admin_tokens: [{{id: ops, sha256: '{hashlib.sha256(TOKEN.encode()).hexdigest()}'}}]}}")
CALLER = (("x-api-key", KEY),)


def sidecar_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDECAR, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)


def error_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON error a client command prints last on stderr (gRPC's own log lines may precede it)."""
    return json.loads(result.stderr.strip().splitlines()[-1])  # type: ignore[no-any-return]


def fingerprint(issued: Issued) -> str:
    digest = x509.load_pem_x509_certificate(issued.cert.read_bytes()).fingerprint(hashes.SHA256())
    return ":".join(f"{byte:02X}" for byte in digest)


def served_fingerprint(address: str, ca: Path) -> str:
    """The certificate a new connection gets, over a raw TLS socket (ALPN h2, as gRPC)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    port = int(address.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def secrets_of(*issued: Issued) -> list[str]:
    """What must never be shown: PEM armour, and every base64 line of the certificates and keys."""
    lines = [line for item in issued for pem in item.pem() for line in pem.decode().splitlines()
             if line and not line.startswith("-----")]
    return ["-----BEGIN", *lines]


def assert_nothing_secret(text: str, *issued: Issued) -> None:
    shown = [secret for secret in secrets_of(*issued) if secret in text]
    assert not shown, f"certificate or key content shown: {shown[:2]}"


def ops_text(sidecar: SidecarProc) -> str:
    texts = []
    for path in ("/healthz", "/readyz", "/metrics"):
        try:
            with urllib.request.urlopen(f"{sidecar.ops_url}{path}", timeout=5) as response:
                texts.append(response.read().decode())
        except urllib.error.HTTPError as error:
            texts.append(error.read().decode())
    return "\n".join(texts)


def metric(sidecar: SidecarProc, name: str) -> float:
    text = ops_text(sidecar)
    return sum(float(line.rsplit(maxsplit=1)[1]) for line in text.splitlines() if line.startswith(name))


def log_events(sidecar: SidecarProc, event: str) -> list[dict[str, Any]]:
    return [line for line in sidecar.log_json() if line.get("msg") == event]


class SecretVolume:
    """A directory laid out as the kubelet lays out a Secret volume (its AtomicWriter): each file
    is a symlink `NAME -> ..data/NAME`, `..data` a symlink to a timestamped directory. An update
    writes a new directory and swaps `..data` in one rename, then removes the old directory."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        root.mkdir(parents=True)
        self.root = root
        self.generation = 0
        self.update(files)
        for name in files:
            os.symlink(f"..data/{name}", root / name)

    def update(self, files: dict[str, bytes]) -> None:
        self.generation += 1
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        target = self.root / f"..2026_01_01_00_00_{self.generation:02d}.000000001"
        target.mkdir()
        for name, content in files.items():
            (target / name).write_bytes(content)
            (target / name).chmod(0o600 if name.endswith(".key") else 0o644)
        os.symlink(target.name, self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")
        if old is not None:
            shutil.rmtree(old)

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def pair(issued: Issued, ca: bytes | None = None) -> dict[str, bytes]:
    cert, key = issued.pem()
    return {"tls.crt": cert, "tls.key": key, **({"ca.crt": ca} if ca is not None else {})}


def tls_section(listener: str, volume: SecretVolume | None = None, *, cert: Path | None = None,
                key: Path | None = None, client_ca: Path | None = None) -> str:
    cert = cert or (volume / "tls.crt" if volume else None)
    key = key or (volume / "tls.key" if volume else None)
    ca = f", client_ca_file: '{client_ca}'" if client_ca else ""
    return f"{listener}: {{cert_file: '{cert}', key_file: '{key}'{ca}}}"


def tls_block(*sections: str) -> str:
    """The `tls:` value of a config line: `{listen: {...}, admin_listen: {...}}`."""
    return "{" + ", ".join(sections) + "}"


# --- one sidecar: TLS on listen, mutual TLS on admin_listen (bound to 0.0.0.0) ---------------------


@dataclass
class TlsSidecar:
    sidecar: SidecarProc
    pki: Pki
    server: Issued
    client: Issued
    stranger: Issued                # a client certificate from another CA
    other_ca: Path

    @property
    def admin(self) -> str:        # admin_listen is 0.0.0.0:PORT; it is reached on loopback
        return "127.0.0.1:" + self.sidecar.admin_listen.rsplit(":", 1)[1]

    def admin_cli(self, *args: str | Path, client: Issued | None = None, token: str = TOKEN
                  ) -> subprocess.CompletedProcess[str]:
        tls: list[str | Path] = ["--ca-file", self.pki.ca]
        if client is not None:
            tls += ["--cert-file", client.cert, "--key-file", client.key]
        return sidecar_cli("admin", "--admin", self.admin, "--token", token, *tls, *args)


@pytest.fixture(scope="module")
def tls_sidecar(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSidecar]:
    workdir = tmp_path_factory.mktemp("listener-tls")
    pki, other = Pki(workdir / "pki"), Pki(workdir / "other", name="other-ca")
    server = pki.issue("sidecar")
    client, stranger = pki.issue("operator", client=True), other.issue("stranger", client=True)
    tls = tls_block(tls_section("listen", cert=server.cert, key=server.key),
                    tls_section("admin_listen", cert=server.cert, key=server.key, client_ca=pki.ca))
    text = one_model(backend.address, auth=AUTH, tls=tls).replace("admin_listen: 127.0.0.1:", "admin_listen: 0.0.0.0:")
    sidecar = start_sidecar(workdir, text, credentials=tls_credentials(pki.ca))
    try:
        yield TlsSidecar(sidecar, pki, server, client, stranger, other.ca)
        assert_nothing_secret(sidecar.proc.log_text() + ops_text(sidecar), server, client, stranger)
    finally:
        sidecar.proc.stop()


def test_listen_over_tls_serves_calls_and_health(tls_sidecar: TlsSidecar) -> None:
    sidecar, ca = tls_sidecar.sidecar, tls_sidecar.pki.ca
    unary = sidecar_cli("call", "--target", sidecar.listen, "--ca-file", ca, "--api-key", KEY, "--model", "chat",
                        "--input", "over tls")
    assert unary.returncode == 0, unary.stderr
    assert unary.stdout.startswith("over tls")
    stream = sidecar_cli("call", "--target", f"localhost:{sidecar.listen.rsplit(':', 1)[1]}", "--ca-file", ca,
                         "--api-key", KEY, "--model", "chat", "--input", "streamed", "--stream")
    assert stream.returncode == 0 and stream.stdout.startswith("streamed"), stream.stderr
    for service in ("", "liveness", "inference.v1.Inference"):
        assert health_status(sidecar.listen, service, credentials=tls_credentials(ca)) == "SERVING"

    plaintext = sidecar_cli("call", "--target", sidecar.listen, "--api-key", KEY, "--model", "chat", timeout=30)
    untrusted = sidecar_cli("call", "--target", sidecar.listen, "--ca-file", tls_sidecar.other_ca, "--api-key", KEY,
                            "--model", "chat")
    wrong_name = sidecar_cli("call", "--target", sidecar.listen, "--ca-file", ca, "--server-name", "elsewhere.example",
                             "--api-key", KEY, "--model", "chat")
    for refused in (plaintext, untrusted, wrong_name):
        assert refused.returncode == 1 and error_of(refused)["error"] == "UNAVAILABLE", refused.stderr
    named = sidecar_cli("call", "--target", sidecar.listen, "--ca-file", ca, "--server-name", "localhost",
                        "--api-key", KEY, "--model", "chat", "--input", "named")
    assert named.returncode == 0, named.stderr

    ready = log_events(sidecar, "sidecar ready")[0]
    assert ready["tls"] == {"listen": "server", "admin_listen": "mutual"}
    status, body = readyz(sidecar.ops_url)
    assert status == 200
    assert body["components"]["tls"]["status"] == "ok"
    assert body["components"]["tls"]["listen"]["fingerprint_sha256"] == fingerprint(tls_sidecar.server)
    assert served_fingerprint(sidecar.listen, ca) == fingerprint(tls_sidecar.server)


def test_admin_over_mutual_tls_wants_a_client_certificate_from_its_ca(tls_sidecar: TlsSidecar) -> None:
    no_certificate = tls_sidecar.admin_cli("routes")
    another_ca = tls_sidecar.admin_cli("routes", client=tls_sidecar.stranger)
    plaintext = sidecar_cli("admin", "--admin", tls_sidecar.admin, "--token", TOKEN, "routes")
    for refused in (no_certificate, another_ca, plaintext):
        assert refused.returncode == 1, refused.stdout
        assert error_of(refused)["error"] == "UNAVAILABLE", refused.stderr

    served = tls_sidecar.admin_cli("routes", client=tls_sidecar.client)
    assert served.returncode == 0, served.stderr
    assert [route["model"] for route in json.loads(served.stdout)["routes"]] == ["chat"]
    no_token = tls_sidecar.admin_cli("routes", client=tls_sidecar.client, token="")
    assert no_token.returncode == 1 and error_of(no_token)["error"] == "UNAUTHENTICATED"

    credentials = tls_credentials(tls_sidecar.pki.ca, tls_sidecar.client)
    assert health_status(tls_sidecar.admin, "liveness", credentials=credentials) == "SERVING"
    with pytest.raises(grpc.RpcError) as refused_health:
        health_status(tls_sidecar.admin, "liveness", credentials=tls_credentials(tls_sidecar.pki.ca))
    assert refused_health.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_smoke_reaches_tls_listeners(tls_sidecar: TlsSidecar) -> None:
    sidecar, pki, client = tls_sidecar.sidecar, tls_sidecar.pki, tls_sidecar.client
    result = sidecar_cli("smoke", "--target", sidecar.listen, "--ca-file", pki.ca,
                         "--admin", tls_sidecar.admin, "--admin-ca-file", pki.ca, "--admin-cert-file", client.cert,
                         "--admin-key-file", client.key, "--ops", sidecar.ops_listen, "--api-key", KEY,
                         "--admin-token", TOKEN, "--skip-rate-limit", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "target over TLS, admin over TLS" in result.stdout.splitlines()[0]
    assert result.stdout.splitlines()[-1] == "7 of 7 checks passed"
    unreadable = sidecar_cli("smoke", "--admin-cert-file", client.cert, "--admin-key-file", "/nonexistent/client.key")
    assert unreadable.returncode == 2
    assert unreadable.stderr.strip() == ("sidecar smoke: --admin-key-file: cannot be read: /nonexistent/client.key: "
                                         "No such file or directory")


# --- the loopback rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_admin_beyond_loopback_without_tls_refuses_to_start(backend: BackendProc, tmp_path: Path, host: str) -> None:
    port = free_port()
    address = f"{host}:{port}"
    text = "\n".join(f'admin_listen: "{address}"' if line.startswith("admin_listen:") else line
                     for line in one_model(backend.address).splitlines())
    path = tmp_path / "config.yaml"
    path.write_text(text)
    expected = (f"admin_listen: {address} is reachable beyond this host, and admin calls carry tokens: bind it to "
                f"loopback (127.0.0.1:{port}; operators use kubectl port-forward) or set tls.admin_listen "
                "(cert_file, key_file, and client_ca_file to require client certificates)")
    run = sidecar_cli("run", "--config", path)
    assert (run.returncode, run.stderr.strip()) == (2, expected)
    check = sidecar_cli("check-config", path)
    assert (check.returncode, check.stdout.strip()) == (2, expected)


def test_listen_beyond_loopback_without_tls_is_a_warning(backend: BackendProc, tmp_path: Path) -> None:
    text = one_model(backend.address).replace("listen: 127.0.0.1:", "listen: 0.0.0.0:", 1)
    sidecar = start_sidecar(tmp_path, text)
    try:
        warnings = log_events(sidecar, "listen is reachable beyond this host without TLS")
        assert [(w["level"], w["listen"]) for w in warnings] == [("warning", sidecar.listen)], warnings
    finally:
        sidecar.proc.stop()


# --- unusable certificate files ------------------------------------------------------------------------


def _cases(pki: Pki, tmp: Path) -> dict[str, tuple[str, str]]:
    """case -> (the tls section, the expected stderr line)."""
    good, other, expired = pki.issue("good"), pki.issue("other"), pki.issue("expired", expired=True)
    junk = tmp / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = tmp / "missing.pem"
    return {
        "missing certificate": (tls_section("listen", cert=missing, key=good.key),
                                f"tls.listen.cert_file: cannot be read: {missing}: No such file or directory"),
        "key of another certificate": (tls_section("listen", cert=good.cert, key=other.key),
                                       ("tls.listen.key_file: not the key of the certificate in tls.listen.cert_file: "
                                        f"{other.key}")),
        "not a key": (tls_section("admin_listen", cert=good.cert, key=good.cert),
                      f"tls.admin_listen.key_file: not a valid PEM private key: {good.cert}"),
        "expired": (tls_section("listen", cert=expired.cert, key=expired.key),
                    "tls.listen.cert_file: the certificate expired at "),
        "client CA not PEM": (tls_section("admin_listen", cert=good.cert, key=good.key, client_ca=junk),
                              f"tls.admin_listen.client_ca_file: no PEM certificate in {junk}"),
    }


@pytest.mark.parametrize("case", ["missing certificate", "key of another certificate", "not a key", "expired",
                                  "client CA not PEM"])
def test_unusable_certificate_files_refuse_the_start(backend: BackendProc, tmp_path: Path, case: str) -> None:
    pki = Pki(tmp_path / "pki")
    section, expected = _cases(pki, tmp_path)[case]
    path = tmp_path / "config.yaml"
    path.write_text(one_model(backend.address, tls=tls_block(section)))
    run = sidecar_cli("run", "--config", path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(expected) and len(run.stderr.strip().splitlines()) == 1, run.stderr
    check = sidecar_cli("check-config", path)
    assert check.returncode == 2 and check.stdout.startswith(expected), check.stdout
    issued = [Issued(pki.directory / f"{name}.pem", pki.directory / f"{name}.key")
              for name in ("good", "other", "expired")]
    assert_nothing_secret(run.stdout + run.stderr + check.stdout, *issued)


# --- rotation --------------------------------------------------------------------------------------------


def churn(target: str, credentials: grpc.ChannelCredentials, stop: threading.Event, outcomes: Counter[str]) -> None:
    """A new connection (and TLS handshake) per call, until `stop`."""
    request = InferRequest(model="chat", input="churn").SerializeToString()
    while not stop.is_set():
        with grpc.secure_channel(target, credentials) as opened:
            try:
                opened.unary_unary(INFER)(request, metadata=CALLER, timeout=5)
                outcomes["OK"] += 1
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1  # type: ignore[attr-defined]


def test_rotation_under_load_by_a_secret_volume_swap(backend: BackendProc, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    first, second = pki.issue("first"), pki.issue("second")
    volume = SecretVolume(tmp_path / "tls", pair(first))
    text = one_model(backend.address, auth=AUTH, tls=tls_block(tls_section("listen", volume)))
    credentials = tls_credentials(pki.ca)
    sidecar = start_sidecar(tmp_path, text, credentials=credentials)
    slow_stream = InferRequest(model="chat", input="in flight", parameters={"chunk_delay_ms": 100})
    loads = [Load(sidecar.listen, CALLER, credentials=credentials).start(),
             Load(sidecar.listen, CALLER, credentials=credentials, stream=True,
                  request=slow_stream.SerializeToString()).start()]
    stop, churned = threading.Event(), Counter[str]()
    churner = threading.Thread(target=churn, args=(sidecar.listen, credentials, stop, churned), daemon=True)
    churner.start()
    try:
        assert served_fingerprint(sidecar.listen, pki.ca) == fingerprint(first)
        time.sleep(1.0)
        for load in loads:
            load.phase = "rotation"
        volume.update(pair(second))
        wait_until(lambda: served_fingerprint(sidecar.listen, pki.ca) == fingerprint(second), 10,
                   what="new connections get the new certificate", proc=sidecar.proc)
        for load in loads:
            load.phase = "after"
        time.sleep(1.0)
    finally:
        stop.set()
        for load in loads:
            load.finish()
        churner.join(10)
    try:
        for load in loads:
            assert set(load.total()) == {"OK"}, load.outcomes
            assert load.outcomes["rotation"]["OK"] >= 1 and load.outcomes["after"]["OK"] >= 1, load.outcomes
        assert set(churned) == {"OK"} and churned["OK"] >= 10, churned
        rotated = log_events(sidecar, "listener certificate rotated")
        assert [(r["listener"], r["fingerprint_sha256"], r["previous"]["fingerprint_sha256"]) for r in rotated] == [
            ("listen", fingerprint(second), fingerprint(first))]
        second_expiry = x509.load_pem_x509_certificate(second.cert.read_bytes()).not_valid_after_utc.timestamp()
        assert metric(sidecar, "api_router_tls_certificate_expiry_timestamp_seconds") == second_expiry
        assert metric(sidecar, 'api_router_tls_certificate_reloads_total{listener="listen",result="success"}') == 1
        assert_nothing_secret(sidecar.proc.log_text() + ops_text(sidecar), first, second)
    finally:
        sidecar.proc.stop()


def test_a_refused_rotation_keeps_serving_the_old_certificate(backend: BackendProc, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    first, second, third = pki.issue("first"), pki.issue("second"), pki.issue("third")
    volume = SecretVolume(tmp_path / "tls", pair(first))
    credentials = tls_credentials(pki.ca)
    sidecar = start_sidecar(tmp_path, one_model(backend.address, auth=AUTH, tls=tls_block(tls_section("listen", volume))),
                            credentials=credentials)
    try:
        mismatched = {"tls.crt": second.pem()[0], "tls.key": third.pem()[1]}
        volume.update(mismatched)
        refused = wait_until(lambda: log_events(sidecar, "listener certificate rotation refused"), 10,
                             what="the rotation refused", proc=sidecar.proc)
        assert isinstance(refused, list)
        assert refused[0]["level"] == "error" and refused[0]["problems"] == [
            f"tls.listen.key_file: not the key of the certificate in tls.listen.cert_file: {volume / 'tls.key'}"]
        assert refused[0]["serving"]["fingerprint_sha256"] == fingerprint(first)
        assert served_fingerprint(sidecar.listen, pki.ca) == fingerprint(first)
        with channel(sidecar.listen, credentials) as opened:  # a new connection: served as before
            opened.unary_unary(INFER)(InferRequest(model="chat", input="x").SerializeToString(), metadata=CALLER,
                                      timeout=5)
        status, body = readyz(sidecar.ops_url)
        assert status == 200 and body["components"]["tls"]["status"] == "degraded"
        assert body["components"]["tls"]["listen"]["rotation_refused"] == refused[0]["problems"]
        time.sleep(2.5)  # more looks at the same files: nothing more to say
        assert len(log_events(sidecar, "listener certificate rotation refused")) == 1
        assert metric(sidecar, 'api_router_tls_certificate_reloads_total{listener="listen",result="failure"}') == 1

        volume.update(pair(third))
        wait_until(lambda: served_fingerprint(sidecar.listen, pki.ca) == fingerprint(third), 10,
                   what="the next good files served", proc=sidecar.proc)
        assert readyz(sidecar.ops_url)[1]["components"]["tls"]["status"] == "ok"
        assert_nothing_secret(sidecar.proc.log_text() + ops_text(sidecar), first, second, third)
    finally:
        sidecar.proc.stop()


def test_a_new_client_ca_takes_effect_for_new_connections(backend: BackendProc, tmp_path: Path) -> None:
    old_ca, new_ca = Pki(tmp_path / "old-ca", name="old-ca"), Pki(tmp_path / "new-ca", name="new-ca")
    server = old_ca.issue("sidecar")
    old_client, new_client = old_ca.issue("old-client", client=True), new_ca.issue("new-client", client=True)
    volume = SecretVolume(tmp_path / "tls", pair(server, old_ca.ca.read_bytes()))
    admin = tls_section("admin_listen", volume, client_ca=volume / "ca.crt")
    sidecar = start_sidecar(tmp_path, one_model(backend.address, auth=AUTH, tls=tls_block(admin)))

    def admin_health(client: Issued) -> str:
        try:
            return health_status(sidecar.admin_listen, "liveness", credentials=tls_credentials(old_ca.ca, client))
        except grpc.RpcError as error:
            return str(error.code().name)  # type: ignore[attr-defined]

    try:
        assert (admin_health(old_client), admin_health(new_client)) == ("SERVING", "UNAVAILABLE")
        volume.update(pair(server, old_ca.ca.read_bytes() + new_ca.ca.read_bytes()))  # trust both while moving
        wait_until(lambda: admin_health(new_client) == "SERVING", 10, what="the new CA trusted", proc=sidecar.proc)
        assert admin_health(old_client) == "SERVING"
        volume.update(pair(server, new_ca.ca.read_bytes()))
        wait_until(lambda: admin_health(old_client) == "UNAVAILABLE", 10, what="the old CA dropped", proc=sidecar.proc)
        assert admin_health(new_client) == "SERVING"
    finally:
        sidecar.proc.stop()
