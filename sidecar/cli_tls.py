"""TLS for the commands that call a listener: `sidecar call`, `sidecar smoke`, `sidecar admin`.

A listener with `tls.listen` / `tls.admin_listen` speaks TLS only, and one with `client_ca_file`
also wants the caller's certificate. These options say how to reach it:

    --ca-file FILE                 the CA that signed the listener's certificate (turns TLS on)
    --cert-file FILE --key-file FILE   a client certificate, for a listener with client_ca_file
    --server-name NAME             the name to verify, when the target's host is not in the
                                   certificate (an IP address, a port-forward to 127.0.0.1)
    --tls                          TLS with the system's CAs (implied by the options above)

`smoke` calls two listeners: its options for `--admin` carry the prefix `admin-`
(`--admin-ca-file`, ...). The files are read once, when the command starts; a file that cannot
be read ends it with exit 2 naming the option.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grpc is imported when a channel is made: `sidecar --help` stays quick
    import grpc

__all__ = ["ChannelTls", "TlsOptionError", "add_tls_options", "aio_channel", "channel", "channel_tls"]



class TlsOptionError(Exception):
    """An option's file cannot be used; the message names the option, never the content."""


@dataclass(frozen=True)
class ChannelTls:
    credentials: grpc.ChannelCredentials
    server_name: str | None = None

    def options(self) -> list[tuple[str, Any]]:
        name = self.server_name
        return [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)] if name else []


def add_tls_options(parser: argparse.ArgumentParser, prefix: str = "", listener: str = "the listener") -> None:
    group = parser.add_argument_group(f"TLS to {listener}")
    group.add_argument(f"--{prefix}tls", action="store_true", help=f"use TLS to {listener}, trusting the "
                       "system's CAs (implied by the options below)")
    group.add_argument(f"--{prefix}ca-file", metavar="FILE", help="PEM: the CA that signed its certificate")
    group.add_argument(f"--{prefix}cert-file", metavar="FILE", help="PEM: a client certificate (mutual TLS)")
    group.add_argument(f"--{prefix}key-file", metavar="FILE", help="PEM: the key of --cert-file")
    group.add_argument(f"--{prefix}server-name", metavar="NAME",
                       help="the name its certificate must carry, when the target's host is not in it")


def channel_tls(args: argparse.Namespace, prefix: str = "") -> ChannelTls | None:
    """The TLS the options ask for, or None for plaintext; `TlsOptionError` for unusable files."""
    dest = prefix.replace("-", "_")

    def option(name: str) -> Any:
        return getattr(args, f"{dest}{name}")

    ca, cert, key, name = option("ca_file"), option("cert_file"), option("key_file"), option("server_name")
    if not (option("tls") or ca or cert or key or name):
        return None
    if (cert is None) != (key is None):
        raise TlsOptionError(f"--{prefix}cert-file and --{prefix}key-file go together")
    from sidecar.config_sections import ClientTlsConfig
    from sidecar.tls_client import TlsFilesError, read_credentials

    try:  # read and checked as the sidecar reads its own TLS files
        read = read_credentials(ClientTlsConfig(ca_file=ca, cert_file=cert, key_file=key, server_name=name))
    except TlsFilesError as exc:
        field, message = exc.problems[0]
        raise TlsOptionError(f"--{prefix}{field.replace('_', '-')}: {message}") from None
    return ChannelTls(read.channel_credentials(), name)


def channel(target: str, tls: ChannelTls | None) -> grpc.Channel:
    """A blocking channel to `target`, over TLS when `tls` says so."""
    import grpc

    if tls is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, tls.credentials, options=tls.options())


def aio_channel(target: str, tls: ChannelTls | None) -> grpc.aio.Channel:
    import grpc

    if tls is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, tls.credentials, options=tls.options())
