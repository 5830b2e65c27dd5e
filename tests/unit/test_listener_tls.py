"""The listeners' TLS apart from gRPC (sidecar/listener_tls.py): the loopback rule, the checks of
certificate files (real certificates from tests/harness/certs.py), the expiry read from DER, and
TLS on a listener being a restart-only key. Serving and rotation: tests/grpc/test_listener_tls.py."""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.config import ConfigError, ServerTlsConfig, TlsConfig, parse_config
from sidecar.listener_tls import (
    _not_after,
    admin_exposure_problems,
    exposed_without_tls,
    is_loopback,
    load_server_certificate,
    server_tls_problems,
)
from sidecar.reload import check_reload
from tests.harness.certs import Issued, Pki

MODELS = "models: {chat: {backends: [{name: a, address: '127.0.0.1:6001'}]}}\n"


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50052", True), ("127.3.2.1:1", True), ("[::1]:50052", True), ("localhost:50052", True),
    ("0.0.0.0:50052", False), ("[::]:50052", False), ("10.1.2.3:50052", False), ("sidecar.example:50052", False),
])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_the_loopback_rule(tmp_path: Path) -> None:
    tls = ServerTlsConfig(cert_file="c.pem", key_file="k.pem")
    assert admin_exposure_problems("127.0.0.1:50052", TlsConfig()) == []
    assert admin_exposure_problems("0.0.0.0:50052", TlsConfig(admin_listen=tls)) == []
    assert admin_exposure_problems("10.0.0.7:9000", TlsConfig())[0].startswith(
        "admin_listen: 10.0.0.7:9000 is reachable beyond this host, and admin calls carry tokens: bind it to "
        "loopback (127.0.0.1:9000;")
    assert exposed_without_tls("0.0.0.0:50051", None) and not exposed_without_tls("0.0.0.0:50051", tls)
    assert not exposed_without_tls("127.0.0.1:50051", None)


def section(cert: Path, key: Path, ca: Path | None = None) -> ServerTlsConfig:
    return ServerTlsConfig(cert_file=str(cert), key_file=str(key), client_ca_file=str(ca) if ca else None)


def test_a_good_certificate_is_described_by_fingerprint_and_expiry(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    issued = pki.issue("server")
    loaded = load_server_certificate(section(issued.cert, issued.key, pki.ca), "tls.listen")
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    assert loaded.not_after == cert.not_valid_after_utc.timestamp()
    assert loaded.fingerprint == ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    assert loaded.describe() == {"fingerprint_sha256": loaded.fingerprint,
                                 "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert (loaded.chain, loaded.key, loaded.client_ca) == (*issued.pem(), pki.ca.read_bytes())
    assert "BEGIN" not in repr(loaded)


def test_problems_name_the_key_and_the_file_never_the_content(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    good, other = pki.issue("good"), pki.issue("other")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(good.key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    truncated = tmp_path / "truncated.pem"
    truncated.write_bytes(good.cert.read_bytes()[:200] + b"\n-----END CERTIFICATE-----\n")
    cases = {
        (good.cert, other.key, None): [
            f"tls.listen.key_file: not the key of the certificate in tls.listen.cert_file: {other.key}"],
        (good.cert, encrypted, None): [
            f"tls.listen.key_file: an encrypted key (the sidecar takes unencrypted PEM keys): {encrypted}"],
        (truncated, good.key, None): [f"tls.listen.cert_file: not a valid PEM certificate: {truncated}"],
        (good.cert, good.key, good.key): [f"tls.listen.client_ca_file: no PEM certificate in {good.key}"],
        (tmp_path / "none.pem", tmp_path / "none.key", None): [
            f"tls.listen.cert_file: cannot be read: {tmp_path / 'none.pem'}: No such file or directory",
            f"tls.listen.key_file: cannot be read: {tmp_path / 'none.key'}: No such file or directory"],
    }
    secrets = [line for item in (good, other) for pem in item.pem() for line in pem.decode().splitlines()[1:-1]]
    for (cert, key_file, ca), expected in cases.items():
        with pytest.raises(ConfigError) as failure:
            load_server_certificate(section(cert, key_file, ca), "tls.listen")
        assert failure.value.problems == expected
        assert not [s for s in secrets if s in "\n".join(failure.value.problems)]
    tls = TlsConfig(listen=section(good.cert, other.key), admin_listen=section(good.cert, good.key))
    assert server_tls_problems(tls) == cases[(good.cert, other.key, None)]


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    expired = Pki(tmp_path).issue("old", expired=True)
    with pytest.raises(ConfigError) as failure:
        load_server_certificate(section(expired.cert, expired.key), "tls.admin_listen")
    (problem,) = failure.value.problems
    assert problem.startswith("tls.admin_listen.cert_file: the certificate expired at 20")
    assert problem.endswith(f"Z: {expired.cert}")


def _self_signed(tmp_path: Path, not_after: datetime.datetime) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "far")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(not_after).sign(key, hashes.SHA256()))
    issued = Issued(tmp_path / f"{not_after.year}.pem", tmp_path / f"{not_after.year}.key")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issued.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return issued


@pytest.mark.parametrize("year", [2049, 2050, 2051, 9999])  # UTCTime up to 2049, GeneralizedTime from 2050
def test_the_expiry_is_read_from_either_time_format(tmp_path: Path, year: int) -> None:
    end = datetime.datetime(year, 6, 30, 12, 0, 0, tzinfo=datetime.UTC)
    issued = _self_signed(tmp_path, end)
    der = x509.load_pem_x509_certificate(issued.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert _not_after(der) == end.timestamp()
    assert load_server_certificate(section(issued.cert, issued.key), "tls.listen").not_after == end.timestamp()
    with pytest.raises(ValueError):
        _not_after(der[:40])


def test_tls_on_a_listener_needs_a_restart(tmp_path: Path) -> None:
    running = parse_config(MODELS)
    text = "tls: {listen: {cert_file: /etc/tls/tls.crt, key_file: /etc/tls/tls.key}}\n" + MODELS
    with pytest.raises(ConfigError) as failure:
        check_reload(running, text)
    assert failure.value.problems == ["tls.listen: cannot change while running; restart the sidecar"]
    with_tls = parse_config(text)
    moved = text.replace("/etc/tls/tls.key", "/etc/tls/other.key")
    with pytest.raises(ConfigError) as failure:
        check_reload(with_tls, moved)
    assert failure.value.problems == ["tls.listen.key_file: cannot change while running; restart the sidecar"]
