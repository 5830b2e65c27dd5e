"""Starting, watching and stopping the processes under test: free ports, readiness, CPU time."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback port that was free a moment ago (the usual small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback() -> str:
    return f"127.0.0.1:{free_port()}"


@dataclass
class Proc:
    """One started process, its log file, and what it was started as."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log tail:\n{tail}")


def start(name: str, argv: list[str], log_dir: Path, cpus: str | None = None) -> Proc:
    """Starts argv with stdout/stderr in log_dir/NAME.log, optionally pinned with taskset."""
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Proc(name=name, argv=argv, log=log, popen=popen)


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3, `state`, is index 0)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its live descendants, all threads included."""
    total = 0
    for p in (pid, *descendants(pid)):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14 and 15)
    return total / CLOCK_TICKS


def stop(proc: Proc, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after timeout; stragglers among its descendants are killed by pid."""
    if proc.popen.poll() is not None:
        return
    kids = descendants(proc.pid)
    proc.popen.send_signal(signal.SIGTERM)
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait()
    for kid in kids:
        try:
            os.kill(kid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def wait_serving(proc: Proc, address: str, timeout: float = 30.0,
                       credentials: grpc.ChannelCredentials | None = None) -> None:
    """Waits until grpc.health.v1.Health/Check with service "" answers SERVING (over TLS with
    `credentials`)."""
    deadline = time.monotonic() + timeout
    channel = (grpc.aio.insecure_channel(address) if credentials is None
               else grpc.aio.secure_channel(address, credentials))
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            proc.check_alive()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} at {address} not SERVING after {timeout}s")
            await asyncio.sleep(0.1)


def loaded_event_loop(pid: int) -> str:
    """'uvloop' if the process has uvloop's extension mapped, else 'asyncio' (a heuristic)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "asyncio"
    return "uvloop" if "/uvloop/" in maps else "asyncio"


def cancel_on_sigterm() -> None:
    """Makes SIGTERM cancel the running task like Ctrl-C does, so its cleanup (`finally`) runs."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
