"""Backend TLS without a backend: which settings apply, what grpc's error texts mean, which files
can be used, and channels keyed by address and TLS setting across a rotation. Real PEM files
(tests/harness/certs.py); channels connect lazily, so nothing needs to listen."""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.config import ClientTlsConfig, parse_config
from sidecar.routing.backend_tls import effective_tls
from sidecar.routing.channels import ChannelKey, Channels
from sidecar.tls_client import TlsFilesError, handshake_failure, read_credentials
from tests.harness.certs import Pki

# grpc's details of an UNAVAILABLE call, as grpcio 1.85 gives them (ports vary; "other" is made up
# from the same pattern with another OpenSSL reason)
SEEN = {
    "unknown_ca": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:49453: Tls handshake "
                  "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                  "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK",
    "name_mismatch": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:46585: Custom "
                     "verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.",
    "expired": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:57897: Tls handshake failed "
               "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
               "CERTIFICATE_VERIFY_FAILED: certificate has expired: OK",
    "client_cert_rejected": "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:33501: "
                            "Socket closed",
    "not_tls": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:45995: Tls handshake failed "
               "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
               "WRONG_VERSION_NUMBER: Invalid certificate verification context: OK",
    "other": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
             "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:10000410:SSL routines:OPENSSL_internal:"
             "SSLV3_ALERT_HANDSHAKE_FAILURE",
}


@pytest.mark.parametrize("cause", sorted(SEEN))
def test_handshake_failures_are_told_by_cause(cause: str) -> None:
    assert handshake_failure(SEEN[cause]) == cause


@pytest.mark.parametrize("details", [
    None, "", ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:37537: Failed to connect "
               "to remote host: Connection refused"),
    "Socket closed",  # a connection lost while a call ran: not a handshake
    "demo backend failure (UNAVAILABLE)",
])
def test_other_failures_are_no_handshake_failure(details: str | None) -> None:
    assert handshake_failure(details) is None


PRECEDENCE = """
tls:
  backends: {ca_file: /default.pem}
models:
  chat:
    backends:
      - {name: inherits, address: "h:1"}
      - {name: own, address: "h:1", tls: {ca_file: /own.pem, server_name: b.internal}}
      - {name: opts-out, address: "h:1", tls: false}
  embed:
    tls: {ca_file: /model.pem}
    backends:
      - {name: model, address: "h:1"}
      - {name: plain, address: "h:1", tls: {plaintext: true}}
  raw:
    tls: false
    backends: [{name: r, address: "h:1"}, {name: back-on, address: "h:1", tls: {}}]
"""


def test_the_most_specific_tls_applies_as_a_whole() -> None:
    config = parse_config(PRECEDENCE, environ={})
    applied = {f"{m}/{b.name}": effective_tls(config.tls.backends, model, b)
               for m, model in config.models.items() for b in model.backends}
    assert applied == {
        "chat/inherits": ClientTlsConfig(ca_file="/default.pem"),
        "chat/own": ClientTlsConfig(ca_file="/own.pem", server_name="b.internal"),  # no key merged from the default
        "chat/opts-out": None,
        "embed/model": ClientTlsConfig(ca_file="/model.pem"),
        "embed/plain": None,
        "raw/r": None,
        "raw/back-on": ClientTlsConfig(),  # TLS with the system's roots
    }
    assert all(type(tls) is ClientTlsConfig for tls in applied.values() if tls is not None)


def test_unusable_files_are_named_by_key_never_shown(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    client, other = pki.issue("client", client=True), pki.issue("other", client=True)
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(client.key.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    cases = {
        ClientTlsConfig(ca_file=str(tmp_path / "none.pem")): [
            ("ca_file", f"cannot be read: {tmp_path / 'none.pem'}: No such file or directory")],
        ClientTlsConfig(ca_file=str(client.key)): [("ca_file", f"no PEM certificate in {client.key}")],
        ClientTlsConfig(cert_file=str(client.key), key_file=str(client.cert)): [
            ("cert_file", f"no PEM certificate in {client.key}"), ("key_file", f"no PEM private key in {client.cert}")],
        ClientTlsConfig(cert_file=str(client.cert), key_file=str(other.key)): [
            ("key_file", f"not the key of cert_file: {other.key}")],
        ClientTlsConfig(cert_file=str(client.cert), key_file=str(encrypted)): [
            ("key_file", f"an encrypted key cannot be used (grpc takes none): {encrypted}")],
    }
    for tls, expected in cases.items():
        with pytest.raises(TlsFilesError) as failure:
            read_credentials(tls)
        assert failure.value.problems == expected
    good = read_credentials(ClientTlsConfig(ca_file=str(pki.ca), cert_file=str(client.cert), key_file=str(client.key)))
    assert (good.root_certificates, good.certificate_chain, good.private_key) == (
        pki.ca.read_bytes(), client.cert.read_bytes(), client.key.read_bytes())
    assert "BEGIN" not in repr(good) and str(client.key) in repr(good) and not good.stale()


def two_models(ca: Path, cert: Path, key: Path) -> str:
    return f"""
tls:
  backends: {{ca_file: "{ca}", cert_file: "{cert}", key_file: "{key}"}}
models:
  chat:
    backends: [{{name: a, address: "127.0.0.1:7301"}}, {{name: b, address: "127.0.0.1:7302", tls: false}}]
  embed:
    backends: [{{name: e, address: "127.0.0.1:7301"}}, {{name: f, address: "127.0.0.1:7301", tls: {{ca_file: "{ca}"}}}}]
health_checks: {{interval_ms: 60000}}
"""


async def test_channels_are_keyed_by_address_and_tls_and_renewed_when_files_change(tmp_path: Path) -> None:
    """One channel per (address, TLS setting): equal settings share it, another setting at the
    same address gets its own, plaintext its own. A rotation's new content gets new channels for
    the keys using those files only; files only touched keep their channels."""
    pki = Pki(tmp_path)
    client = pki.issue("client", client=True)
    channels = Channels(parse_config(two_models(pki.ca, client.cert, client.key), environ={}))
    chat, embed = channels.backends["chat"], channels.backends["embed"]
    assert chat[0].channel is embed[0].channel and chat[0].key == embed[0].key  # same address, same TLS
    assert embed[1].channel is not embed[0].channel and embed[1].key.address == embed[0].key.address
    assert chat[1].key == ChannelKey("127.0.0.1:7302") and str(chat[1].key) == "127.0.0.1:7302"
    assert str(chat[0].key) == "127.0.0.1:7301 (tls)"
    assert channels.credential_files() == sorted({str(pki.ca), str(client.cert), str(client.key)})
    assert channels.stale_credentials() == []

    os.utime(client.cert, ns=(1, 1))  # touched, same content: no new channel
    stale = channels.stale_credentials()
    assert stale == [chat[0].tls]
    assert channels.renew([read_credentials(tls) for tls in stale]) == {}
    assert channels.stale_credentials() == [] and channels.backends["chat"][0].channel is chat[0].channel

    renewed = pki.issue("client", client=True)  # new content at the same paths
    assert renewed.cert == client.cert
    old, ca_only = chat[0].channel, embed[1].channel
    removed = channels.renew([read_credentials(tls) for tls in channels.stale_credentials()])
    assert removed == {chat[0].key: old}
    chat, embed = channels.backends["chat"], channels.backends["embed"]
    assert chat[0].channel is not old and chat[0].channel is embed[0].channel
    assert embed[1].channel is ca_only  # the CA-only setting: its file did not change
    assert old.get_state() is not grpc.ChannelConnectivity.SHUTDOWN  # calls on it finish: drain closes it
    await channels.aclose()
    assert old.get_state() is grpc.ChannelConnectivity.SHUTDOWN
