"""Reading one HTTP/1.1 request head (request line and header fields) with explicit limits.

The ops listener binds 0.0.0.0 in Kubernetes, so anything that reaches the pod can talk to it:
every part of a request it keeps in memory is bounded here, and anything over a bound is
refused with its status (`Refused`) rather than read further. The caller bounds the time
(`REQUEST_TIMEOUT_SECONDS` for the whole head, not per line) and the number of connections.

Limits, and what exceeding them answers:
- the request line: `MAX_REQUEST_LINE_BYTES` (8 KiB) -> 414 URI Too Long;
- the header fields: `MAX_HEADERS` (100) lines and `MAX_HEADER_BYTES` (16 KiB) in all -> 431;
- anything that is not `METHOD SP target SP HTTP/1.x` followed by `name: value` lines
  (obsolete line folding included) -> 400.

A bare LF ends a line as well as CRLF (RFC 9112 §2.2 allows it). The body, if any, is not
read: the ops routes are all GET, and every answer closes the connection.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
REQUEST_TIMEOUT_SECONDS = 5.0
# the StreamReader's buffer limit: one line longer than any limit above is refused without
# ever being held whole (asyncio keeps at most about twice this per connection)
STREAM_LIMIT = MAX_HEADER_BYTES + 2

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Refused(Exception):
    """The request cannot be served as sent: `status` is the answer, `why` says what was wrong."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]   # names lower-cased; a repeated name keeps its last value

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The request head from `reader`, or None when the client closed before sending anything.

    Raises `Refused` for a head over a limit or malformed, and `ConnectionError` when the
    client closed halfway. The reader must have been made with `limit=STREAM_LIMIT`.
    """
    line = await _read_line(reader, MAX_REQUEST_LINE_BYTES, 414, "request line over "
                            f"{MAX_REQUEST_LINE_BYTES} bytes", allow_eof=True)
    if line is None:
        return None
    method, target = _request_line(line)
    headers: dict[str, str] = {}
    count = used = 0   # header lines, and their bytes (line ends not counted)
    while True:
        line = await _read_line(reader, MAX_HEADER_BYTES - used, 431, f"header fields over {MAX_HEADER_BYTES} bytes")
        if not line:
            return Request(method, target, headers)
        count += 1
        used += len(line)
        if count > MAX_HEADERS:
            raise Refused(431, f"more than {MAX_HEADERS} header fields")
        name, value = _header(line)
        headers[name] = value


async def _read_line(reader: asyncio.StreamReader, budget: int, status: int, why: str, *,
                     allow_eof: bool = False) -> bytes | None:
    """One line without its line end; `Refused(status, why)` when it is longer than `budget`."""
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as exc:
        raise Refused(status, why) from exc
    except asyncio.IncompleteReadError as exc:
        if allow_eof and not exc.partial:
            return None
        raise ConnectionError("the client closed in the middle of its request") from exc
    line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if len(line) > budget:
        raise Refused(status, why)
    return line


def _request_line(line: bytes) -> tuple[str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or not parts[2].startswith(b"HTTP/1."):
        raise Refused(400, "malformed request line")
    return parts[0].decode("ascii"), parts[1].decode("latin-1")


def _header(line: bytes) -> tuple[str, str]:
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):  # no colon, a space before it, or a folded line
        raise Refused(400, "malformed header field")
    return name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")
