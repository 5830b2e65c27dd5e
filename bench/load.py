"""Throughput load: h2load with gRPC framing, or a multi-process Python fallback (bench/pyload.py)."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from latency import API_KEY, INFER

PYLOAD = Path(__file__).with_name("pyload.py")


@dataclass
class LoadResult:
    tool: str
    requests: int         # completed requests as the tool counts them
    grpc_ok: int | None   # requests known to have ended with grpc-status 0 (None: unknown)
    seconds: float
    rps: float
    data_bytes: int | None = None  # response DATA bytes (h2load only)


def h2load_path() -> str | None:
    return shutil.which("h2load")


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


async def run_h2load(address: str, body_file: Path, requests: int, connections: int, streams: int,
                     timeout: float, prefix: list[str] | None = None) -> LoadResult:
    """One h2load run (prefix: e.g. a taskset command to pin it)."""
    argv = [*(prefix or []), "h2load", "-n", str(requests), "-c", str(connections), "-m", str(streams), "-t", "1",
            "-d", str(body_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"authorization: Bearer {API_KEY}",
            "-N", "10s", f"http://{address}{INFER}"]
    return parse_h2load(await process_output(argv, timeout))


def parse_h2load(out: str) -> LoadResult:
    finished = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    data = re.search(r"\((\d+)\) data", out)
    if not (finished and done and data):
        raise RuntimeError(f"cannot parse h2load output:\n{out}")
    seconds = float(finished[1]) / (1000 if finished[2] == "ms" else 1)
    return LoadResult(tool="h2load", requests=int(done[2]), grpc_ok=None, seconds=seconds,
                      rps=float(finished[3]), data_bytes=int(data[1]))


async def run_pyload(address: str, body_hex: str, requests: int, processes: int, concurrency: int,
                     timeout: float) -> LoadResult:
    """Fallback: `processes` Python workers, each `concurrency` in-flight calls on one channel."""
    shares = [requests // processes + (1 if i < requests % processes else 0) for i in range(processes)]
    outputs = await asyncio.gather(*(
        process_output([sys.executable, str(PYLOAD), "--target", address, "--body-hex", body_hex,
                 "--requests", str(n), "--concurrency", str(concurrency)], timeout) for n in shares))
    reports = [json.loads(out) for out in outputs]
    seconds = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    ok = sum(r["ok"] for r in reports)
    done = sum(r["ok"] + r["errors"] for r in reports)
    return LoadResult(tool="pyload", requests=done, grpc_ok=ok, seconds=seconds, rps=ok / seconds)


async def process_output(argv: list[str], timeout: float) -> str:
    """stdout of argv; the process is killed if this is cancelled or times out."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited with {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return out.decode()
