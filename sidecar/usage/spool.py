"""The write-ahead spool: every usage record is on disk here before Kafka is trusted with it,
and stays until Kafka acknowledges it (or it is handed to the dead-letter store).

Layout of `usage.spool_dir`:

    LOCK                        held (flock) by the process that owns the spool; holds its pid
    checkpoint                  {"acked_below": N}: every record with a lower sequence is settled
    00000000000000000000.seg    segments, named by the sequence of their first record
    dlq/                        the dead-letter store (dlq.py)

A segment is a 16-byte header (magic, first sequence) followed by frames: u32 length, u32
CRC-32 of the payload, payload (one serialized `UsageRecord`); record n of a segment has sequence
first + n. A crash can leave a torn last frame: `open_spool` truncates every segment at its last
whole frame, and counts and reports what it cut.

Each record is WAITING (on disk, Kafka has not got it), IN_FLIGHT (the producer has it) or DONE
(acknowledged, or dead-lettered). A segment file is deleted once it is sealed and all of its
records are DONE; the checkpoint keeps restarts from resending acknowledged records of the
segments that remain (a few may be sent twice: consumers dedupe on `event_id`).

Durability: the writer task takes what has gathered every `fsync_interval` seconds
(`interval`) or as soon as anything waits (`strict`), appends it to the segment file on the
event loop (a write() into the page cache: microseconds), and hands the fsync to the spool's
sync thread, so the loop never waits for the disk. Under `strict` the writer waits for that
fsync before it writes again: the records that arrive meanwhile share the next one (a group
commit). `durable()` is the future of the batch a record will be written in; it resolves when
that batch's fsync has succeeded.

The owner may queue records itself and append them when the writer asks (`source`): the Kafka
sink does, so that the call path only queues a record and the framing, spooling and producing
run once per batch.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from sidecar.tasks import Tasks
from sidecar.telemetry.metrics import (
    SPOOL_TORN_BYTES,
    SPOOL_TORN_TAILS,
    USAGE_RECORDS_BUFFERED,
    USAGE_RECORDS_DROPPED,
)

log = logging.getLogger("sidecar.usage.spool")

MAGIC = b"SCSPOOL1"
HEADER = struct.Struct(">8sQ")
FRAME = struct.Struct(">II")
MAX_FRAME = 64 * 1024 * 1024        # a longer length field can only be corruption
SEGMENT_SUFFIX = ".seg"
IDLE_ROLL_SECONDS = 10.0             # a fully acknowledged segment this old is replaced and deleted
CHECKPOINT_SECONDS = 1.0
WRITE_RETRY_SECONDS = 1.0

WAITING, IN_FLIGHT, DONE = 0, 1, 2
Durability = Literal["interval", "strict"]
OnFull = Literal["reject", "drop_oldest"]


class SpoolLocked(OSError):
    """Another process owns this spool directory."""


def frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(eq=False)
class _Run:
    """Frames appended one after another to one segment, not written yet: one write()."""

    segment: Segment
    data: bytearray = field(default_factory=bytearray)
    count: int = 0


def segment_name(first: int) -> str:
    return f"{first:020d}{SEGMENT_SUFFIX}"


@dataclass
class SegmentScan:
    """What a segment file holds: its first sequence, whole frames, and what follows them."""

    path: Path
    first: int
    payloads: list[bytes]
    good_bytes: int             # header + whole frames
    size: int                   # the file's size
    problem: str = ""           # why the bytes after good_bytes are not frames ("" = none)

    @property
    def torn_bytes(self) -> int:
        return self.size - self.good_bytes


def scan_segment(path: Path) -> SegmentScan:
    """Reads every whole, CRC-valid frame of a segment; stops at the first that is not."""
    data = path.read_bytes()
    first = int(path.name.removesuffix(SEGMENT_SUFFIX))
    if len(data) < HEADER.size:
        return SegmentScan(path, first, [], 0, len(data), "the header is incomplete")
    magic, header_first = HEADER.unpack_from(data)
    if magic != MAGIC or header_first != first:
        return SegmentScan(path, first, [], 0, len(data), "not a spool segment (bad header)")
    payloads: list[bytes] = []
    offset = HEADER.size
    problem = ""
    while offset < len(data):
        if offset + FRAME.size > len(data):
            problem = "a frame header is cut short"
            break
        length, crc = FRAME.unpack_from(data, offset)
        start = offset + FRAME.size
        if length == 0:  # no record is empty: zeroed bytes, e.g. a file extended but never written
            problem = "zeroed bytes instead of a frame"
            break
        if length > MAX_FRAME or start + length > len(data):
            problem = "a frame is cut short"
            break
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            problem = "a frame fails its CRC"
            break
        payloads.append(payload)
        offset = start + length
    return SegmentScan(path, first, payloads, offset, len(data), problem)


def segment_paths(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"*{SEGMENT_SUFFIX}") if p.stem.isdigit())


def read_checkpoint(directory: Path) -> int:
    try:
        return int(json.loads((directory / "checkpoint").read_text())["acked_below"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@dataclass(eq=False)
class Segment:
    first: int
    path: Path
    states: bytearray = field(default_factory=bytearray)   # one state per record
    times: array[float] = field(default_factory=lambda: array("d"))  # wall time each record was spooled
    size: int = HEADER.size      # bytes once everything appended is written
    written: int = 0             # records on disk
    done: int = 0
    waiting: int = 0
    low: int = 0                 # every record below this index is DONE
    sealed: bool = False
    created: float = field(default_factory=time.monotonic)

    @property
    def count(self) -> int:
        return len(self.states)

    @property
    def finished(self) -> bool:
        return self.sealed and self.done == self.count and self.written == self.count

    def advance_low(self) -> int:
        while self.low < self.count and self.states[self.low] == DONE:
            self.low += 1
        return self.low


@dataclass
class _Written:
    """What one writer batch achieved."""

    fds: list[int] = field(default_factory=list)  # files appended to: they need an fsync
    directory: bool = False                    # a segment file was created: the directory too
    closes: list[int] = field(default_factory=list)  # files to close once they are fsynced
    runs: int = 0                              # runs of the batch on disk, in order
    frames: int = 0                            # the frames they hold
    error: OSError | None = None               # why the others are not
    housekeeping_error: OSError | None = None  # deleting segments or the checkpoint failed


@dataclass
class Recovery:
    segments: int = 0
    records: int = 0           # records found on disk
    unsettled: int = 0         # of them, not below the checkpoint: they are replayed
    torn_tails: int = 0
    torn_bytes: int = 0


class Spool:
    """Owns a spool directory; use `open_spool`. All methods run on the event loop; file I/O
    runs in worker threads."""

    def __init__(self, directory: Path, *, durability: Durability, fsync_interval: float,
                 max_bytes: int, on_full: OnFull, segment_bytes: int, lock_fd: int) -> None:
        self.directory = directory
        self.durability = durability
        self.fsync_interval = fsync_interval
        self.max_bytes = max_bytes
        self.on_full = on_full
        # drop_oldest must be able to drop a part of the spool, never all of it at once
        self.segment_bytes = max(4096, min(segment_bytes, max_bytes // 8))
        self.recovery = Recovery()
        self.on_change: Any = None              # called when `full` or `write_error` changes
        self.source: Callable[[], None] | None = None  # appends what the owner queued (see module doc)
        self._lock_fd = lock_fd
        self._segments: list[Segment] = []
        self._firsts: list[int] = []
        self._next_seq = 0
        self._bytes = 0
        self._pending: list[_Run] = []
        self._doomed: list[Path] = []
        self._batch: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._tasks = Tasks()
        self._writer: asyncio.Task[None] | None = None
        self._files: dict[Path, int] = {}       # open segment files
        self._write_failure = ""                # why the last append failed ("" = it did not)
        self._sync_failure = ""                 # why the last fsync failed
        self._resync = False                    # an fsync failed: sync the open file again
        self._syncer = _Syncer(directory, self._sync_state)
        self._flush_lock = asyncio.Lock()
        self._checkpointed = -1
        self._checkpointed_at = 0.0
        self._closing = False
        self._was_full = False

    # --- the record path -------------------------------------------------------------------

    def append(self, payload: bytes, state: int) -> int:
        """Spools one record (written by the next batch) and returns its sequence."""
        size = FRAME.size + len(payload)
        if self.on_full == "drop_oldest":
            self._drop_oldest_for(size)
        segment = self._segments[-1] if self._segments else None
        if (segment is None or segment.sealed or (segment.states and segment.size + size > self.segment_bytes)
                or (segment.states and segment.done == len(segment.states)
                    and time.monotonic() - segment.created > IDLE_ROLL_SECONDS)):
            segment = self._new_segment()
        states = segment.states
        seq = segment.first + len(states)
        states.append(state)
        segment.times.append(time.time())
        if state == WAITING:
            segment.waiting += 1
        segment.size += size
        self._bytes += size
        self._next_seq = seq + 1
        run = self._pending[-1] if self._pending else None
        if run is None or run.segment is not segment:
            run = _Run(segment)
            self._pending.append(run)
        run.data += FRAME.pack(len(payload), zlib.crc32(payload))
        run.data += payload
        run.count += 1
        if not self._wake.is_set():
            self._wake.set()
        if self._bytes >= self.max_bytes or self._was_full:
            self._check_full()
        return seq

    def wake(self) -> None:
        """There is something to write (the owner queued records for `source`)."""
        if not self._wake.is_set():
            self._wake.set()

    def durable(self) -> asyncio.Future[None]:
        """Resolves when what has been appended so far is fsynced (strict durability waits on it)."""
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        return self._batch

    def ack(self, seq: int) -> None:
        """The record is settled: Kafka has it, or the dead-letter store does."""
        segment, index = self._find(seq)
        if segment is None or segment.states[index] == DONE:
            return
        if segment.states[index] == WAITING:
            segment.waiting -= 1
        segment.states[index] = DONE
        segment.done += 1
        if segment.done == segment.count and segment is not self._segments[-1]:
            self._retire(segment)

    def set_waiting(self, seq: int) -> None:
        """Kafka did not take the record (yet): it is replayed from disk."""
        segment, index = self._find(seq)
        if segment is not None and segment.states[index] == IN_FLIGHT:
            segment.states[index] = WAITING
            segment.waiting += 1

    def set_in_flight(self, seq: int) -> bool:
        segment, index = self._find(seq)
        if segment is None or segment.states[index] != WAITING:
            return False
        segment.states[index] = IN_FLIGHT
        segment.waiting -= 1
        return True

    def requeue_in_flight(self) -> int:
        """Every IN_FLIGHT record becomes WAITING (the producer that had them is gone)."""
        moved = 0
        for segment in self._segments:
            for index in range(segment.low, segment.count):
                if segment.states[index] == IN_FLIGHT:
                    segment.states[index] = WAITING
                    moved += 1
                    segment.waiting += 1
        return moved

    async def waiting_records(self) -> AsyncIterator[tuple[int, bytes]]:
        """(sequence, payload) of WAITING records that are on disk, oldest first; each is still
        WAITING when it is yielded."""
        for segment in list(self._segments):
            if not segment.waiting or not segment.written or segment not in self._segments:
                continue
            try:
                scan = await asyncio.to_thread(scan_segment, segment.path)
            except FileNotFoundError:
                continue  # dropped meanwhile (on_spool_full: drop_oldest)
            for index, payload in enumerate(scan.payloads[:segment.written]):
                if segment in self._segments and segment.states[index] == WAITING:
                    yield segment.first + index, payload

    # --- state -----------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def full(self) -> bool:
        return self._bytes >= self.max_bytes

    @property
    def write_error(self) -> str:
        """Why the disk refuses the spool's writes or fsyncs ("" while it does not)."""
        return self._write_failure or self._sync_failure

    @property
    def refusing(self) -> bool:
        """True while calls must be refused: `reject` and full, or the disk refuses writes."""
        return bool(self.write_error) or (self.on_full == "reject" and self.full)

    def unsettled(self) -> int:
        return sum(s.count - s.done for s in self._segments)

    def waiting(self) -> int:
        return sum(s.waiting for s in self._segments)

    def oldest_age(self) -> float:
        """Seconds since the oldest unsettled record was spooled (0 when there is none)."""
        for segment in self._segments:
            low = segment.advance_low()
            if low < segment.count:
                return max(0.0, time.time() - float(segment.times[low]))
        return 0.0

    def acked_below(self) -> int:
        for segment in self._segments:
            low = segment.advance_low()
            if low < segment.count:
                return segment.first + low
        return self._next_seq

    def component(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "status": "failing" if self.refusing else "ok", "dir": str(self.directory),
            "durability": self.durability, "records": self.unsettled(), "waiting": self.waiting(),
            "bytes": self._bytes, "max_bytes": self.max_bytes, "oldest_age_seconds": round(self.oldest_age(), 3),
            "segments": len(self._segments), "on_full": self.on_full}
        if self.write_error:
            detail["write_error"] = self.write_error
        if self.recovery.torn_tails:
            detail["torn_tails_at_start"] = self.recovery.torn_tails
        return detail

    # --- segments --------------------------------------------------------------------------

    def _find(self, seq: int) -> tuple[Segment | None, int]:
        at = bisect.bisect_right(self._firsts, seq) - 1
        if at < 0:
            return None, 0
        segment = self._segments[at]
        index = seq - segment.first
        return (segment, index) if index < segment.count else (None, 0)

    def _new_segment(self) -> Segment:
        if self._segments:
            previous = self._segments[-1]
            previous.sealed = True
            if previous.done == previous.count:
                self._retire(previous)
        segment = Segment(self._next_seq, self.directory / segment_name(self._next_seq))
        self._bytes += segment.size
        self._segments.append(segment)
        self._firsts.append(segment.first)
        return segment

    def _retire(self, segment: Segment) -> None:
        """Forgets a segment; its file is deleted by the writer (after its pending writes)."""
        segment.sealed = True
        if segment.written < segment.count:
            return  # retired again when the writer has written it (see flush)
        at = self._segments.index(segment)
        del self._segments[at], self._firsts[at]
        self._bytes -= segment.size
        self._doomed.append(segment.path)
        self._wake.set()
        self._check_full()

    def _drop_oldest_for(self, needed: int) -> None:
        while self._bytes + needed > self.max_bytes and self._segments:
            oldest = self._segments[0]
            if oldest is self._segments[-1]:
                if not oldest.count:
                    return
                self._new_segment()
                if oldest not in self._segments:
                    continue
            lost = oldest.count - oldest.done
            del self._segments[0], self._firsts[0]
            self._bytes -= oldest.size
            self._pending = [run for run in self._pending if run.segment is not oldest]
            self._doomed.append(oldest.path)
            if lost:
                USAGE_RECORDS_DROPPED.labels("spool_full").inc(lost)
                log.error("spool full: dropped the oldest segment's unacknowledged records",
                          extra={"records": lost, "segment": oldest.path.name, "max_spool_bytes": self.max_bytes})

    def _check_full(self) -> None:
        refusing = self.refusing
        if refusing != self._was_full:
            self._was_full = refusing
            if refusing:
                log.error("usage spool cannot take more records: calls are refused",
                          extra={"bytes": self._bytes, "max_spool_bytes": self.max_bytes, "write_error": self.write_error})
            else:
                log.info("usage spool has room again: calls are accepted")
            if self.on_change is not None:
                self.on_change()

    # --- the writer ------------------------------------------------------------------------

    def start(self) -> None:
        self._writer = self._tasks.spawn(self._write_loop(), name="spool-writer")

    async def _write_loop(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), CHECKPOINT_SECONDS)
            except TimeoutError:
                pass
            if self.durability == "interval" and self._wake.is_set() and not self._closing:
                await asyncio.sleep(self.fsync_interval)
            await self.flush()

    async def flush(self) -> None:
        """Appends what is pending and has it fsynced (under `strict`, waits for the fsync),
        deletes retired segments, updates the checkpoint."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        if self.source is not None:
            self.source()
        self._wake.clear()
        batch, self._pending = self._pending, []
        done, self._batch = self._batch, None
        doomed, self._doomed = self._doomed, []
        checkpoint = None
        if self._closing or time.monotonic() - self._checkpointed_at >= CHECKPOINT_SECONDS:
            acked_below = self.acked_below()
            checkpoint = acked_below if acked_below != self._checkpointed else None
        result = self._write(batch, doomed, checkpoint)
        for run in batch[:result.runs]:
            run.segment.written += run.count
        USAGE_RECORDS_BUFFERED.inc(result.frames)
        if result.housekeeping_error is not None:
            self._doomed = doomed + self._doomed  # deleted (or checkpointed) on the next flush
            log.warning("usage spool housekeeping failed; retrying", extra={"error": str(result.housekeeping_error)})
        elif checkpoint is not None and result.error is None:
            self._checkpointed, self._checkpointed_at = checkpoint, time.monotonic()
        if result.error is not None:
            self._pending = batch[result.runs:] + self._pending  # what is on disk is never written twice
            self._syncer.sync(result.fds, result.directory, None)  # what was appended before the error
            self._syncer.close_all(result.closes)
            self._carry(done)
            exc = result.error
            if not self._write_failure:
                log.error("usage spool write failed; retrying", extra={"error": str(exc)})
            self._write_failure = f"{type(exc).__name__}: {exc.strerror or exc}"
            self._check_full()
            await asyncio.sleep(WRITE_RETRY_SECONDS)
            self._wake.set()
            return
        if self._write_failure:
            log.info("usage spool writes again")
            self._write_failure = ""
            self._check_full()
        for segment in {id(run.segment): run.segment for run in batch}.values():
            if segment.sealed and segment.done == segment.count and segment in self._segments:
                self._retire(segment)
        last = self._segments[-1] if self._segments else None
        if (last is not None and last.count and last.done == last.count and last.written == last.count
                and time.monotonic() - last.created > IDLE_ROLL_SECONDS):
            self._retire(last)  # an idle, settled segment: the next record starts a new one
        await self._sync(result, done)

    async def _sync(self, result: _Written, done: asyncio.Future[None] | None) -> None:
        """Has what `_write` appended fsynced; `done` resolves when it is."""
        if self._resync:
            result.fds.extend(self._files.values())
            result.directory = True
        if not result.fds and not result.directory:
            self._syncer.close_all(result.closes)
            if done is not None and not done.done():
                done.set_result(None)  # nothing of it needed writing
            return
        self._resync = False
        if done is None and self.durability == "interval":
            self._syncer.sync(result.fds, result.directory, None)
            self._syncer.close_all(result.closes)
            return
        finished: asyncio.Future[OSError | None] = asyncio.get_running_loop().create_future()
        self._syncer.sync(result.fds, result.directory, finished)
        self._syncer.close_all(result.closes)
        if self.durability == "strict":
            error = await finished
            self._synced(error, done)
        else:
            finished.add_done_callback(lambda f: self._synced(f.result(), done))

    def _synced(self, error: OSError | None, done: asyncio.Future[None] | None) -> None:
        if error is None:
            if done is not None and not done.done():
                done.set_result(None)
            return
        self._carry(done)  # resolved by a later fsync that succeeds
        self._resync = True
        self._wake.set()

    def _carry(self, done: asyncio.Future[None] | None) -> None:
        """The batch behind `done` was not made durable: it resolves with the next batch."""
        if done is None:
            return
        if self._batch is None:
            self._batch = done
        else:
            self._batch.add_done_callback(partial(_follow, done))

    def _sync_state(self, error: OSError | None) -> None:
        """From the sync thread (on the loop): an fsync failed, or succeeds again after one did."""
        if error is not None:
            if not self._sync_failure:
                log.error("usage spool fsync failed: records appended since the last good fsync may not be on "
                          "disk; retrying", extra={"error": str(error)})
            self._sync_failure = f"{type(error).__name__}: {error.strerror or error}"
            self._resync = True
            self._wake.set()
        elif self._sync_failure:
            log.info("usage spool fsyncs again")
            self._sync_failure = ""
        self._check_full()

    def _write(self, batch: list[_Run], doomed: list[Path], checkpoint: int | None) -> _Written:
        """Appends the batch's frames in order (no fsync: the sync thread does that), then
        deletes retired segments and writes the checkpoint. A failed append is rolled back to
        the last whole frame, so a retry never leaves a half frame or a frame twice on disk."""
        result = _Written()
        try:
            for run in batch:
                fd = self._open(run.segment, result)
                start = os.fstat(fd).st_size
                try:
                    _write_all(fd, run.data)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                    raise
                if fd not in result.fds:
                    result.fds.append(fd)
                result.runs += 1
                result.frames += run.count
        except OSError as exc:
            result.error = exc
            return result
        try:
            for path in doomed:
                fd = self._files.pop(path, -1)
                if fd >= 0:
                    result.closes.append(fd)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if checkpoint is not None:
                tmp = self.directory / "checkpoint.tmp"
                tmp.write_text(json.dumps({"acked_below": checkpoint}))
                tmp.replace(self.directory / "checkpoint")
        except OSError as exc:
            result.housekeeping_error = exc
        return result

    def _open(self, segment: Segment, result: _Written) -> int:
        """The segment's file for appending; a new file gets its header first (and the
        directory an fsync, with the batch's)."""
        fd = self._files.get(segment.path)
        if fd is not None:
            return fd
        for path in list(self._files):  # the writer appends to one segment at a time
            result.closes.append(self._files.pop(path))
        fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size == 0:
                _write_all(fd, HEADER.pack(MAGIC, segment.first))
                result.directory = True
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
            raise
        self._files[segment.path] = fd
        return fd

    async def aclose(self) -> None:
        """Writes and fsyncs what is pending and releases the directory."""
        self._closing = True
        self._wake.set()
        await self._tasks.aclose(timeout=5.0)
        last = self._segments[-1] if self._segments else None
        if last is not None and last.done == last.count:
            self._retire(last)  # everything is settled: nothing to recover next time
        for _ in range(3):
            await self.flush()
            if not self._pending:
                break
        self._syncer.close_all(list(self._files.values()))
        self._files.clear()
        await asyncio.to_thread(self._syncer.stop)
        os.close(self._lock_fd)

    def __repr__(self) -> str:
        return (f"<Spool {self.directory} segments={len(self._segments)} unsettled={self.unsettled()} "
                f"bytes={self._bytes}>")


class _Syncer:
    """The spool's fsync thread. It runs what it is asked in order: fsync files (and the
    directory), close files. Asks that pile up while the disk is slow are served together, so
    a file is fsynced once for all of them. It reports to the loop only when someone waits for
    an fsync, or when fsyncs start or stop failing."""

    def __init__(self, directory: Path, on_state: Callable[[OSError | None], None]) -> None:
        self._directory = directory
        self._on_state = on_state
        self._asks: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def sync(self, fds: list[int], directory: bool, finished: asyncio.Future[OSError | None] | None) -> None:
        """On the loop. The thread starts with the first ask."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="spool-sync", daemon=True)
            self._thread.start()
        self._asks.put(("sync", fds, directory, finished))

    def close_all(self, fds: list[int]) -> None:
        """Closes the files after every fsync asked before (at once if the thread never ran)."""
        for fd in fds:
            if self._thread is None:
                os.close(fd)
            else:
                self._asks.put(("close", fd))

    def stop(self) -> None:
        """Blocking: serves what was asked, then ends the thread."""
        if self._thread is not None:
            self._asks.put(None)
            self._thread.join()

    def _run(self) -> None:
        assert self._loop is not None
        failing = False
        while True:
            asks = [self._asks.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    asks.append(self._asks.get_nowait())
            synced: set[int] = set()
            error: OSError | None = None
            for ask in asks:
                if ask is None:
                    return
                if ask[0] == "close":
                    synced.discard(ask[1])
                    with contextlib.suppress(OSError):
                        os.close(ask[1])
                    continue
                _, fds, directory, finished = ask
                failed: OSError | None = None
                try:
                    for fd in fds:
                        if fd not in synced:
                            os.fsync(fd)
                            synced.add(fd)
                    if directory:
                        fsync_dir(self._directory)
                except OSError as exc:
                    failed = error = exc
                if finished is not None:
                    self._loop.call_soon_threadsafe(_resolve, finished, failed)
            if error is not None or failing:
                failing = error is not None
                self._loop.call_soon_threadsafe(self._on_state, error)


def _follow(done: asyncio.Future[None], _batch: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _resolve(future: asyncio.Future[OSError | None], error: OSError | None) -> None:
    if not future.done():
        future.set_result(error)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    """os.write until everything is written (a short write is followed by the real error)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: Path) -> None:
    """Makes a directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_spool(directory: Path) -> int:
    """Takes the directory's lock for this process or raises `SpoolLocked` naming the owner."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SpoolLocked(f"the usage spool {directory} is in use by pid {owner}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def spool_owner(directory: Path) -> int | None:
    """The pid holding the spool's lock, or None when nobody holds it."""
    try:
        fd = os.open(directory / "LOCK", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None


def open_spool(directory: Path, *, durability: Durability = "interval", fsync_interval: float = 0.02,
               max_bytes: int = 1 << 30, on_full: OnFull = "reject", segment_bytes: int = 16 << 20) -> Spool:
    """Locks the directory and recovers it: torn tails are truncated (counted and logged),
    settled segments deleted, the rest loaded for replay. Blocking: call it in a thread."""
    from sidecar.usage.record import started_seconds

    lock_fd = lock_spool(directory)
    spool = Spool(directory, durability=durability, fsync_interval=fsync_interval, max_bytes=max_bytes,
                  on_full=on_full, segment_bytes=segment_bytes, lock_fd=lock_fd)
    acked_below = read_checkpoint(directory)
    recovery = spool.recovery
    next_seq = acked_below
    for path in segment_paths(directory):
        scan = scan_segment(path)
        if scan.problem:
            recovery.torn_tails += 1
            recovery.torn_bytes += scan.torn_bytes
            SPOOL_TORN_TAILS.inc()
            SPOOL_TORN_BYTES.inc(scan.torn_bytes)
            log.warning("usage spool: torn tail truncated", extra={
                "segment": path.name, "problem": scan.problem, "bytes": scan.torn_bytes,
                "records_kept": len(scan.payloads)})
        if not scan.payloads:
            path.unlink()
            continue
        if scan.problem:
            with open(path, "r+b") as out:
                out.truncate(scan.good_bytes)
                os.fsync(out.fileno())
        recovery.segments += 1
        recovery.records += len(scan.payloads)
        last = scan.first + len(scan.payloads)
        next_seq = max(next_seq, last)
        if last <= acked_below:
            path.unlink()
            continue
        segment = Segment(scan.first, path, sealed=True, size=scan.good_bytes, written=len(scan.payloads))
        for index, payload in enumerate(scan.payloads):
            settled = scan.first + index < acked_below
            segment.states.append(DONE if settled else WAITING)
            segment.times.append(started_seconds(payload))
            segment.done += settled
            segment.waiting += not settled
        recovery.unsettled += segment.waiting
        spool._segments.append(segment)
        spool._firsts.append(segment.first)
        spool._bytes += segment.size
    spool._next_seq = next_seq
    if recovery.records or recovery.torn_tails:
        log.info("usage spool recovered", extra={
            "dir": str(directory), "segments": recovery.segments, "records": recovery.records,
            "to_replay": recovery.unsettled, "torn_tails": recovery.torn_tails, "torn_bytes": recovery.torn_bytes})
    spool._was_full = spool.refusing
    return spool
