"""Session and prefix affinity: consistent hashing with bounded loads (Mirrokni, Thorup,
Zadimoghaddam 2018).

Pure and synchronous. Each backend name owns `points_per_name` points on a 64-bit ring; a key
goes to the first name clockwise from its own point. A key is a session id (`affinity: session`)
or the first bytes of a request's input (`affinity: prefix`, see `input_prefix`). So a session,
or a shared system prompt, keeps its backend (and its prompt cache) while the set of names holds
still, and when a backend leaves `candidates` (unhealthy, ejected, draining, already tried) only
the keys it held move, each to the next name clockwise. The bound keeps a hot key from piling
onto one backend: a name whose load has reached `ceil(bound * (total load + 1) / len(candidates))`
is passed over like an absent one, so no backend takes more than about `bound` times the mean.

Hashes are blake2b of the key's bytes (UTF-8 for text), never the built-in `hash()`
(randomized per process): every sidecar replica, before and after a restart, maps a key to the
same backend.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence


def stable_hash(key: str | bytes) -> int:
    """A 64-bit hash of `key` (text as UTF-8) that is the same in every process and on every platform."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def input_prefix(text: str, data: bytes, limit: int) -> bytes:
    """The prefix key of a request: the first `limit` bytes of its text input in UTF-8, or, when
    it has no text, of its binary input; all of it when shorter; b"" when it has neither.

    Slices before encoding: a character is at least one byte, so `limit` characters hold the
    first `limit` bytes, and a long input is never encoded whole. A cut may fall inside a
    multi-byte character; the key is only hashed, so that is harmless.
    """
    if text:
        return text[:limit].encode()[:limit]  # the last slice copies only when non-ASCII ran past `limit`
    return data[:limit]


class HashRing:
    def __init__(self, names: Sequence[str], points_per_name: int = 100) -> None:
        if points_per_name < 1:
            raise ValueError(f"points_per_name must be at least 1, not {points_per_name}")
        self._names = frozenset(names)
        # (point, name) sorted; a name breaks the (unlikely) tie of two equal points
        ring = sorted((stable_hash(f"{name}#{i}"), name) for name in self._names
                      for i in range(points_per_name))
        self._points = [point for point, _ in ring]
        self._owners = [name for _, name in ring]

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def preference(self, key: str | bytes) -> list[str]:
        """Every name once, in the order `choose` considers them for `key`: first the owner of
        the first point clockwise from the key's hash, then the next new name, and so on."""
        return list(self._clockwise(key))

    def choose(self, key: str | bytes, candidates: Collection[str], load: Mapping[str, int],
               bound: float = 1.25) -> str | None:
        """The first name clockwise from hash(key) that is in `candidates` and whose load is below
        ceil(bound * (sum of candidates' loads + 1) / len(candidates)); None when candidates is empty.

        `load` is each name's current load (e.g. calls in flight; a missing name counts 0); the
        `+ 1` is the call being placed. Candidates not on the ring are ignored (as if absent).
        With `bound >= 1` some candidate is always below the capacity, so the answer is None only
        when no candidate is on the ring.
        """
        if bound < 1.0:
            raise ValueError(f"bound must be at least 1, not {bound}")
        members = {name for name in candidates if name in self._names}
        if not members:
            return None
        total = sum(load.get(name, 0) for name in members)
        capacity = math.ceil(bound * (total + 1) / len(members))
        for name in self._clockwise(key):
            if name in members and load.get(name, 0) < capacity:
                return name
        return None  # not reached: the least loaded member is at most the mean, below capacity

    def _clockwise(self, key: str | bytes) -> Iterator[str]:
        count = len(self._points)
        start = bisect.bisect_right(self._points, stable_hash(key))
        seen: set[str] = set()
        for step in range(count):
            name = self._owners[(start + step) % count]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self._names):
                    return

    def __repr__(self) -> str:
        return f"<HashRing names={sorted(self._names)} points={len(self._points)}>"
