"""Operator overrides of routing: a backend's weight, a drain, or a pin; persisted, expiring.

Set through `RoutingAdmin` on the admin listener. One override per (model, backend), at most one
pin per model (a new pin replaces the old). Times are wall-clock epoch seconds, so overrides
survive a restart. Where they are kept (`overrides.store`):

1. `file` (default): this sidecar's `state_dir/overrides.json`, rewritten on every change (temp
   file, fsync, rename) and read at start, dropping what expired meanwhile.
2. `redis`: one hash (`sidecar:routing:overrides`) in the limit store's Redis, shared by every
   sidecar; each one re-reads it every `sync_interval_ms`, so an override set on one replica
   acts on all of them within that interval.

Bounds (`problem()`), the same for an admin call and for what is read back from the store: a
weight is finite, >= 0 and at most config's `MAX_WEIGHT` (a weight of inf, or 1e308 on two
backends, once took all the traffic), a TTL at most a year, names and the reason short and the
reason free of control characters (it is logged).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from redis.exceptions import RedisClusterException, RedisError

from sidecar.config_sections import MAX_SECONDS, MAX_WEIGHT
from sidecar.errors import SidecarError, longer_than
from sidecar.redis_client import Client

log = logging.getLogger("sidecar.routing")
Action = Literal["weight", "drain", "pin"]
FILE_NAME = "overrides.json"
REDIS_KEY = "sidecar:routing:overrides"
MAX_NAME_BYTES = 256                 # a model or backend name in an admin call
MAX_REASON_BYTES = 512
MAX_TTL_SECONDS = MAX_SECONDS        # a year; 0 = until cleared
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is fine


@dataclass(frozen=True, slots=True)
class Override:
    model: str
    backend: str
    action: Action
    weight: float = 0.0        # for action "weight"
    ttl_seconds: int = 0       # 0 = until cleared
    reason: str = ""
    created_by: str = ""       # admin token id
    created_at: float = 0.0
    expires_at: float = 0.0    # 0 = never

    def live(self, now: float) -> bool:
        return self.expires_at == 0.0 or now < self.expires_at

    @property
    def field(self) -> str:
        return f"{self.model}/{self.backend}"


def name_problem(field: str, name: str) -> tuple[str, str] | None:
    """A model or backend name too long to be one (checked before it is looked up or echoed)."""
    if longer_than(name, MAX_NAME_BYTES):
        return field, f"{field} is longer than {MAX_NAME_BYTES} bytes"
    return None


def problem(override: Override) -> tuple[str, str] | None:
    """The first field of `override` out of bounds, and what is wrong with it; None if it is valid."""
    found = name_problem("model", override.model) or name_problem("backend", override.backend)
    if found:
        return found
    if override.action == "weight" and not (math.isfinite(override.weight) and 0 <= override.weight <= MAX_WEIGHT):
        return "weight", f"weight must be a finite number from 0 to {MAX_WEIGHT}"
    if not 0 <= override.ttl_seconds <= MAX_TTL_SECONDS:
        return "ttl_seconds", f"ttl_seconds must be from 0 (until cleared) to {MAX_TTL_SECONDS}"
    if longer_than(override.reason, MAX_REASON_BYTES):
        return "reason", f"reason is longer than {MAX_REASON_BYTES} bytes"
    if _CONTROL.search(override.reason):
        return "reason", "reason must not contain control characters"
    return None


class OverrideTable:
    """The overrides in force, by (model, backend), and where they are kept: a file (`path`),
    a shared Redis hash (`redis`), or neither (memory only, for tests)."""

    def __init__(self, path: Path | None = None, redis: Client | None = None) -> None:
        self.path = path
        self.redis = redis
        self._items: dict[tuple[str, str], Override] = {}
        self._unreadable = False  # logged once when reading starts failing, once when it works again
        self._ignored: tuple[str, ...] = ()  # the bounds broken by overrides read back; logged when it changes

    def live(self, now: float) -> list[Override]:
        return [o for o in self._items.values() if o.live(now)]

    async def load(self, now: float) -> bool:
        """Reads the kept overrides (at start; with Redis, again on every sync). True when the
        table changed. A store that cannot be read keeps the table as it is."""
        try:
            items = self._valid(await self._read())  # a value of the wrong type: TypeError
        except (OSError, ValueError, KeyError, TypeError, RedisError, RedisClusterException) as exc:
            if not self._unreadable:
                log.error("cannot read routing overrides; keeping the ones known",
                          extra={"store": self._where(), "error": str(exc)})
            self._unreadable = True
            return False
        if self._unreadable:
            log.warning("routing overrides readable again", extra={"store": self._where()})
            self._unreadable = False
        fresh = {(o.model, o.backend): o for o in items if o.live(now)}
        changed = fresh != {k: o for k, o in self._items.items() if o.live(now)}
        self._items = fresh
        return changed

    def _valid(self, items: list[Override]) -> list[Override]:
        """The overrides within bounds. Others (written by hand, or by an older sidecar sharing the
        Redis hash) are ignored and logged, once for as long as they stay the same."""
        valid: list[Override] = []
        broken: list[str] = []
        for override in items:
            found = problem(override)
            if found is None:
                valid.append(override)
            else:
                broken.append(found[0])
        ignored = tuple(sorted(broken))
        if ignored and ignored != self._ignored:
            log.error("routing overrides out of bounds ignored", extra={"store": self._where(), "fields": ignored})
        self._ignored = ignored
        return valid

    async def _read(self) -> list[Override]:
        if self.redis is not None:
            return [Override(**json.loads(raw)) for raw in (await self.redis.hgetall(REDIS_KEY)).values()]
        if self.path is None or not self.path.exists():
            return list(self._items.values())
        return [Override(**item) for item in json.loads(self.path.read_text())["overrides"]]

    async def put(self, override: Override) -> None:
        replaced = [o for o in self._items.values()
                    if override.action == "pin" and o.model == override.model and o.action == "pin"
                    and o.backend != override.backend]
        if self.redis is not None:
            try:
                if replaced:
                    await self.redis.hdel(REDIS_KEY, *(o.field for o in replaced))
                await self.redis.hset(REDIS_KEY, override.field, json.dumps(asdict(override)))
            except (RedisError, RedisClusterException) as exc:
                raise _unavailable(exc) from None
        for old in replaced:
            del self._items[(old.model, old.backend)]
        self._items[(override.model, override.backend)] = override
        self._save()

    async def clear(self, model: str, backend: str) -> bool:
        if self.redis is not None:
            try:
                removed = bool(await self.redis.hdel(REDIS_KEY, f"{model}/{backend}"))
            except (RedisError, RedisClusterException) as exc:
                raise _unavailable(exc) from None
            self._items.pop((model, backend), None)
            return removed
        if self._items.pop((model, backend), None) is None:
            return False
        self._save()
        return True

    def _save(self) -> None:
        if self.path is None or self.redis is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w") as out:
            json.dump({"overrides": [asdict(o) for o in self._items.values()]}, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(self.path)

    def _where(self) -> str:
        return f"redis {REDIS_KEY}" if self.redis is not None else str(self.path)

    def __repr__(self) -> str:
        return f"<OverrideTable {len(self._items)} in {self._where()}>"


def _unavailable(exc: RedisError | RedisClusterException) -> SidecarError:
    log.warning("override store unavailable", extra={"error": str(exc)})
    return SidecarError("SERVICE_UNAVAILABLE", "the override store (Redis) is unavailable; nothing was changed")
