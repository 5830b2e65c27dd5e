"""The write-ahead spool: every usage record is in a segment file here before Kafka is given it,
and stays until Kafka acknowledges it (or it is handed to the dead-letter store).

Layout of `usage.spool_dir`:

    LOCK                        held (flock) by the process that owns the spool; holds its pid
    checkpoint                  {"acked_below": N}: every record with a lower sequence is settled
    00000000000000000000.seg    segments, named by the sequence of their first record
    dlq/                        the dead-letter store (dlq.py)

Modules: `format` (frames, segment header, scan, checkpoint file), `segments` (records' states
in memory), `writer` (appending to segment files), `syncer` (the fsync thread), `lock`,
`core` (`Spool`: the record path and the writer task), `recovery` (`open_spool`).

A crash can leave a torn last frame: `open_spool` truncates every segment at its last whole
frame, and counts and reports what it cut. A segment file is deleted once it is sealed and all
of its records are settled; the checkpoint keeps restarts from resending acknowledged records of
the segments that remain (a few may be sent twice: consumers dedupe on `event_id`).

Durability: the writer task takes what has gathered every `fsync_interval` seconds
(`interval`) or as soon as anything waits (`strict`), appends it to the segment file on the
event loop (a write() into the page cache: microseconds), and hands the fsync to the sync
thread, so the loop never waits for the disk. Under `strict` the writer waits for that fsync
before it writes again: the records that arrive meanwhile share the next one (a group commit).
`durable()` is the future of the batch a record will be written in; it resolves when that
batch's fsync has succeeded. A failed fsync is never made good by fsyncing again (Linux may
have dropped the pages): what no fsync confirmed is written again from memory first.

The order, on disk before Kafka: the owner appends IN_FLIGHT records and hands them to the
producer only once `stored(seq)` says they are in the segment file: written (in the page cache)
under `interval`, fsynced under `strict`. `on_stored` tells it when to look. So under `strict`
Kafka never has a record the spool could lose; under `interval` only a machine crash within
`fsync_interval` can lose a record Kafka may already have (a process crash cannot: the page
cache survives it). Replay reads WAITING records back from the files, with the same rule.

The owner may queue records itself and append them when the writer asks (`source`): the Kafka
sink does, so that the call path only queues a record and the framing, spooling and producing
run once per batch.
"""
from __future__ import annotations

from sidecar.usage.spool.core import (
    CHECKPOINT_SECONDS,
    IDLE_ROLL_SECONDS,
    WRITE_RETRY_SECONDS,
    Durability,
    OnFull,
    Recovery,
    Spool,
)
from sidecar.usage.spool.format import (
    FRAME,
    HEADER,
    MAGIC,
    MAX_FRAME,
    SEGMENT_SUFFIX,
    SegmentScan,
    frame,
    fsync_dir,
    load_checkpoint,
    read_checkpoint,
    scan_segment,
    segment_name,
    segment_paths,
    write_checkpoint,
)
from sidecar.usage.spool.lock import SpoolLocked, lock_spool, spool_owner
from sidecar.usage.spool.recovery import open_spool
from sidecar.usage.spool.segments import DONE, IN_FLIGHT, WAITING, Segment

__all__ = [
    "CHECKPOINT_SECONDS", "DONE", "FRAME", "HEADER", "IDLE_ROLL_SECONDS", "IN_FLIGHT", "MAGIC", "MAX_FRAME",
    "SEGMENT_SUFFIX", "WAITING", "WRITE_RETRY_SECONDS", "Durability", "OnFull", "Recovery", "Segment",
    "SegmentScan", "Spool", "SpoolLocked", "frame", "fsync_dir", "load_checkpoint", "lock_spool", "open_spool",
    "read_checkpoint", "scan_segment", "segment_name", "segment_paths", "spool_owner", "write_checkpoint",
]
