"""How the sidecar process hands memory back to the system (glibc's allocator on Linux).

A request of a few MiB passes through several buffers of its size (gRPC's, the bytes Python
gets, the parsed message). glibc serves such sizes with mmap (given back when freed) only up
to a threshold that it raises to the size of the largest block freed so far, up to 32 MiB: after
the first large request, the next ones come from the heap, and the heap keeps what they freed.
Large requests a backend refused raised RSS by hundreds of MB that stayed. A fixed threshold
(which also stops glibc moving it) keeps every large buffer in its own mapping.
"""
from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger("sidecar.memory")
M_MMAP_THRESHOLD = -3           # mallopt parameter, glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB or more are mapped on their own


def give_large_blocks_back() -> bool:
    """At start of `sidecar run`: fixes glibc's mmap threshold. False (and nothing changes) off
    glibc, e.g. on musl or macOS."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not done:
        log.warning("could not set the allocator's mmap threshold; large requests may keep memory")
    return done
