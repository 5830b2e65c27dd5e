"""The spool's files: segments of frames, and the checkpoint.

A segment is a 16-byte header (magic, first sequence) followed by frames: u32 length, u32
CRC-32 of the payload, payload (one serialized `UsageRecord`); record n of a segment has sequence
first + n. Segments are named by the sequence of their first record.

The checkpoint, {"acked_below": N}, says every record with a lower sequence is settled. It is
written to a temporary file, fsynced, renamed over the old one, and the directory fsynced: a
crash leaves the old checkpoint or the new one, never a torn one. A checkpoint that cannot be
read anyway (a torn or foreign file) counts as 0: every record still on disk is replayed, which
is safe because delivery is at least once and consumers dedupe on `event_id`.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SCSPOOL1"
HEADER = struct.Struct(">8sQ")
FRAME = struct.Struct(">II")
MAX_FRAME = 64 * 1024 * 1024        # a longer length field can only be corruption
SEGMENT_SUFFIX = ".seg"
CHECKPOINT = "checkpoint"
CHECKPOINT_TMP = "checkpoint.tmp"


def frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def segment_name(first: int) -> str:
    return f"{first:020d}{SEGMENT_SUFFIX}"


def segment_paths(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"*{SEGMENT_SUFFIX}") if p.stem.isdigit())


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
    offset, problem = HEADER.size, ""
    while offset < len(data) and not problem:
        payload, problem = _frame_at(data, offset)
        if payload is not None:
            payloads.append(payload)
            offset += FRAME.size + len(payload)
    return SegmentScan(path, first, payloads, offset, len(data), problem)


def _frame_at(data: bytes, offset: int) -> tuple[bytes | None, str]:
    """The payload of the frame at `offset`, or why there is no whole, valid frame there."""
    if offset + FRAME.size > len(data):
        return None, "a frame header is cut short"
    length, crc = FRAME.unpack_from(data, offset)
    start = offset + FRAME.size
    if length == 0:  # no record is empty: zeroed bytes, e.g. a file extended but never written
        return None, "zeroed bytes instead of a frame"
    if length > MAX_FRAME or start + length > len(data):
        return None, "a frame is cut short"
    payload = data[start:start + length]
    if zlib.crc32(payload) != crc:
        return None, "a frame fails its CRC"
    return payload, ""


def load_checkpoint(directory: Path) -> tuple[int, str]:
    """(acked_below, why the checkpoint could not be read: "" when it could or there is none)."""
    path = directory / CHECKPOINT
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0, ""
    except OSError as exc:
        return 0, f"{type(exc).__name__}: {exc.strerror or exc}"
    try:
        value = json.loads(text)["acked_below"]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, ""
        return 0, f"acked_below is not a sequence: {value!r}"
    except (ValueError, KeyError, TypeError) as exc:
        return 0, f"not a checkpoint ({type(exc).__name__}: {exc}); {len(text)} bytes"


def read_checkpoint(directory: Path) -> int:
    """The checkpoint's acked_below (0 when there is none or it cannot be read)."""
    return load_checkpoint(directory)[0]


def write_checkpoint(directory: Path, acked_below: int, fsync: Callable[[int], None] = os.fsync) -> None:
    """Replaces the checkpoint atomically and durably (blocking: the spool's sync thread runs it)."""
    tmp = directory / CHECKPOINT_TMP
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, json.dumps({"acked_below": acked_below}).encode())
        fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(directory / CHECKPOINT)
    fsync_dir(directory, fsync)


def write_all(fd: int, data: bytes | bytearray) -> None:
    """os.write until everything is written (a short write is followed by the real error)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: Path, fsync: Callable[[int], None] = os.fsync) -> None:
    """Makes a directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)
