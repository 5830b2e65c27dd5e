"""Opening a spool: lock the directory, read the checkpoint, check every segment frame by frame,
truncate torn tails (counted and logged), delete what is settled, load the rest for replay."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from sidecar.telemetry.metrics import SPOOL_TORN_BYTES, SPOOL_TORN_TAILS
from sidecar.usage.spool.core import Durability, OnFull, Recovery, Spool
from sidecar.usage.spool.format import SegmentScan, load_checkpoint, scan_segment, segment_paths
from sidecar.usage.spool.lock import lock_spool
from sidecar.usage.spool.segments import DONE, WAITING, Segment

log = logging.getLogger("sidecar.usage.spool")


def open_spool(directory: Path, *, durability: Durability = "interval", fsync_interval: float = 0.02,
               max_bytes: int = 1 << 30, on_full: OnFull = "reject", segment_bytes: int = 16 << 20) -> Spool:
    """Locks the directory and recovers it. Blocking: call it in a thread."""
    lock_fd = lock_spool(directory)
    spool = Spool(directory, durability=durability, fsync_interval=fsync_interval, max_bytes=max_bytes,
                  on_full=on_full, segment_bytes=segment_bytes, lock_fd=lock_fd)
    acked_below = _checkpoint(directory, spool.recovery)
    next_seq = acked_below
    for path in segment_paths(directory):
        scan = _scan(path, spool.recovery)
        if scan is None:
            continue
        last = scan.first + len(scan.payloads)
        next_seq = max(next_seq, last)
        if last <= acked_below:
            path.unlink()
            continue
        spool.table.add(_segment(scan, acked_below, spool.recovery))
    spool.table.next_seq = next_seq
    recovery = spool.recovery
    if recovery.records or recovery.torn_tails:
        log.info("usage spool recovered", extra={
            "dir": str(directory), "segments": recovery.segments, "records": recovery.records,
            "to_replay": recovery.unsettled, "torn_tails": recovery.torn_tails, "torn_bytes": recovery.torn_bytes})
    spool._was_full = spool.refusing
    return spool


def _checkpoint(directory: Path, recovery: Recovery) -> int:
    """The checkpoint's acked_below; one that cannot be read is logged and counts as 0 (every
    record on disk is replayed: at least once, consumers dedupe)."""
    acked_below, problem = load_checkpoint(directory)
    if problem:
        recovery.checkpoint_problem = problem
        log.warning("usage spool checkpoint unreadable: every record on disk is replayed",
                    extra={"dir": str(directory), "problem": problem})
    return acked_below


def _scan(path: Path, recovery: Recovery) -> SegmentScan | None:
    """The segment's whole frames, its torn tail truncated (counted, logged); None when it held
    none (the file is deleted)."""
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
        return None
    if scan.problem:
        with open(path, "r+b") as out:
            out.truncate(scan.good_bytes)
            os.fsync(out.fileno())
    recovery.segments += 1
    recovery.records += len(scan.payloads)
    return scan


def _segment(scan: SegmentScan, acked_below: int, recovery: Recovery) -> Segment:
    """A recovered segment: sealed, on disk; records below the checkpoint DONE, the rest WAITING."""
    from sidecar.usage.record import started_seconds

    count = len(scan.payloads)
    segment = Segment(scan.first, scan.path, sealed=True, size=scan.good_bytes, written=count, synced=count)
    for index, payload in enumerate(scan.payloads):
        settled = scan.first + index < acked_below
        segment.states.append(DONE if settled else WAITING)
        segment.times.append(started_seconds(payload))
        segment.done += settled
        segment.waiting += not settled
    recovery.unsettled += segment.waiting
    return segment
