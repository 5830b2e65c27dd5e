"""Client-side TLS for gRPC channels: PEM files read and checked, credentials built from them,
their files watched for rotation, and a failed handshake told apart in grpc's error text.

Used for backends (routing/channels.py); generic, so that any other gRPC client of the sidecar can
take the same path. Pieces:

- `read_credentials(tls)`: the CA, certificate and key files of a `ClientTlsConfig` read and
  checked at once (the CA parses, the key is the certificate's and not encrypted), so a bad file is
  a config error naming its key (`TlsFilesError`) instead of every handshake failing later. The
  result holds the bytes and a digest of them; its `repr` never shows their content.
- `watch_files(paths, changed)`: polls the files' stamps (like reload.py's config watch, so a
  Kubernetes secret volume's `..data` symlink swap shows as a new inode) and calls `changed` once
  they changed and held still; again on the next poll when `changed` says it could not use them
  yet (a certificate swapped before its key).
- `handshake_failure(details)`: which TLS problem grpc's status details describe, if any, as one
  of `HANDSHAKE_CAUSES` (a bounded metric label).

Nothing here runs per call: credentials belong to a channel, errors are looked at only when a
call or a check has failed.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc

from sidecar.config_sections import ClientTlsConfig

MAX_PEM_BYTES = 1024 * 1024  # a CA bundle is a few hundred KiB at most
POLL_SECONDS = 1.0           # how often watched files are looked at
SETTLE_SECONDS = 0.1         # a changed file must hold still this long: a writer may not be done

# causes of a failed TLS connection, as grpc reports them (exact texts checked with grpcio 1.85)
UNKNOWN_CA = "unknown_ca"                    # the server's certificate is not signed by a trusted CA
NAME_MISMATCH = "name_mismatch"              # ... not for the name asked (address host or server_name)
EXPIRED = "expired"                          # ... expired (or not yet valid)
CLIENT_CERT_REJECTED = "client_cert_rejected"  # the server hung up after the handshake: no or untrusted client cert
NOT_TLS = "not_tls"                          # the server does not speak TLS
OTHER = "other"                              # any other TLS failure
HANDSHAKE_CAUSES = (UNKNOWN_CA, NAME_MISMATCH, EXPIRED, CLIENT_CERT_REJECTED, NOT_TLS, OTHER)
_CAUSE_TEXTS = (  # (text in grpc's details, cause): the first that matches
    ("Hostname Verification Check failed", NAME_MISMATCH),
    ("certificate has expired", EXPIRED),
    ("certificate is not yet valid", EXPIRED),
    ("unable to get local issuer certificate", UNKNOWN_CA),
    ("unable to get issuer certificate", UNKNOWN_CA),
    ("self signed certificate", UNKNOWN_CA),
    ("self-signed certificate", UNKNOWN_CA),
    ("WRONG_VERSION_NUMBER", NOT_TLS),
    ("Tls handshake failed", OTHER),
    ("Ssl handshake failed", OTHER),
    ("Custom verification check failed", OTHER),
    ("TSI_", OTHER),
)
DESCRIPTIONS = {
    UNKNOWN_CA: "its certificate is not signed by a trusted CA",
    NAME_MISMATCH: "its certificate is not for the expected name",
    EXPIRED: "its certificate has expired or is not yet valid",
    CLIENT_CERT_REJECTED: "it closed the connection during the handshake: it requires a client certificate "
                          "and refused the one presented (none, one it does not trust, or an expired one)",
    NOT_TLS: "it does not speak TLS",
    OTHER: "the TLS handshake failed",
}

FileStamp = tuple[int, int, int, int] | None  # mtime, size, inode, device; None: cannot be looked at


class TlsFilesError(Exception):
    """Files of a TLS config that cannot be used: `problems` holds (key, message) pairs, the key
    being `ca_file`, `cert_file` or `key_file`, the message naming the file (never its content)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))
        self.problems = problems


@dataclass(frozen=True, eq=False)
class ClientCredentials:
    """What one `ClientTlsConfig`'s files held when they were read: the PEM bytes grpc takes, the
    files' stamps then (`stale` tells a rotation) and a digest of the content."""

    tls: ClientTlsConfig
    root_certificates: bytes | None
    private_key: bytes | None
    certificate_chain: bytes | None
    stamps: tuple[FileStamp, ...]
    digest: str

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A new credentials object: channels built from it open their own connections."""
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel_options(self) -> list[tuple[str, str]]:
        """`server_name`: the name the server's certificate is checked against, sent as SNI and
        as the calls' authority, when it is not the address's host."""
        name = self.tls.server_name
        return [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)] if name else []

    def stale(self) -> bool:
        """Whether the files changed since they were read (a stat each; no read)."""
        return files_stamp(files_of(self.tls)) != self.stamps

    def __repr__(self) -> str:
        return f"<ClientCredentials {' '.join(files_of(self.tls)) or 'system roots'} {self.digest[:12]}>"


def files_of(tls: ClientTlsConfig) -> list[str]:
    return [path for path in (tls.ca_file, tls.cert_file, tls.key_file) if path is not None]


def files_stamp(paths: Iterable[str]) -> tuple[FileStamp, ...]:
    """Modification time, size, inode and device of each file. `stat` follows symlinks, so a
    swapped `..data` link shows as a new inode."""
    stamps: list[FileStamp] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev))
    return tuple(stamps)


def read_credentials(tls: ClientTlsConfig) -> ClientCredentials:
    """Reads and checks the files of `tls`; `TlsFilesError` naming each one that cannot be used.
    Blocking (file reads): at start, in a reload's worker thread, or in a thread for rotation."""
    paths = files_of(tls)
    stamps = files_stamp(paths)
    problems: list[tuple[str, str]] = []
    ca = _read("ca_file", tls.ca_file, problems)
    cert = _read("cert_file", tls.cert_file, problems)
    key = _read("key_file", tls.key_file, problems)
    if ca is not None:
        _check_ca(ca, tls.ca_file or "", problems)
    if cert is not None and key is not None:
        _check_pair(tls, cert, key, problems)
    if not problems and files_stamp(paths) != stamps:  # a rotation under way: what was read may be mixed
        problems.append(("cert_file" if tls.cert_file else "ca_file", "changed while being read; try again"))
    if problems:
        raise TlsFilesError(problems)
    digest = hashlib.sha256(b"\0".join(part or b"" for part in (ca, cert, key))).hexdigest()
    return ClientCredentials(tls, ca, key, cert, stamps, digest)


def _read(key: str, path: str | None, problems: list[tuple[str, str]]) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        problems.append((key, f"cannot be read: {path}: {exc.strerror or type(exc).__name__}"))
        return None
    if len(data) > MAX_PEM_BYTES:
        problems.append((key, f"larger than {MAX_PEM_BYTES} bytes: {path}"))
        return None
    return data


def _check_ca(ca: bytes, path: str, problems: list[tuple[str, str]]) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=ca.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError):
        problems.append(("ca_file", f"no PEM certificate in {path}"))


def _check_pair(tls: ClientTlsConfig, cert: bytes, key: bytes, problems: list[tuple[str, str]]) -> None:
    """The certificate and key parse and belong together (ssl reads them from their paths: the
    content is compared with what was read before, by `read_credentials`' stamps)."""
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        problems.append(("cert_file", f"no PEM certificate in {tls.cert_file}"))
    if b"PRIVATE KEY-----" not in key:
        problems.append(("key_file", f"no PEM private key in {tls.key_file}"))
    elif b"ENCRYPTED" in key:
        problems.append(("key_file", f"an encrypted key cannot be used (grpc takes none): {tls.key_file}"))
    if problems:
        return
    assert tls.cert_file is not None and tls.key_file is not None
    try:  # password b"": an encrypted key fails here instead of prompting on the terminal
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(tls.cert_file, tls.key_file, password=b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            problems.append(("key_file", f"not the key of cert_file: {tls.key_file}"))
        else:
            problems.append(("cert_file", f"cannot be used with key_file: {exc.reason or 'not PEM'}"))
    except OSError as exc:  # gone since it was read: a rotation under way
        problems.append(("cert_file", f"cannot be read: {tls.cert_file}: {exc.strerror or type(exc).__name__}"))


async def watch_files(paths: Callable[[], Iterable[str]], changed: Callable[[], Awaitable[bool] | bool],
                      interval: float = POLL_SECONDS) -> None:
    """Calls `changed` after the files `paths()` names changed (or the list did) and held still
    for `SETTLE_SECONDS`; runs until cancelled. When `changed` returns False (the files cannot be
    used yet, e.g. a certificate is new but its key not yet), it is called again on the next poll.
    Polls: it works alike on every filesystem and for symlink swaps."""
    def look() -> tuple[tuple[str, ...], tuple[FileStamp, ...]]:
        names = tuple(paths())
        return names, files_stamp(names)

    seen = look()
    while True:
        await asyncio.sleep(interval)
        now = look()
        if now == seen:
            continue
        await asyncio.sleep(SETTLE_SECONDS)
        if look() != now:
            continue  # still being written: look again next round
        used = changed()
        if inspect.isawaitable(used):
            used = await used
        if used:
            seen = now


def handshake_failure(details: str | None) -> str | None:
    """The cause (one of `HANDSHAKE_CAUSES`) when grpc's status details of an UNAVAILABLE call
    on a TLS channel tell a failed TLS handshake; None when they tell something else (refused,
    reset while a call ran, ...). grpc's texts, with grpcio 1.85:

    - unknown CA: "Tls handshake failed (TSI_PROTOCOL_FAILURE): ... CERTIFICATE_VERIFY_FAILED:
      unable to get local issuer certificate"
    - expired: "... CERTIFICATE_VERIFY_FAILED: certificate has expired"
    - wrong name: "Custom verification check failed with error: UNAUTHENTICATED: Hostname
      Verification Check failed."
    - a server that requires a client certificate and got none, or one it does not trust (TLS
      1.3: the client's side of the handshake completes, then the server hangs up): "failed to
      connect to all addresses; last error: UNAVAILABLE: ipv4:...: Socket closed"
    - a plaintext server: "... SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER ..."
    """
    if not details:
        return None
    for text, cause in _CAUSE_TEXTS:
        if text in details:
            return cause
    if "failed to connect to all addresses" in details and details.endswith("Socket closed"):
        return CLIENT_CERT_REJECTED  # hung up while connecting, not during a call
    return None
