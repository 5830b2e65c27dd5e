"""The ops listener's request-head reader: what it accepts and how each limit answers."""
from __future__ import annotations

import asyncio

import pytest

from sidecar.ops.http_request import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE_BYTES,
    STREAM_LIMIT,
    Refused,
    Request,
    read_request,
)


def read(data: bytes) -> Request | None:
    async def run() -> Request | None:
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        reader.feed_data(data)
        reader.feed_eof()
        return await read_request(reader)
    return asyncio.run(run())


def refused(data: bytes) -> int:
    with pytest.raises(Refused) as caught:
        read(data)
    return caught.value.status


def test_a_request_head_with_crlf_or_bare_lf() -> None:
    request = read(b"GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text \r\nHost: a\r\n\r\n")
    assert request == Request("GET", "/metrics?x=1", {"accept": "application/openmetrics-text", "host": "a"})
    assert request.path == "/metrics"
    assert read(b"GET /healthz HTTP/1.0\nHost: a\n\n") == Request("GET", "/healthz", {"host": "a"})


def test_nothing_sent_is_no_request_and_a_half_request_is_a_closed_connection() -> None:
    assert read(b"") is None
    with pytest.raises(ConnectionError):
        read(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")


def test_a_request_line_over_the_limit_is_414_however_long() -> None:
    assert read(b"GET /" + b"a" * (MAX_REQUEST_LINE_BYTES - 20) + b" HTTP/1.1\r\n\r\n") is not None
    assert refused(b"GET /" + b"a" * MAX_REQUEST_LINE_BYTES + b" HTTP/1.1\r\n\r\n") == 414
    assert refused(b"GET /" + b"a" * (3 * STREAM_LIMIT) + b" HTTP/1.1\r\n\r\n") == 414


def test_too_many_or_too_large_header_fields_are_431() -> None:
    head = b"GET / HTTP/1.1\r\n"
    assert read(head + b"X: 1\r\n" * MAX_HEADERS + b"\r\n") is not None
    assert refused(head + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n") == 431   # lines count, not names
    assert refused(head + b"X-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n") == 431
    assert refused(head + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n") == 431
    # each line small, together over the limit
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    assert refused(head + line * (MAX_HEADER_BYTES // 1000 + 1) + b"\r\n") == 431


@pytest.mark.parametrize("data", [
    b"HELLO\r\n\r\n", b"GET /healthz\r\n\r\n", b"GET /healthz HTTP/2.0\r\n\r\n", b"G(T / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"GET / HTTP/1.1\r\nX : 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n",
])
def test_a_malformed_head_is_400(data: bytes) -> None:
    assert refused(data) == 400
