"""The ops HTTP listener (`ops_listen`) under hostile clients, against a real `sidecar run`
(issue 15, finding 2): huge or endless request heads are refused with 431 / 414 / 408 and never
cost more than a little memory, a bad request logs one line (no traceback, rate-limited), a slow
sender is cut off by the total receive timeout, and a connection flood holds at most
`MAX_CONNECTIONS` sockets while a normal client is still served.

The limits are the ones in `sidecar/ops/http_request.py` and `sidecar/ops/http.py`; the bounds
here are generous (a loaded 2-core machine) yet far below what an unlimited listener does."""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import Launcher
from tests.harness.procs import wait_until
from tests.harness.sidecar import BackendProc, SidecarProc, one_model

MIB = 1024 * 1024
OPS_LOGGER = "sidecar.ops"


def connect(address: str, timeout: float) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def exchange(address: str, chunks: Iterable[bytes], *, pause: float = 0.0, timeout: float = 30.0) -> tuple[bytes, float]:
    """Sends `chunks` on a new connection from a thread, `pause` seconds apart, and reads until
    the server closes (or `timeout`). The sender stops at its first error: a server that refuses
    the request answers and closes before the client is done. Returns the answer and the seconds
    from connecting until the server closed."""
    sock = connect(address, timeout)
    started = time.monotonic()
    finished = threading.Event()

    def send() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                if pause and finished.wait(pause):
                    return
        except OSError:
            pass

    sender = threading.Thread(target=send, name="ops-client-sender", daemon=True)
    sender.start()
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    elapsed = time.monotonic() - started
    finished.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked in sendall
    except OSError:
        pass
    sender.join(timeout=30)
    sock.close()
    return answer, elapsed


def status_of(answer: bytes) -> int:
    """The status code of an HTTP/1.1 answer (0 when there was none)."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[0] == b"HTTP/1.1" else 0


def huge_headers(count: int = 3000, size: int = 60_000) -> Iterator[bytes]:
    """A `GET /metrics` with `count` distinct header lines of `size` bytes each (each line
    under asyncio's 64 KiB line limit, so an unlimited reader keeps every one)."""
    yield b"GET /metrics HTTP/1.1\r\nHost: sidecar\r\n"
    pad = b"a" * size
    for index in range(count):
        yield b"X-Pad-%d: %s\r\n" % (index, pad)
    yield b"\r\n"


def proc_status_kib(pid: int, field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def open_sockets(pid: int) -> int:
    """How many sockets the process holds open."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except OSError:
            continue
    return count


def ops_lines(sidecar: SidecarProc) -> list[dict[str, object]]:
    return [line for line in sidecar.log_json() if line.get("logger") == OPS_LOGGER]


def healthz(sidecar: SidecarProc) -> int:
    with urllib.request.urlopen(f"{sidecar.ops_url}/healthz", timeout=10) as response:
        return int(response.status)


def test_many_huge_headers_get_431_and_the_sidecar_memory_stays_bounded(
        launch: Launcher, backend: BackendProc) -> None:
    sidecar = launch.sidecar(one_model(backend.address))
    pid = sidecar.proc.pid
    before = proc_status_kib(pid, "VmRSS")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: exchange(sidecar.ops_listen, huge_headers(), timeout=120)[0], range(6)))
    grown_mib = (proc_status_kib(pid, "VmHWM") - before) / 1024
    # an unlimited reader keeps 6 x 3,000 x 60 KB: more than 1 GB
    assert grown_mib < 100, f"the sidecar's peak RSS grew by {grown_mib:.0f} MiB"
    assert [status_of(a) for a in answers] == [431] * 6, [a[:80] for a in answers]
    assert healthz(sidecar) == 200


def test_a_header_line_over_64k_gets_431_and_one_log_line_without_a_traceback(
        launch: Launcher, backend: BackendProc) -> None:
    sidecar = launch.sidecar(one_model(backend.address))
    request = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    for _ in range(3):
        answer, _ = exchange(sidecar.ops_listen, [request])
        assert status_of(answer) == 431, answer[:200]
    assert healthz(sidecar) == 200
    log = sidecar.proc.log_text()
    assert "Traceback" not in log
    refused = [line for line in ops_lines(sidecar) if line.get("status") == 431]
    # the first refusal logs, the repeats within the minute are only counted
    assert len(refused) == 1, refused
    assert refused[0]["level"] in ("info", "warning")
    assert not [line for line in sidecar.log_json() if line.get("level") in ("error", "critical")]


def test_a_request_line_over_the_limit_gets_414(launch: Launcher, backend: BackendProc) -> None:
    sidecar = launch.sidecar(one_model(backend.address))
    answer, _ = exchange(sidecar.ops_listen, [b"GET /healthz?" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n"])
    assert status_of(answer) == 414, answer[:200]
    answer, _ = exchange(sidecar.ops_listen, [b"GET /healthz?" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"])
    assert status_of(answer) == 414, answer[:200]
    assert "Traceback" not in sidecar.proc.log_text()


def test_a_malformed_request_gets_400(launch: Launcher, backend: BackendProc) -> None:
    sidecar = launch.sidecar(one_model(backend.address))
    for request in (b"HELLO\r\n\r\n", b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
                    b"GET /healthz HTTP/1.1\r\n folded: header\r\n\r\n"):
        answer, _ = exchange(sidecar.ops_listen, [request])
        assert status_of(answer) == 400, (request, answer[:200])
    assert healthz(sidecar) == 200


def test_a_slow_sender_gets_408_within_the_total_receive_timeout(launch: Launcher, backend: BackendProc) -> None:
    """One byte a second, a complete short header line every 4 s: each line alone arrives in
    time, the request as a whole never does."""
    sidecar = launch.sidecar(one_model(backend.address))

    def drip() -> Iterator[bytes]:
        yield b"GET /healthz HTTP/1.1\r\n"
        for _ in range(60):
            yield from (b"X", b":", b"\r", b"\n")

    answer, elapsed = exchange(sidecar.ops_listen, drip(), pause=1.0, timeout=30)
    assert status_of(answer) == 408, answer[:200]
    assert elapsed < 12, f"held {elapsed:.1f} s (the limit is 5 s)"
    assert "Traceback" not in sidecar.proc.log_text()


def test_a_connection_flood_holds_few_sockets_and_a_normal_client_is_served(
        launch: Launcher, backend: BackendProc) -> None:
    """200 connections that keep sending header lines: the listener holds at most
    MAX_CONNECTIONS (64) of them, and /healthz still answers."""
    sidecar = launch.sidecar(one_model(backend.address))
    pid = sidecar.proc.pid
    baseline = open_sockets(pid)
    flood = [connect(sidecar.ops_listen, 10) for _ in range(200)]
    stop = threading.Event()

    def keep_sending() -> None:
        line = b"GET /healthz HTTP/1.1\r\n"
        while not stop.is_set():
            for sock in flood:
                try:
                    sock.send(line)
                except OSError:
                    continue
            line = b"X-Flood: 1\r\n"
            stop.wait(0.5)

    sender = threading.Thread(target=keep_sending, name="ops-flood", daemon=True)
    sender.start()
    try:
        held = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            held = max(held, open_sockets(pid) - baseline)
            time.sleep(0.05)
        assert healthz(sidecar) == 200
        assert held <= 64 + 8, f"the sidecar held {held} more sockets during the flood"
    finally:
        stop.set()
        sender.join(timeout=10)
        for sock in flood:
            sock.close()
    wait_until(lambda: open_sockets(pid) <= baseline + 2, 15, what="flood sockets closed")
    assert "Traceback" not in sidecar.proc.log_text()
