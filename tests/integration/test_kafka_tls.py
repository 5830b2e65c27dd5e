"""Usage records to Kafka over TLS, set up with librdkafka's own properties in
`usage.kafka.properties` (`security.protocol`, `ssl.ca.location`, `ssl.certificate.location`,
`ssl.key.location`, `ssl.key.password`, `sasl.*`), through real `sidecar run` processes.

Tansu cannot serve TLS itself here (tls_proxy.py says why), so the broker is reached through a
TLS terminator in front of it that requires a client certificate (`start_tansu_tls`): the
sidecar's librdkafka does a real handshake, with an encrypted client key it opens with
`ssl.key.password`. Trusting the wrong CA keeps the records in the spool (nothing is lost: once
the right CA is in the file, the next producer, replaced after a delivery timeout, delivers them). SASL's positive path is not tested (Tansu's SCRAM
users cannot be created with its memory storage); a SASL failure is, for what it must not log.
A file librdkafka cannot use stops the start, naming the key. No property that is a secret
appears in a log line, `/readyz` or `/healthz`.
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sidecar_client.sidecar.usage.v1.usage_pb2 import UsageRecord

from tests.chaos.test_usage_delivery import call, usage_component, usage_config
from tests.conftest import Launcher
from tests.harness.certs import Issued, Pki
from tests.harness.procs import wait_until
from tests.harness.servers import TlsKafka, kafka_consume_all, start_tansu_tls
from tests.harness.sidecar import SIDECAR, BackendProc
from tests.harness.tls_checks import assert_nothing_leaked, swap

KEY_PASSWORD = "key-pass-" + os.urandom(6).hex()
SASL_PASSWORD = "sasl-pass-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("kafka-pki"))


@pytest.fixture(scope="module")
def tls_kafka(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsKafka]:
    kafka = start_tansu_tls(tmp_path_factory.mktemp("kafka-tls"), pki, client_ca=pki.ca)
    try:
        yield kafka
    finally:
        kafka.stop()


def encrypted_client(pki: Pki, directory: Path) -> Issued:
    """A client certificate whose key file is encrypted with `KEY_PASSWORD`."""
    issued = pki.issue("usage-producer", client=True, directory=directory)
    key = serialization.load_pem_private_key(issued.key.read_bytes(), password=None)
    issued.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.BestAvailableEncryption(KEY_PASSWORD.encode())))
    return issued


def flow(properties: dict[str, str]) -> str:
    """A YAML flow mapping; values quoted (a password may hold anything)."""
    return "{" + ", ".join(f'{key}: "{value}"' for key, value in properties.items()) + "}"


def tls_properties(ca: Path, client: Issued) -> dict[str, str]:
    return {"security.protocol": "SSL", "ssl.ca.location": str(ca), "ssl.certificate.location": str(client.cert),
            "ssl.key.location": str(client.key), "ssl.key.password": KEY_PASSWORD}


def records(kafka: TlsKafka, topic: str, expected: int, timeout: float = 30.0) -> dict[str, UsageRecord]:
    """request id -> record, read over TLS through the terminator; polls until `expected`
    arrived (the topic exists once the first record is produced) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for message in kafka_consume_all(kafka.bootstrap, topic, timeout=10, expected=expected,
                                         client=kafka.client_properties()):
            assert message.value is not None
            record = UsageRecord.FromString(message.value)
            found[record.request_id] = record
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)




def test_usage_records_reach_kafka_over_mutual_tls_with_an_encrypted_key(
        launch: Launcher, backend: BackendProc, pki: Pki, tls_kafka: TlsKafka, tmp_path: Path) -> None:
    topic = f"usage-tls-{uuid.uuid4().hex[:8]}"
    client = encrypted_client(pki, tmp_path / "certs")
    sidecar = launch.sidecar(usage_config(backend.address, tls_kafka.bootstrap, tmp_path / "spool", topic,
                                          kafka={"properties": flow(tls_properties(pki.ca, client))}))
    request_ids = [f"tls-{i}" for i in range(5)]
    for request_id in request_ids:
        call(sidecar, request_id)
    assert set(records(tls_kafka, topic, len(request_ids))) == set(request_ids)
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 10, what="every record acknowledged")
    assert usage_component(sidecar)["kafka"] == "up"
    assert "usage-producer" in tls_kafka.terminator.client_names  # the sidecar's certificate, checked
    assert_nothing_leaked(sidecar, secrets=(KEY_PASSWORD,))


def test_a_wrong_ca_keeps_records_in_the_spool_until_the_replaced_producer_reads_the_right_one(
        launch: Launcher, backend: BackendProc, pki: Pki, tls_kafka: TlsKafka, tmp_path: Path) -> None:
    """The sidecar trusts another CA: records wait in the spool. The CA file is swapped for the
    right one while it runs: the producer whose records timed out is replaced, the new one reads
    the files again, and the records are delivered from the spool, without a restart."""
    topic = f"usage-tls-ca-{uuid.uuid4().hex[:8]}"
    client = encrypted_client(pki, tmp_path / "certs")
    other = Pki(tmp_path / "other", name="other-ca")
    for name, ca in (("wrong", other.ca), ("right", pki.ca)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ca.pem").write_bytes(ca.read_bytes())
    live = tmp_path / "live"
    swap(live, tmp_path / "wrong")
    sidecar = launch.sidecar(usage_config(backend.address, tls_kafka.bootstrap, tmp_path / "spool", topic, kafka={
        "properties": flow(tls_properties(live / "ca.pem", client)), "delivery_timeout_ms": 2000}))
    request_ids = [f"tls-ca-{i}" for i in range(5)]
    for request_id in request_ids:
        call(sidecar, request_id)  # calls are served; their records wait
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == len(request_ids), 10, what="records spooled")
    component = usage_component(sidecar)
    assert component["kafka"] == "down" and component["status"] == "degraded"
    why = [line["msg"] for line in sidecar.log_json() if line.get("logger") == "sidecar.usage.librdkafka"]
    assert any("certificate verify failed" in msg for msg in why), why

    swap(live, tmp_path / "right")
    assert set(records(tls_kafka, topic, len(request_ids))) == set(request_ids)
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 10, what="the spool replayed")
    assert usage_component(sidecar)["kafka"] == "up" and usage_component(sidecar)["producer_generation"] > 1
    assert_nothing_leaked(sidecar, secrets=(KEY_PASSWORD,))


def test_a_sasl_failure_never_shows_the_password(
        launch: Launcher, backend: BackendProc, pki: Pki, tls_kafka: TlsKafka, tmp_path: Path) -> None:
    """SASL_SSL to a broker without SASL: the handshake works, the authentication cannot."""
    topic = f"usage-sasl-{uuid.uuid4().hex[:8]}"
    client = encrypted_client(pki, tmp_path / "certs")
    properties = {**tls_properties(pki.ca, client), "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
                  "sasl.username": "usage", "sasl.password": SASL_PASSWORD}
    sidecar = launch.sidecar(usage_config(backend.address, tls_kafka.bootstrap, tmp_path / "spool", topic,
                                          kafka={"properties": flow(properties)}))
    call(sidecar, "sasl-1")
    wait_until(lambda: [line for line in sidecar.log_json() if line.get("logger") == "sidecar.usage.librdkafka"
                        and "SASL" in str(line.get("msg"))], 30, what="the SASL failure logged")
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 1, 10, what="the record waiting in the spool")
    assert usage_component(sidecar)["kafka"] == "down"
    assert_nothing_leaked(sidecar, secrets=(SASL_PASSWORD, KEY_PASSWORD))


def sidecar_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDECAR, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def test_a_file_librdkafka_cannot_use_is_refused_naming_the_key(backend: BackendProc, tmp_path: Path) -> None:
    """A file that is not there: `check-config` and `run` exit 2 naming the property. A file
    there that librdkafka cannot load (not PEM): `run` exits 2 with librdkafka's reason."""
    def config(ca: Path) -> Path:
        path = tmp_path / f"{ca.name}.yaml"
        path.write_text(usage_config(backend.address, "127.0.0.1:9", tmp_path / "spool", "usage-bad-ca",
                                     kafka={"properties": flow({"security.protocol": "SSL",
                                                                "ssl.ca.location": str(ca),
                                                                "ssl.key.password": KEY_PASSWORD})}))
        return path

    missing = config(tmp_path / "missing-ca.pem")
    for command in (["check-config", str(missing)], ["run", "--config", str(missing)]):
        done = sidecar_cli(*command, cwd=tmp_path)
        assert done.returncode == 2, done
        expected = f"usage.kafka.properties.ssl.ca.location: cannot be read: {tmp_path / 'missing-ca.pem'}"
        assert expected in done.stdout + done.stderr

    garbage = tmp_path / "garbage-ca.pem"
    garbage.write_text("not a certificate\n")
    started = time.monotonic()
    done = sidecar_cli("run", "--config", str(config(garbage)), cwd=tmp_path)
    assert done.returncode == 2 and time.monotonic() - started < 30, done
    assert "usage.kafka.properties: librdkafka refuses them: " in done.stderr and "ssl.ca.location" in done.stderr
    assert KEY_PASSWORD not in done.stdout + done.stderr and "Traceback" not in done.stderr
