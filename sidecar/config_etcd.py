"""etcd as the config source (`config_source.kind: etcd`): every sidecar of a fleet reads one
key, watches it, and applies each new revision through the same validate-then-swap as a reloaded
file (`Sidecar.offer_config`, app.py): there is one way a config becomes live.

1. Start (`load_initial`): the key is read within `timeout_ms`. When etcd is down, the key does
   not exist or its value is refused, the sidecar starts from `cache_file`, the last config it
   applied, and says so (a warning, `/readyz`); with no cache either, `sidecar run` exits 2
   saying why. A value read from etcd goes to the cache at once.
2. Run (`run`): read the key, then watch it from the next revision. Each new value is offered:
   a valid one goes live and is written to the cache with its revision; an invalid one is
   refused by the sidecar (logged with its key paths, counted in
   `api_router_config_reloads_total{result="failure"}`) and the old config stays. When etcd goes
   away the loop waits (0.25 s, doubling to 5 s) and starts over with a read, so a revision
   written meanwhile is not missed. Calls go on under the config that runs all along.
3. A deleted key changes nothing: the config that runs stays, and `/readyz` says the key is gone.

Readiness never waits for etcd: a sidecar running from its cache serves. `component()` is
`components.config_source` in `/readyz` and `/healthz`, and the gauges
`api_router_config_source_up` and `_revision` show the same to Prometheus.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import (
    Config,
    ConfigError,
    ConfigSourceConfig,
    config_text,
    machine_problems,
    parse_config,
)
from sidecar.config_cache import CachedConfig, read_cache, write_cache
from sidecar.etcd_kv import EtcdKV, EtcdUnavailable, KeyValue
from sidecar.telemetry.metrics import CONFIG_RELOADS, CONFIG_SOURCE_REVISION, CONFIG_SOURCE_UP

log = logging.getLogger("sidecar.config_source")

FIRST_BACKOFF = 0.25  # seconds before reading again after etcd failed; doubles up to MAX_BACKOFF
MAX_BACKOFF = 5.0
# validates and applies a value (app.py): what became of it (success, unchanged, failure, ignored)
# and, for a failure, the problems
Offer = Callable[[bytes, str], Awaitable[tuple[str, list[str]]]]


@dataclass(frozen=True)
class Initial:
    """The config a sidecar starts with, its text (the config version is its digest) and the
    etcd revision it came from."""

    config: Config
    text: str
    revision: int


def file_source_component(path: str | Path | None) -> Callable[[], dict[str, Any]]:
    """`components.config_source` of a sidecar whose config is a file (or embedded: `demo`)."""
    CONFIG_SOURCE_UP.set(1)
    body = {"status": "ok", "kind": "file", **({"path": str(path)} if path is not None else {})}
    return lambda: dict(body)


class EtcdConfigSource:
    def __init__(self, source: ConfigSourceConfig, kv: EtcdKV | None = None) -> None:
        self.source = source
        self.key = source.key
        self._kv = kv or EtcdKV(source)
        self.revision = 0                       # the etcd revision of the config that runs
        self._origin = "etcd"                   # where that config was read: etcd, or the cache
        self._up = False                        # the key was read on the last try (and is watched)
        self._error: str | None = None          # why etcd cannot be used, while it cannot
        self._problem: str | None = None        # what else keeps the source from ok (refused, deleted)
        self._refused: tuple[int, list[str]] | None = None  # the last revision refused, its problems
        self._missing = False                   # the key's absence was logged
        self._cache_error: str | None = None
        self._backoff = FIRST_BACKOFF
        self._turn = asyncio.Lock()             # values are considered one at a time, in order
        CONFIG_SOURCE_UP.set(0)

    def __repr__(self) -> str:
        return f"<EtcdConfigSource {self.key!r} revision={self.revision} {'up' if self._up else 'down'}>"

    # --- start ----------------------------------------------------------------------------------

    async def load_initial(self) -> Initial:
        """The config to start with: etcd's, else the cache's; `ConfigError` when neither can be
        used, naming why (for `sidecar run`'s exit 2)."""
        hint = "; push a config first: sidecar config push FILE --config BOOTSTRAP"
        try:
            value, _ = await self._kv.get(self.key)
            self._set_up()
            reason = f"etcd key {self.key} does not exist"
        except EtcdUnavailable as exc:
            value, reason, hint = None, f"etcd cannot be read ({exc})", "; it starts once etcd can be read"
            self._set_down(str(exc))
        refused: list[str] = []
        if value is not None:
            where = f"etcd {self.key} revision {value.mod_revision}"
            try:
                text = config_text(value.value, where)
                config = _parse(text)
            except ConfigError as exc:
                CONFIG_RELOADS.labels("failure").inc()
                log.error("config from etcd refused", extra={"path": where, "problems": exc.problems})
                self._refuse(value.mod_revision, exc.problems)
                refused, reason = exc.problems, f"revision {value.mod_revision} of etcd key {self.key} is refused"
                hint = ""
            else:
                self._went_live(value.mod_revision)
                await self._write_cache(value.mod_revision, text)
                return Initial(config, text, value.mod_revision)
        return self._from_cache(reason, hint, refused)

    def _from_cache(self, reason: str, hint: str, refused: list[str]) -> Initial:
        path = self.source.cache_file
        cached = read_cache(path)
        if cached is None or cached.key != self.key:
            why = "there is no cache file " + path if cached is None else f"the cache file {path} holds key {cached.key}"
            raise ConfigError([f"config_source: no config to start from: {reason}, and {why}{hint}", *refused])
        try:
            config = _parse(cached.text)
        except ConfigError as exc:
            raise ConfigError([(f"config_source.cache_file: {path}: revision {cached.revision} cannot be used "
                               f"here ({reason})"), *exc.problems]) from None
        self.revision, self._origin = cached.revision, "cache"
        self._problem = self._problem or f"started from the cache: {reason}"
        CONFIG_SOURCE_REVISION.set(cached.revision)
        log.warning("config from the cache", extra={"reason": reason, "cache_file": path, "revision": cached.revision,
                                                    "saved_at": cached.saved_at})
        return Initial(config, cached.text, cached.revision)

    # --- running --------------------------------------------------------------------------------

    async def run(self, offer: Offer) -> None:
        """Follows the key until cancelled: read, watch, and after a failure wait and start over."""
        while True:
            try:
                value, revision = await self._kv.get(self.key)
                self._set_up()
                await self._consider(value, offer)
                async for value in self._kv.watch(self.key, revision + 1):
                    await self._consider(value, offer)
            except EtcdUnavailable as exc:
                self._set_down(str(exc))
            except Exception:  # a bug must not end the watch for the life of the process
                log.exception("config source failed; starting over")
                self._set_down("internal error (see the log)")
            await asyncio.sleep(self._backoff * random.uniform(0.8, 1.2))
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    async def resync(self, offer: Offer) -> str:
        """SIGHUP: reads the key now and offers its value, also when it was refused before."""
        try:
            value, _ = await self._kv.get(self.key)
        except EtcdUnavailable as exc:
            log.warning("config resync failed: etcd unreachable", extra={"error": str(exc)})
            return "ignored"
        return await self._consider(value, offer, again=True)

    async def _consider(self, value: KeyValue | None, offer: Offer, again: bool = False) -> str:
        """A value of the key (None: it does not exist) -> offered to the sidecar if it is new."""
        async with self._turn:
            if value is None:
                if not self._missing:
                    log.warning("config source: etcd key missing; the running config stays",
                                extra={"key": self.key, "revision": self.revision})
                self._missing, self._problem = True, f"etcd key {self.key} does not exist"
                return "ignored"
            revision = value.mod_revision
            if revision == self.revision:
                self._went_live(revision)  # etcd holds what runs (e.g. what the cache had)
                return "unchanged"
            if self._refused and self._refused[0] == revision and not again:
                return "failure"  # refused, logged and counted already
            result, problems = await offer(value.value, f"etcd {self.key} revision {revision}")
            if result in ("success", "unchanged"):
                self._went_live(revision)
                await self._write_cache(revision, config_text(value.value, self.key))
            elif result == "failure":
                self._refuse(revision, problems)
            return result

    def _went_live(self, revision: int) -> None:
        self.revision, self._origin, self._problem, self._refused = revision, "etcd", None, None
        self._missing = False
        CONFIG_SOURCE_REVISION.set(revision)

    def _refuse(self, revision: int, problems: list[str]) -> None:
        self._refused = (revision, problems)
        first = problems[0] if problems else "refused"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        self._problem = f"revision {revision} refused: {first}{more}"

    async def _write_cache(self, revision: int, text: str) -> None:
        path = self.source.cache_file
        try:
            await asyncio.to_thread(write_cache, path, CachedConfig(self.key, revision, text))
        except OSError as exc:
            self._cache_error = f"{path}: {exc.strerror or exc}"
            log.error("config cache not written", extra={"cache_file": path, "error": self._cache_error})
        else:
            self._cache_error = None

    def _set_up(self) -> None:
        self._backoff = FIRST_BACKOFF
        if not self._up:
            if self._error is not None:
                log.info("config source: etcd reachable again", extra={"endpoint": self._kv.endpoint})
            self._up, self._error = True, None
            CONFIG_SOURCE_UP.set(1)

    def _set_down(self, error: str) -> None:
        if self._up or self._error is None:
            log.warning("config source: etcd unreachable; the running config stays",
                        extra={"error": error, "revision": self.revision})
        self._up, self._error = False, error
        CONFIG_SOURCE_UP.set(0)

    # --- state ----------------------------------------------------------------------------------

    def component(self) -> dict[str, Any]:
        """`components.config_source`: degraded while etcd cannot be read, the key is missing, its
        latest revision was refused, or the config came from the cache; never a reason to stop
        serving."""
        ok = self._up and self._problem is None
        body: dict[str, Any] = {
            "status": "ok" if ok else "degraded", "kind": "etcd", "key": self.key,
            "etcd": "up" if self._up else "down", "origin": self._origin, "revision": self.revision,
            "last_error": self._error if not self._up else self._problem,
        }
        if self._refused is not None:
            body["refused"] = {"revision": self._refused[0], "problems": self._refused[1][:10]}
        if self._cache_error is not None:
            body["cache_error"] = self._cache_error
        return body

    async def aclose(self) -> None:
        await self._kv.aclose()


def cached_config(source: ConfigSourceConfig) -> Config:
    """The config in `source`'s cache file (for tools that run beside a stopped sidecar)."""
    cached = read_cache(source.cache_file)
    if cached is None:
        raise ConfigError([(f"config_source.cache_file: no cache file {source.cache_file}: the sidecar has not "
                           "run here yet")])
    return _parse(cached.text)


def _parse(text: str) -> Config:
    """A value of the key as `sidecar run` takes it: valid, and usable on this machine."""
    config = parse_config(text, remote=True)
    problems = machine_problems(config)
    if problems:
        raise ConfigError(problems)
    return config
