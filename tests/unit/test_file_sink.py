"""`usage.sink: file` when the file cannot be written: records are held and written later, a
batch cut short by a full disk is written again whole, and what cannot be kept (more than
`max_held`, or still held at shutdown) is counted as dropped. Real files; "cannot be written" is
a path under a regular file (ENOTDIR, for root too) or the file size limit (EFBIG, as a full disk)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import REGISTRY

from sidecar.usage.record import Usage
from sidecar.usage.sinks import FileSink

ROOT = Path(__file__).resolve().parents[2]


def dropped() -> float:
    return REGISTRY.get_sample_value("api_router_usage_records_dropped_total", {"reason": "file_unwritable"}) or 0.0


def lines(path: Path) -> list[str]:
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines()]


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_records_are_held_while_the_file_cannot_be_written_and_the_oldest_beyond_the_bound_dropped(
        tmp_path: Path) -> None:
    directory = tmp_path / "usage"
    directory.write_text("a regular file where the directory should be\n")
    path = directory / "usage.jsonl"
    sink = FileSink(path, max_bytes=1 << 20, backups=1, max_held=10)
    await sink.start()
    assert sink.component()["status"] == "degraded" and sink.component()["write_error"].startswith("FileExistsError")
    before = dropped()
    for i in range(25):
        sink.submit(Usage(event_id=f"e{i}", request_id=f"r{i}", org="acme"))
    await sink.flush()
    component = sink.component()
    assert (component["status"], component["held"], component["dropped"]) == ("degraded", 10, 15)
    assert dropped() == before + 15

    directory.unlink()
    directory.mkdir()  # writable again: the retry writes what is held
    await until(lambda: sink.component()["status"] == "ok")
    assert lines(path) == [f"r{i}" for i in range(15, 25)]
    assert sink.component()["held"] == 0 and sink.written == 10
    await sink.aclose()
    assert dropped() == before + 15


async def test_what_is_still_held_at_shutdown_is_counted_as_dropped(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    sink = FileSink(blocker / "usage.jsonl", max_bytes=1 << 20, backups=1)
    await sink.start()
    before = dropped()
    for i in range(3):
        sink.submit(Usage(event_id=f"e{i}", request_id=f"r{i}", org="acme"))
    await sink.aclose()
    assert dropped() == before + 3 and sink.dropped == 3


CUT_SHORT = """
import asyncio, resource, signal, sys, time
from pathlib import Path
from sidecar.usage.record import Usage
from sidecar.usage.sinks import FileSink

async def main() -> None:
    path = Path(sys.argv[1])
    sink = FileSink(path, max_bytes=1 << 20, backups=1)
    await sink.start()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))  # full in the middle of the second line
    for i in range(5):
        sink.submit(Usage(event_id=f"event-{i}", request_id=f"request-{i}", org="acme"))
    await sink.flush()
    print("held", sink.component()["held"], "bytes", path.stat().st_size)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
    deadline = time.monotonic() + 30
    while sink.component()["held"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await sink.aclose()

asyncio.run(main())
"""


def test_a_batch_cut_short_by_a_full_disk_is_written_again_whole(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    result = subprocess.run([sys.executable, "-c", CUT_SHORT, str(path)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "held 5 bytes 0"  # the half-written batch was cut back
    assert lines(path) == [f"request-{i}" for i in range(5)]  # every line whole, none twice
