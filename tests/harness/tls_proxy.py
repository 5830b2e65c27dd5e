"""A TLS terminator: accepts TLS on a loopback port and pipes the plaintext bytes to another.

For servers that cannot serve TLS here: Tansu 0.6.0 has `--cert` and `--key` options, but its
command line refuses them together ("the argument '--cert' cannot be used with '--key'": both
sit in one clap group), so a Kafka client's TLS is tested against this terminator in front of
a plaintext Tansu that advertises the terminator's address (`start_tansu_tls` in servers.py),
as a TLS-terminating proxy in front of a broker would be deployed. The handshakes are real
(OpenSSL through Python's `ssl`), with a client certificate required when `client_ca` is given;
`client_names` records the common name of each client certificate accepted.
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

from tests.harness.certs import Issued
from tests.harness.procs import free_port

PIPE_BYTES = 64 * 1024


class TlsTerminator:
    def __init__(self, target_port: int, server: Issued, client_ca: Path | None = None) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.client_names: list[str] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(server.cert, server.key)
        if client_ca is not None:
            self._context.load_verify_locations(cafile=client_ca)
            self._context.verify_mode = ssl.CERT_REQUIRED
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tls-terminator-{self.port}", daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> TlsTerminator:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self._context,
                                          ssl_handshake_timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
        self.client_names.append(names[0] if names else "")
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream_writer}
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            self._writers -= {writer, upstream_writer}

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=1)  # the pipes end once their sockets are closed
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(PIPE_BYTES):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
            writer.close()
