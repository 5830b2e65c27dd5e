"""One process per spool directory: an flock on `LOCK`, which also holds the owner's pid (for
the message that names it, and for `sidecar spool status`)."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class SpoolLocked(OSError):
    """Another process owns this spool directory."""


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
