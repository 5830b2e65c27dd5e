"""TLS of the gRPC listeners, apart from gRPC itself: which listeners need it (the loopback
rule), and their certificate files (`tls.listen`, `tls.admin_listen`) read, checked and
described without ever showing what is in them. Pure enough for the config's checks; the
credentials that serve the files, and their rotation, are tls_server.py's.

The loopback rule: a listener bound beyond loopback (0.0.0.0, [::], a pod IP) can be reached
by anyone on the network. `admin_listen` carries admin tokens and changes routing, so it must
not be reached in plaintext there: without `tls.admin_listen` such a config is invalid.
`listen` is only warned about (`exposed_without_tls`): a caller in the same network namespace
may be all there is, and the inference API has its API keys.

The files are read at start (the config's machine checks, then `Sidecar`) and by the rotation
poller whenever they changed. Reading is bounded (1 MiB a file) and checked with the OpenSSL
of the `ssl` module: the chain must hold certificates, the key must be the leaf certificate's
(a key of another certificate would fail every handshake), the leaf must not have expired, a
client CA file must hold certificates. Each problem names the key path and the file, never a
byte of its content; a certificate is described by its SHA-256 fingerprint (as `openssl x509
-noout -fingerprint -sha256` prints it) and its expiry.

Files may change while they are read (a Kubernetes Secret volume swaps its `..data` symlink, a
writer may replace one file after another): the files are read, checked, and read again, and a
difference raises `Unsettled` instead of a problem; the caller looks again a little later.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ipaddress
import re
import ssl
import time
from dataclasses import dataclass, field

from sidecar.config_sections import ServerTlsConfig, TlsConfig
from sidecar.config_yaml import ConfigError

__all__ = ["MAX_PEM_BYTES", "ServerCertificate", "Unsettled", "admin_exposure_problems", "exposed_without_tls",
           "files_of", "is_loopback", "load_server_certificate", "server_tls_problems"]

MAX_PEM_BYTES = 1024 * 1024
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)


class Unsettled(Exception):
    """The files changed while they were read: look again later."""


@dataclass(frozen=True)
class ServerCertificate:
    """What a listener serves: its certificate chain and key, and the CA client certificates must
    be signed by (None: no client certificate asked for)."""

    chain: bytes = field(repr=False)
    key: bytes = field(repr=False)
    client_ca: bytes | None = field(repr=False)
    fingerprint: str          # SHA-256 of the leaf certificate, AA:BB:... as openssl prints it
    not_after: float          # the leaf's expiry, Unix seconds

    def same_content(self, other: ServerCertificate) -> bool:
        return (self.chain, self.key, self.client_ca) == (other.chain, other.key, other.client_ca)

    def describe(self) -> dict[str, str]:
        """For log lines and /readyz: which certificate this is, never what it holds."""
        return {"fingerprint_sha256": self.fingerprint, "not_after": _utc(self.not_after)}


def is_loopback(address: str) -> bool:
    """Whether `host:port` binds only this host's loopback (127.0.0.0/8, [::1], localhost)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves to whatever the network says
        return False


def exposed_without_tls(address: str, tls: ServerTlsConfig | None) -> bool:
    return tls is None and not is_loopback(address)


def admin_exposure_problems(admin_listen: str, tls: TlsConfig) -> list[str]:
    """The loopback rule for `admin_listen` (the config's validation)."""
    if not exposed_without_tls(admin_listen, tls.admin_listen):
        return []
    port = admin_listen.rpartition(":")[2]
    return [(f"admin_listen: {admin_listen} is reachable beyond this host, and admin calls carry tokens: bind it "
             f"to loopback (127.0.0.1:{port}; operators use kubectl port-forward) or set tls.admin_listen "
             "(cert_file, key_file, and client_ca_file to require client certificates)")]


def files_of(tls: ServerTlsConfig) -> list[tuple[str, str]]:
    """(key name, path) of the listener's files."""
    files = [("cert_file", tls.cert_file), ("key_file", tls.key_file)]
    return files + ([("client_ca_file", tls.client_ca_file)] if tls.client_ca_file else [])


def server_tls_problems(tls: TlsConfig) -> list[str]:
    """The config's machine check: one line per problem of each TLS listener's files."""
    problems: list[str] = []
    for where, section in (("tls.listen", tls.listen), ("tls.admin_listen", tls.admin_listen)):
        if section is None:
            continue
        try:
            load_server_certificate(section, where, attempts=3)
        except ConfigError as exc:
            problems += exc.problems
        except Unsettled:
            problems.append(f"{where}: the files kept changing while they were read")
    return problems


def load_server_certificate(tls: ServerTlsConfig, where: str, *, attempts: int = 1) -> ServerCertificate:
    """The listener's certificate, read and checked; `ConfigError` naming `where`'s keys, or
    `Unsettled` when the files changed `attempts` times while being read."""
    for _ in range(attempts - 1):
        try:
            return _load(tls, where)
        except Unsettled:
            time.sleep(0.05)
    return _load(tls, where)


def _load(tls: ServerTlsConfig, where: str) -> ServerCertificate:
    contents, problems = _read_all(tls, where)
    chain, client_ca = contents.get("cert_file"), contents.get("client_ca_file")
    leaf = None
    if chain is not None:
        leaf, problem = _leaf(chain, f"{where}.cert_file", tls.cert_file)
        expiry = _not_after(leaf) if leaf is not None else 0.0
        if leaf is not None and expiry <= time.time():
            leaf, problem = None, f"{where}.cert_file: the certificate expired at {_utc(expiry)}: {tls.cert_file}"
        problems += [problem] if problem else []
    if leaf is not None and "key_file" in contents:
        problems += _key_problems(tls, where)
    if client_ca is not None:
        _, problem = _leaf(client_ca, f"{where}.client_ca_file", str(tls.client_ca_file))
        problems += [problem] if problem else []
    if _read_all(tls, where)[0] != contents:
        raise Unsettled(where)  # what was checked is not what is there now
    if problems:
        raise ConfigError(problems)
    assert leaf is not None
    return ServerCertificate(contents["cert_file"], contents["key_file"], client_ca, _fingerprint(leaf),
                             _not_after(leaf))


def _read_all(tls: ServerTlsConfig, where: str) -> tuple[dict[str, bytes], list[str]]:
    """Each file's bytes by key name, and what kept some from being read."""
    contents: dict[str, bytes] = {}
    problems = []
    for name, path in files_of(tls):
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_PEM_BYTES + 1)
        except OSError as exc:
            problems.append(f"{where}.{name}: cannot be read: {path}: {exc.strerror or type(exc).__name__}")
            continue
        if len(data) > MAX_PEM_BYTES:
            problems.append(f"{where}.{name}: larger than {MAX_PEM_BYTES} bytes: {path}")
            continue
        contents[name] = data
    return contents, problems


def _leaf(pem: bytes, key: str, path: str) -> tuple[bytes | None, str]:
    """The first certificate of a PEM file (DER), once OpenSSL took them all; else a problem."""
    try:
        certificates = [base64.b64decode(body) for body in _PEM_CERTIFICATE.findall(pem)]
        if not certificates:
            return None, f"{key}: no PEM certificate in {path}"
        ssl.create_default_context(cadata=b"".join(certificates))
        _not_after(certificates[0])
    except (binascii.Error, ssl.SSLError, ValueError):
        return None, f"{key}: not a valid PEM certificate: {path}"
    return certificates[0], ""


def _utc(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat().replace("+00:00", "Z")


def _no_password() -> bytes:
    raise ValueError("encrypted")


def _key_problems(tls: ServerTlsConfig, where: str) -> list[str]:
    """The key must be the certificate's: OpenSSL loads the pair as the server will."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except ValueError:
        return [f"{where}.key_file: an encrypted key (the sidecar takes unencrypted PEM keys): {tls.key_file}"]
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return [f"{where}.key_file: not the key of the certificate in {where}.cert_file: {tls.key_file}"]
        return [f"{where}.key_file: not a valid PEM private key: {tls.key_file}"]
    except OSError as exc:  # gone between the reads: Unsettled follows
        return [f"{where}.key_file: cannot be read: {tls.key_file}: {exc.strerror or type(exc).__name__}"]
    return []


def _fingerprint(der: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def _not_after(der: bytes) -> float:
    """The expiry of an X.509 certificate (DER), Unix seconds: Certificate -> tbsCertificate ->
    [version] serialNumber signature issuer validity{notBefore notAfter}. ValueError if malformed."""
    try:
        _, start, _ = _tlv(der, 0)                 # Certificate
        _, at, _ = _tlv(der, start)                # tbsCertificate: its fields follow
        tag, _, end = _tlv(der, at)
        at = end if tag == 0xA0 else at            # [0] version, when present
        for _ in range(3):                         # serialNumber, signature, issuer
            _, _, at = _tlv(der, at)
        _, validity, _ = _tlv(der, at)
        _, _, after = _tlv(der, validity)          # notBefore
        tag, start, end = _tlv(der, after)         # notAfter: UTCTime or GeneralizedTime
        text = der[start:end].decode("ascii")
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError("not an X.509 certificate") from exc
    if tag == 0x17 and len(text) == 13:            # YYMMDDHHMMSSZ; RFC 5280: YY >= 50 is 19YY
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != 0x18 or len(text) != 15:           # YYYYMMDDHHMMSSZ
        raise ValueError("unexpected time format")
    moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _tlv(data: bytes, at: int) -> tuple[int, int, int]:
    """A DER element at `at`: (tag, where its value starts, where it ends)."""
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(data[at:at + size], "big")
        at += size
    if at + length > len(data):
        raise IndexError("truncated")
    return tag, at, at + length
