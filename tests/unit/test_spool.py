"""The write-ahead usage spool on real files: round trips, restart replay, torn tails, the
directory lock, strict durability (group commit), capacity (reject / drop_oldest), record states."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.usage.record import new_event_id
from sidecar.usage.spool import (
    HEADER,
    IN_FLIGHT,
    WAITING,
    Spool,
    SpoolLocked,
    frame,
    open_spool,
    read_checkpoint,
    scan_segment,
    segment_paths,
    spool_owner,
)

ROOT = Path(__file__).resolve().parents[2]
SpoolFactory = Callable[..., Spool]
CLOSED: weakref.WeakSet[Spool] = weakref.WeakSet()


def record(i: int, started: float | None = None, pad: int = 200) -> bytes:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if started is None else started) * 1e9))
    return usage_pb2.UsageRecord(event_id=new_event_id(), request_id=f"req-{i}", org="acme", model="m" * pad,
                                 started_at=ts).SerializeToString()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def replay(spool: Spool) -> dict[int, bytes]:
    return {seq: payload async for seq, payload in spool.waiting_records()}


@pytest.fixture
async def spools() -> AsyncIterator[SpoolFactory]:
    """Opens spools and closes, at teardown, those a test left open (releasing their locks)."""
    opened: list[Spool] = []

    def make(directory: Path, **kwargs: object) -> Spool:
        spool = open_spool(directory, **kwargs)  # type: ignore[arg-type]
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        if spool not in CLOSED:
            await spool.aclose()


async def close(spool: Spool) -> None:
    await spool.aclose()
    CLOSED.add(spool)


# --- round trip and replay -------------------------------------------------------------------

async def test_acked_segments_are_deleted_and_aclose_leaves_nothing(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, segment_bytes=4096)
    payloads = [record(i) for i in range(60)]
    seqs = [spool.append(p, IN_FLIGHT) for p in payloads]
    assert seqs == list(range(60))
    await spool.flush()
    paths = segment_paths(tmp_path)
    assert len(paths) >= 4
    assert [p for path in paths for p in scan_segment(path).payloads] == payloads
    assert all(path.stat().st_size <= 4096 for path in paths)
    assert spool.unsettled() == 60 and spool.waiting() == 0
    for seq in seqs:
        spool.ack(seq)
    await spool.flush()
    assert spool.unsettled() == 0 and spool.acked_below() == 60
    assert segment_paths(tmp_path) == paths[-1:]   # only the active segment is left
    await close(spool)
    assert read_checkpoint(tmp_path) == 60         # written at most once a second, and at close
    assert segment_paths(tmp_path) == []
    reopened = spools(tmp_path, segment_bytes=4096)
    assert reopened.recovery.records == 0 and reopened.unsettled() == 0
    assert reopened.append(record(60), WAITING) == 60   # sequences continue after the checkpoint


async def test_restart_replays_exactly_the_unacked_records(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, segment_bytes=4096)
    started = time.time() - 100
    payloads = [record(i, started=started) for i in range(50)]
    for p in payloads:
        spool.append(p, IN_FLIGHT)
    for seq in range(23):
        spool.ack(seq)
    await spool.flush()
    assert read_checkpoint(tmp_path) == 23
    await close(spool)

    again = spools(tmp_path, segment_bytes=4096)
    assert again.recovery.unsettled == 27 and again.recovery.torn_tails == 0
    assert again.unsettled() == 27 and again.waiting() == 27 and again.acked_below() == 23
    assert await replay(again) == {seq: payloads[seq] for seq in range(23, 50)}
    assert 99 < again.oldest_age() < 110   # recovered records are aged by their started_at
    assert again.append(record(50), WAITING) == 50
    await again.flush()
    assert sorted(await replay(again)) == list(range(23, 51))


async def test_segments_below_the_checkpoint_are_deleted_at_open(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, segment_bytes=4096)
    payloads = [record(i) for i in range(50)]
    for p in payloads:
        spool.append(p, IN_FLIGHT)
    await close(spool)
    before = {path: scan_segment(path) for path in segment_paths(tmp_path)}
    (tmp_path / "checkpoint").write_text('{"acked_below": 30}')   # acks that came before a crash
    again = spools(tmp_path, segment_bytes=4096)
    assert (again.recovery.records, again.recovery.unsettled) == (50, 20)
    assert segment_paths(tmp_path) == [p for p, scan in before.items() if scan.first + len(scan.payloads) > 30]
    assert len(segment_paths(tmp_path)) < len(before)
    assert await replay(again) == {seq: payloads[seq] for seq in range(30, 50)}


# --- torn tails ----------------------------------------------------------------------------------

async def spool_five(directory: Path, spools: SpoolFactory) -> tuple[list[bytes], Path]:
    spool = spools(directory)
    payloads = [record(i) for i in range(5)]
    for p in payloads:
        spool.append(p, WAITING)
    await close(spool)
    (path,) = segment_paths(directory)
    assert path.stat().st_size == HEADER.size + sum(len(frame(p)) for p in payloads)
    return payloads, path


def cut_last_frame(path: Path, payloads: list[bytes]) -> int:
    size = path.stat().st_size
    os.truncate(path, size - 5)
    return len(frame(payloads[-1])) - 5


def add_garbage(path: Path, payloads: list[bytes]) -> int:
    with path.open("ab") as out:
        out.write(b"\xff" * 13)
    return 13


def flip_payload_byte(path: Path, payloads: list[bytes]) -> int:
    data = bytearray(path.read_bytes())
    offset = HEADER.size + sum(len(frame(p)) for p in payloads[:3])   # the fourth frame
    data[offset + 8 + 10] ^= 0x40
    path.write_bytes(bytes(data))
    return len(data) - offset


def add_zeroes(path: Path, payloads: list[bytes]) -> int:
    """A file extended but never written (a crash after the size was updated): zeroes, not records."""
    with path.open("ab") as out:
        out.write(bytes(4096))
    return 4096


@pytest.mark.parametrize(("tear", "kept"), [(cut_last_frame, 4), (add_garbage, 5), (flip_payload_byte, 3),
                                            (add_zeroes, 5)])
async def test_torn_tail_is_truncated_counted_and_the_rest_replayed(
        tmp_path: Path, spools: SpoolFactory, tear: Callable[[Path, list[bytes]], int], kept: int) -> None:
    payloads, path = await spool_five(tmp_path, spools)
    torn = tear(path, payloads)
    tails, torn_bytes = metric("api_router_buffer_store_torn_tails_total"), metric(
        "api_router_buffer_store_torn_bytes_total")
    spool = spools(tmp_path)
    assert (spool.recovery.torn_tails, spool.recovery.torn_bytes) == (1, torn)
    assert (spool.recovery.records, spool.recovery.unsettled) == (kept, kept)
    assert metric("api_router_buffer_store_torn_tails_total") == tails + 1
    assert metric("api_router_buffer_store_torn_bytes_total") == torn_bytes + torn
    assert path.stat().st_size == HEADER.size + sum(len(frame(p)) for p in payloads[:kept])
    assert scan_segment(path).problem == ""
    assert spool.component()["torn_tails_at_start"] == 1
    assert await replay(spool) == dict(enumerate(payloads[:kept]))
    assert spool.append(record(9), WAITING) == kept   # a new segment after the truncated one
    await close(spool)
    again = spools(tmp_path)
    assert again.recovery.torn_tails == 0 and again.recovery.unsettled == kept + 1


async def test_segment_with_a_partial_header_is_deleted(tmp_path: Path, spools: SpoolFactory) -> None:
    payloads, path = await spool_five(tmp_path, spools)
    partial = tmp_path / "00000000000000000005.seg"
    partial.write_bytes(HEADER.pack(b"SCSPOOL1", 5)[:10])
    tails = metric("api_router_buffer_store_torn_tails_total")
    spool = spools(tmp_path)
    assert (spool.recovery.torn_tails, spool.recovery.torn_bytes, spool.recovery.unsettled) == (1, 10, 5)
    assert metric("api_router_buffer_store_torn_tails_total") == tails + 1
    assert segment_paths(tmp_path) == [path]
    assert await replay(spool) == dict(enumerate(payloads))


# --- the lock --------------------------------------------------------------------------------------

def try_open_in_subprocess(directory: Path) -> str:
    code = ("import sys\nfrom pathlib import Path\nfrom sidecar.usage.spool import SpoolLocked, open_spool\n"
            "try:\n    open_spool(Path(sys.argv[1]))\nexcept SpoolLocked as exc:\n    print('locked', exc)\n"
            "else:\n    print('opened')\n")
    result = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, check=True)
    return result.stdout.strip()


async def test_the_directory_has_one_owner(tmp_path: Path, spools: SpoolFactory) -> None:
    assert spool_owner(tmp_path) is None
    spool = spools(tmp_path)
    assert spool_owner(tmp_path) == os.getpid()
    with pytest.raises(SpoolLocked, match=f"pid {os.getpid()}"):
        open_spool(tmp_path)
    out = await asyncio.to_thread(try_open_in_subprocess, tmp_path)
    assert out.startswith("locked") and f"pid {os.getpid()}" in out
    assert spool_owner(tmp_path) == os.getpid()   # the failed attempts did not take or clear the lock
    await close(spool)
    assert spool_owner(tmp_path) is None
    assert await asyncio.to_thread(try_open_in_subprocess, tmp_path) == "opened"


# --- durability -----------------------------------------------------------------------------------

async def test_strict_durability_resolves_after_the_frame_is_on_disk(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, durability="strict", fsync_interval=5.0)
    spool.start()
    payload = record(0)
    spool.append(payload, IN_FLIGHT)
    await asyncio.wait_for(spool.durable(), 2)
    (path,) = segment_paths(tmp_path)
    assert scan_segment(path).payloads == [payload]


async def test_strict_durability_group_commits(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, durability="strict")
    spool.start()
    payloads = [record(i) for i in range(100)]
    waves = [asyncio.Event() for _ in range(10)]
    futures: list[asyncio.Future[None]] = []

    async def call(i: int) -> None:
        await waves[i // 10].wait()          # ten callers at a time, while earlier batches are fsynced
        spool.append(payloads[i], IN_FLIGHT)
        future = spool.durable()
        futures.append(future)
        await asyncio.wait_for(asyncio.shield(future), 5)
        (path,) = segment_paths(tmp_path)
        assert payloads[i] in scan_segment(path).payloads   # resolved only once it is on disk

    calls = asyncio.gather(*(call(i) for i in range(100)))
    for wave in waves:
        wave.set()
        await asyncio.sleep(0.001)
    await calls
    assert len(futures) == 100 and all(f.done() for f in futures)
    assert len({id(f) for f in futures}) <= 10   # one fsync batch per wave at most, not per record
    assert scan_segment(segment_paths(tmp_path)[0]).payloads == payloads


async def test_one_batch_across_several_segments_is_written_and_durable(
        tmp_path: Path, spools: SpoolFactory) -> None:
    # one flush appends to several segment files, switching files (and closing the earlier
    # ones in the sync thread) within the batch
    spool = spools(tmp_path, durability="strict", segment_bytes=4096)
    spool.start()
    payloads = [record(i) for i in range(60)]
    spool.append(payloads[0], WAITING)
    await asyncio.wait_for(spool.durable(), 5)  # the sync thread runs from here on
    for payload in payloads[1:]:
        spool.append(payload, WAITING)
    await asyncio.wait_for(spool.durable(), 5)
    assert spool.write_error == ""
    paths = segment_paths(tmp_path)
    assert len(paths) >= 4
    assert [p for path in paths for p in scan_segment(path).payloads] == payloads
    await close(spool)
    assert sorted(await replay(spools(tmp_path))) == list(range(60))


async def test_the_owner_queues_records_and_the_writer_takes_them_with_its_batch(
        tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, durability="strict")
    queued = [record(i) for i in range(5)]
    seqs: list[int] = []

    def source() -> None:
        while queued:
            seqs.append(spool.append(queued.pop(0), WAITING))

    spool.source = source
    spool.start()
    spool.wake()
    await asyncio.wait_for(spool.durable(), 5)
    assert seqs == list(range(5)) and not queued
    (path,) = segment_paths(tmp_path)
    assert len(scan_segment(path).payloads) == 5
    queued.append(record(5))
    await close(spool)  # closing takes what is still queued, too
    assert seqs == list(range(6))
    assert sorted(await replay(spools(tmp_path))) == list(range(6))


# --- capacity -------------------------------------------------------------------------------------

async def test_reject_refuses_when_full_and_recovers_after_acks(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, max_bytes=65536, on_full="reject")
    changes: list[bool] = []
    spool.on_change = lambda: changes.append(spool.refusing)
    seqs: list[int] = []
    while not spool.full:
        assert not spool.refusing and len(seqs) < 1000
        seqs.append(spool.append(record(len(seqs)), IN_FLIGHT))
    assert spool.refusing and spool.size_bytes >= 65536
    assert spool.component()["status"] == "failing" and changes == [True]
    await spool.flush()
    for seq in seqs:
        spool.ack(seq)
    await spool.flush()
    assert not spool.full and not spool.refusing and spool.component()["status"] == "ok"
    assert changes == [True, False]
    assert len(segment_paths(tmp_path)) == 1


async def test_drop_oldest_drops_whole_segments_and_counts_the_lost(tmp_path: Path, spools: SpoolFactory) -> None:
    max_bytes = 65536
    spool = spools(tmp_path, max_bytes=max_bytes, on_full="drop_oldest")
    dropped = metric("api_router_usage_records_dropped_total", reason="spool_full")
    payloads: list[bytes] = []
    acked: set[int] = set()
    for i in range(600):
        payloads.append(record(i))
        assert spool.append(payloads[-1], WAITING) == i
        assert not spool.refusing
        assert spool.size_bytes <= max_bytes + spool.segment_bytes
        if i % 7 == 0:
            spool.ack(i)
            acked.add(i)
        if i % 50 == 0:
            await spool.flush()
    await spool.flush()
    left = await replay(spool)
    first = min(left)
    assert first > 100 and max(left) == 599
    assert left == {seq: payloads[seq] for seq in range(first, 600) if seq not in acked}
    lost = sum(1 for seq in range(first) if seq not in acked)
    assert metric("api_router_usage_records_dropped_total", reason="spool_full") == dropped + lost
    on_disk = sum(path.stat().st_size for path in segment_paths(tmp_path))
    assert on_disk == spool.size_bytes <= max_bytes


# --- record states ---------------------------------------------------------------------------------

async def test_record_states(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path)
    seqs = [spool.append(record(i), IN_FLIGHT if i < 3 else WAITING) for i in range(5)]
    assert spool.waiting() == 2 and spool.unsettled() == 5
    assert spool.set_in_flight(seqs[3]) and not spool.set_in_flight(seqs[3])
    assert spool.waiting() == 1
    spool.ack(seqs[0])
    spool.ack(seqs[0])                       # idempotent
    spool.ack(10_000)
    spool.ack(-1)                            # unknown sequences are ignored
    assert spool.unsettled() == 4 and spool.acked_below() == 1
    spool.set_waiting(seqs[0])               # an acked record stays settled
    spool.set_waiting(seqs[4])               # already WAITING: not counted twice
    assert spool.unsettled() == 4 and spool.waiting() == 1
    assert spool.requeue_in_flight() == 3    # seqs 1, 2 and 3
    assert spool.waiting() == 4 and spool.requeue_in_flight() == 0
    await spool.flush()
    assert sorted(await replay(spool)) == seqs[1:]


async def test_oldest_age(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path)
    assert spool.oldest_age() == 0.0
    seq = spool.append(record(0), IN_FLIGHT)
    await asyncio.sleep(0.05)
    assert 0.04 <= spool.oldest_age() < 1.0
    spool.ack(seq)
    assert spool.oldest_age() == 0.0 and spool.component()["oldest_age_seconds"] == 0.0


# --- write failures --------------------------------------------------------------------------

FULL_DISK = """
import asyncio, resource, signal, sys, time
from pathlib import Path
from sidecar.usage.spool import WAITING, open_spool, scan_segment, segment_paths

async def main() -> None:
    directory = Path(sys.argv[1])
    spool = open_spool(directory, durability="strict")
    spool.start()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 + 2 * 308 + 100, hard))  # full in the third frame
    for i in range(5):
        spool.append(bytes([65 + i]) * 300, WAITING)
    durable = spool.durable()
    deadline = time.monotonic() + 30
    while not spool.write_error and time.monotonic() < deadline:  # the writer met the full disk
        await asyncio.sleep(0.01)
    print("resolved-while-full", durable.done(), "error", bool(spool.write_error), "refusing", spool.refusing)
    print("on-disk", len(scan_segment(segment_paths(directory)[0]).payloads),
          repr(scan_segment(segment_paths(directory)[0]).problem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
    await asyncio.wait_for(durable, 5)
    print("recovered", bool(spool.write_error), spool.refusing)
    await spool.aclose()

asyncio.run(main())
"""


def test_a_full_disk_holds_strict_callers_refuses_calls_and_loses_nothing(tmp_path: Path) -> None:
    """The disk fills in the middle of a batch: the half frame is rolled back, strict callers
    wait, the spool refuses calls; with room again, everything is written exactly once."""
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "resolved-while-full False error True refusing True"
    assert lines[1] == "on-disk 0 ''"  # the half-written batch was rolled back: no half frame
    assert lines[2] == "recovered False False"
    (path,) = segment_paths(tmp_path)
    assert scan_segment(path).payloads == [bytes([65 + i]) * 300 for i in range(5)]


async def test_a_failed_checkpoint_never_writes_a_frame_twice(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path)
    (tmp_path / "checkpoint.tmp").mkdir()  # the checkpoint cannot be replaced
    for name in (b"A", b"B", b"C"):
        spool.append(name, WAITING)
    await spool.flush()
    (tmp_path / "checkpoint.tmp").rmdir()
    await spool.flush()
    spool.append(b"D", WAITING)
    await spool.flush()
    assert scan_segment(segment_paths(tmp_path)[0]).payloads == [b"A", b"B", b"C", b"D"]
    assert await replay(spool) == {0: b"A", 1: b"B", 2: b"C", 3: b"D"}


async def test_a_segment_dropped_during_a_replay_pass_is_skipped(tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, max_bytes=65536, on_full="drop_oldest")
    while spool.size_bytes < 60000:
        spool.append(b"x" * 300, WAITING)
    await spool.flush()
    seen: list[int] = []
    async for seq, _ in spool.waiting_records():
        seen.append(seq)
        if len(seen) == 1:  # calls keep coming: the oldest segments are dropped and deleted
            for _ in range(60):
                spool.append(b"y" * 300, WAITING)
            await spool.flush()
    assert seen and seen[-1] > seen[0]


SETTLED_THEN_FULL = """
import asyncio, resource, signal, sys
from pathlib import Path
from sidecar.usage.spool import IN_FLIGHT, open_spool, segment_paths

async def main() -> None:
    directory = Path(sys.argv[1])
    spool = open_spool(directory, segment_bytes=4096)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    seqs = [spool.append(bytes([65 + i]) * 300, IN_FLIGHT) for i in range(20)]  # 13 fill the first segment
    await spool.flush()
    first, second = segment_paths(directory)
    for seq in seqs[:13]:
        spool.ack(seq)  # the first segment is settled: the next batch deletes its file
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (second.stat().st_size + 100, hard))  # the disk is full
    spool.append(b"Z" * 300, IN_FLIGHT)
    await spool.flush()  # that batch's append fails
    print("write-error", bool(spool.write_error))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
    await spool.flush()
    on_disk = sum(path.stat().st_size for path in segment_paths(directory))
    print("first-deleted", not first.exists(), "accounted", on_disk == spool.size_bytes, on_disk, spool.size_bytes)
    await spool.aclose()

asyncio.run(main())
"""


def test_a_failed_append_still_deletes_the_settled_segments(tmp_path: Path) -> None:
    """A batch whose append fails (a full disk) still deletes the segments that were settled
    before it: the spool accounts for exactly the files on disk."""
    result = subprocess.run([sys.executable, "-c", SETTLED_THEN_FULL, str(tmp_path)], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "write-error True"
    assert lines[1].startswith("first-deleted True accounted True"), lines[1]


class LosingFsync:
    """An fsync that fails once, the way a failed writeback does on Linux: the unsynced part of
    the file is lost from the disk (here: zeroed past `keep`), the error is reported once, and
    the next fsync succeeds."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.failed = 0

    def __call__(self, fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and not self.failed:
            self.failed += 1
            os.ftruncate(fd, self.keep)          # what the disk holds: the old data, then zeroes
            os.ftruncate(fd, info.st_size)
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)


@pytest.mark.parametrize("durability", ["strict", "interval"])
async def test_a_failed_fsync_is_written_again_before_it_counts_as_durable(
        tmp_path: Path, spools: SpoolFactory, durability: str) -> None:
    """After a failed fsync a later fsync proves nothing: the records appended since the last good
    fsync are written again from memory, and a caller waiting for them (strict) is answered only
    once that rewrite is fsynced."""
    spool = spools(tmp_path, durability=durability)
    spool.start()
    payloads = [bytes([65 + i]) * 100 for i in range(4)]
    spool.append(payloads[0], IN_FLIGHT)
    await asyncio.wait_for(spool.durable(), 10)
    (path,) = segment_paths(tmp_path)
    losing = LosingFsync(keep=path.stat().st_size)
    spool.syncer.fsync = losing
    spool.append(payloads[1], IN_FLIGHT)
    spool.append(payloads[2], IN_FLIGHT)
    await asyncio.wait_for(spool.durable(), 10)
    assert losing.failed == 1
    scan = scan_segment(path)
    assert (scan.payloads, scan.problem) == (payloads[:3], "")  # written again, not just fsynced again
    assert spool.write_error == "" and not spool.refusing
    spool.append(payloads[3], IN_FLIGHT)
    await asyncio.wait_for(spool.durable(), 10)
    assert scan_segment(path).payloads == payloads
    assert on_disk(tmp_path) == spool.size_bytes
    await close(spool)
    assert await replay(spools(tmp_path)) == dict(enumerate(payloads))


async def test_a_record_is_stored_once_it_is_written_or_under_strict_fsynced(
        tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path, durability="strict")
    spool.start()
    seq = spool.append(record(0), IN_FLIGHT)
    assert spool.stored(seq) is False
    await asyncio.wait_for(spool.durable(), 10)
    assert spool.stored(seq) is True
    spool.ack(seq)
    assert spool.stored(seq) is None   # settled: not its owner's to send any more
    waiting = spool.append(record(1), WAITING)
    assert spool.stored(waiting) is None   # WAITING records are replay's


def on_disk(directory: Path) -> int:
    return sum(path.stat().st_size for path in segment_paths(directory))


# --- the checkpoint ---------------------------------------------------------------------------

async def test_a_torn_checkpoint_is_logged_and_everything_on_disk_is_replayed(
        tmp_path: Path, spools: SpoolFactory, caplog: pytest.LogCaptureFixture) -> None:
    spool = spools(tmp_path)
    payloads = [record(i) for i in range(5)]
    for p in payloads:
        spool.append(p, IN_FLIGHT)
    spool.ack(0)
    await close(spool)
    assert read_checkpoint(tmp_path) == 1
    (tmp_path / "checkpoint").write_text('{"acked_bel')   # torn by a crash
    with caplog.at_level(logging.WARNING, logger="sidecar.usage.spool"):
        again = spools(tmp_path)
    warnings = [r for r in caplog.records if r.getMessage() == "usage spool checkpoint unreadable: every record "
                "on disk is replayed"]
    assert len(warnings) == 1
    assert again.recovery.unsettled == 5   # at least once: the acknowledged one is sent again too
    assert await replay(again) == dict(enumerate(payloads))
    assert again.component()["checkpoint_unreadable_at_start"].startswith("not a checkpoint")


async def test_the_checkpoint_is_fsynced_before_it_replaces_the_old_one(
        tmp_path: Path, spools: SpoolFactory) -> None:
    spool = spools(tmp_path)
    fsynced: list[str] = []

    def recording(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)

    spool.syncer.fsync = recording
    spool.ack(spool.append(record(0), IN_FLIGHT))
    await spool.flush()
    assert read_checkpoint(tmp_path) == 1
    tmp, directory = str(tmp_path / "checkpoint.tmp"), str(tmp_path)
    assert tmp in fsynced, fsynced                      # the new content is on disk before the rename
    assert directory in fsynced[fsynced.index(tmp):], fsynced  # and the rename is, after it
    assert not (tmp_path / "checkpoint.tmp").exists()
