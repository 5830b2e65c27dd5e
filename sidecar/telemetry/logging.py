"""Log lines: one object per line on stderr (JSON, or `key=value` text for a terminal), with
whatever `extra=` fields a caller adds, and the access log: one line per inference call.

Request ids, org and key ids come in as `extra`; secrets never do (nothing here reads metadata,
and the access line is built from the `Call`'s ids, never its credential).
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.call import Call
    from sidecar.config import Config

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
ACCESS_FLUSH_SECONDS = 0.05   # access lines are written in batches, at most this late
_ACCESS_KEYS = ("ts", "level", "logger", "msg", "request_id", "trace_id", "span_id", "method", "org", "api_key_id",
                "model", "backend", "attempts", "routing_decision", "status", "reason", "duration_ms", "overhead_ms",
                "sampled")


def timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds: 2026-11-25T08:21:19.123Z."""
    return f"{_second(int(seconds))}.{int(seconds * 1000) % 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def render_json(line: dict[str, Any]) -> str:
    return json.dumps(line, default=str)


def render_text(line: dict[str, Any]) -> str:
    """`ts level logger msg key=value ...`, values quoted when they hold spaces."""
    head = f"{line.pop('ts')} {line.pop('level').upper():7} {line.pop('logger')}: {line.pop('msg')}"
    exc = line.pop("exc", None)
    fields = " ".join(f"{k}={_text_value(v)}" for k, v in line.items())
    text = f"{head} {fields}" if fields else head
    return f"{text}\n{exc}" if exc else text


def _text_value(value: Any) -> str:
    """Quoted (JSON-escaped) when it holds a space, a quote or anything unprintable: a caller's
    string with a newline in it must not start a line of its own."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or " " in text or '"' in text or not text.isprintable()) else text


RENDER = {"json": render_json, "text": render_text}
_ACCESS_LOGGER = logging.getLogger("sidecar.access")


class LineFormatter(logging.Formatter):
    def __init__(self, render: Callable[[dict[str, Any]], str] = render_json) -> None:
        super().__init__()
        self._render = render

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return self._render(line)


class JsonFormatter(LineFormatter):
    def __init__(self) -> None:
        super().__init__(render_json)


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(RENDER[log_format]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


REPEAT_LOG_SECONDS = 60.0  # a repeated line of one kind: at most one summary per this many seconds


class LogThrottle:
    """Thins out a log line that repeats: the first occurrence of a kind logs in full; the
    repeats are counted and, at most once per `interval`, one line with that count (`repeats`:
    occurrences since the last line of that kind, this one included; `repeats_seconds`: over how
    long) goes out in their place.

    For faults that repeat every few milliseconds (a Kafka client that cannot authenticate
    retries every 50 ms, a scanner sending bad requests to the ops port): unthrottled, one fault
    fills the log and hides everything else. The summary comes with the next occurrence once the
    interval has passed; `settle()` (the fault is gone) hands back the repeats not yet reported
    and forgets every kind, so the same fault coming back logs in full again.

    Thread-safe: librdkafka's log callback may run on whichever thread serves the client's queue.
    At most `max_kinds` kinds are remembered (the oldest is forgotten first), so kinds built from
    outside input cannot grow it without bound.
    """

    def __init__(self, logger: logging.Logger, interval: float = REPEAT_LOG_SECONDS, *, max_kinds: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self._max_kinds = max_kinds
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[str, _Repeats] = {}

    def log(self, level: int, kind: str, msg: str, *args: object, extra: dict[str, Any] | None = None,
            exc_info: BaseException | None = None) -> bool:
        """Logs `msg % args` unless a line of this `kind` went out less than `interval` ago
        (then only counts it); True when a line was written."""
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                if len(self._kinds) >= self._max_kinds:
                    del self._kinds[next(iter(self._kinds))]
                self._kinds[kind] = _Repeats(now)
                fields = extra
            else:
                state.count += 1
                if now - state.logged_at < self.interval:
                    return False
                fields = {**(extra or {}), "repeats": state.count, "repeats_seconds": round(now - state.logged_at, 1)}
                state.logged_at, state.count = now, 0
        self.logger.log(level, msg, *args, extra=fields, exc_info=exc_info)
        return True

    def settle(self) -> int:
        """The fault is over: returns how many repeats were never reported and forgets every kind."""
        with self._lock:
            unreported = sum(state.count for state in self._kinds.values())
            self._kinds.clear()
        return unreported


class _Repeats:
    """One kind of a `LogThrottle`: when its last line went out, the repeats since."""

    __slots__ = ("count", "logged_at")

    def __init__(self, logged_at: float) -> None:
        self.logged_at = logged_at
        self.count = 0


class AccessLog:
    """Pipeline finisher: one `sidecar.access` line per inference call, however it ended.

    The call path only appends a tuple; the lines are rendered and written in one write per
    batch, at most `ACCESS_FLUSH_SECONDS` later (and at shutdown by `flush`).
    `telemetry.access_log: false` turns it off (read from the running config), and so does a log
    level above INFO for the `sidecar.access` logger (the demo logs warnings only).
    """

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._render = RENDER[config().telemetry.log_format]
        self._pending: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, call: Call) -> None:
        if not self._config().telemetry.access_log or not _ACCESS_LOGGER.isEnabledFor(logging.INFO):
            return
        duration = time.perf_counter() - call.started
        backend = sum(a.duration_ms for a in call.attempts)
        self._pending.append((
            time.time(), call.request_id, call.trace_id, call.span_id, call.method, call.org, call.api_key_id,
            call.request.model, call.attempts[-1].backend if call.attempts else "", len(call.attempts),
            call.routing_decision, call.status if call.status != "UNKNOWN" else "CANCELLED", call.reason,
            round(duration * 1000, 3), round(max(0.0, duration * 1000 - backend), 3), call.sampled))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ACCESS_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self._timer = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        render = self._render
        lines = [render(dict(zip(_ACCESS_KEYS, (timestamp(entry[0]), "info", "sidecar.access", "call", *entry[1:]),
                                 strict=True)))
                 for entry in pending]
        try:
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr closed (the process is going away): nothing to log to

    def __repr__(self) -> str:
        return f"<AccessLog pending={len(self._pending)}>"
