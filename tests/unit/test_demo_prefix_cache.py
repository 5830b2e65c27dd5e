"""The demo backend's simulated prefix cache (`--prefix-cache-ms`): a prefix it has not seen pays
the prefill wait before the first chunk, a repeated one does not; least recently used forgotten."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest, InferResponse

from sidecar.demo.backend import DemoOptions, PrefixCache, serve_backend
from tests.harness.procs import free_port

PREFILL_MS = 200.0
HIT_MS = 120.0  # a cached prefix answers well within this on a busy 2-core machine


def test_the_cache_forgets_the_least_recently_used_prefix() -> None:
    cache = PrefixCache(size=2)
    assert not cache.hit(b"a")
    cache.add(b"a")
    cache.add(b"b")
    assert cache.hit(b"a")           # now a is the most recently used
    cache.add(b"c")                  # so b goes
    assert cache.hit(b"a") and cache.hit(b"c") and not cache.hit(b"b")
    cache.add(b"c")                  # adding again changes nothing but its recency
    assert len(cache) == 2


@asynccontextmanager
async def started(options: DemoOptions) -> AsyncIterator[grpc.aio.Channel]:
    """A demo backend with `options` served in this event loop, and a channel to it."""
    address = f"127.0.0.1:{free_port()}"
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_backend(address, options, ready, stop))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield channel
    finally:
        stop.set()
        await server


async def first_chunk_ms(channel: grpc.aio.Channel, text: str) -> float:
    """Time to the first chunk of an InferStream with input `text`; the stream is read to its end."""
    started_at = time.perf_counter()
    first = None
    stream = channel.unary_stream("/inference.v1.Inference/InferStream")(
        InferRequest(model="m", input=text).SerializeToString(), timeout=10)
    async for raw in stream:
        if first is None:
            first = (time.perf_counter() - started_at) * 1000
            assert InferChunk.FromString(raw).delta
    assert first is not None
    return first


async def infer_ms(channel: grpc.aio.Channel, request: InferRequest) -> float:
    started_at = time.perf_counter()
    raw = await channel.unary_unary("/inference.v1.Inference/Infer")(request.SerializeToString(), timeout=10)
    assert InferResponse.FromString(raw).finish_reason == "stop"
    return (time.perf_counter() - started_at) * 1000


async def test_a_new_prefix_pays_the_prefill_and_a_repeated_one_does_not(capsys: pytest.CaptureFixture[str]) -> None:
    options = DemoOptions(prefix_cache_ms=PREFILL_MS, prefix_bytes=16, log_calls=True)
    async with started(options) as channel:
        assert await first_chunk_ms(channel, "You are a pirate. Hello") >= PREFILL_MS
        # the same first 16 bytes, another question: cached
        assert await first_chunk_ms(channel, "You are a pirate. Where is the gold?") < HIT_MS
        # another prefix: a miss; then unary calls share the same cache
        assert await infer_ms(channel, InferRequest(model="m", input="You are a parrot. Hi")) >= PREFILL_MS
        assert await infer_ms(channel, InferRequest(model="m", input="You are a parrot. Bye")) < HIT_MS
        # a binary input is keyed by its first bytes; no input at all has nothing to prefill
        assert await infer_ms(channel, InferRequest(model="m", input_bytes=b"\x00" * 20)) >= PREFILL_MS
        assert await infer_ms(channel, InferRequest(model="m", input_bytes=b"\x00" * 16 + b"\x01")) < HIT_MS
        assert await infer_ms(channel, InferRequest(model="m")) < HIT_MS
    calls = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event": "call"' in line]
    assert [c.get("prefix_cache") for c in calls] == ["miss", "hit", "miss", "hit", "miss", "hit", None]


async def test_calls_arriving_together_with_a_new_prefix_each_pay_it() -> None:
    async with started(DemoOptions(prefix_cache_ms=PREFILL_MS, prefix_bytes=8)) as channel:
        together = await asyncio.gather(*(first_chunk_ms(channel, f"shared! {i}") for i in range(3)))
        assert min(together) >= PREFILL_MS                    # cached once the prefill is over
        assert await first_chunk_ms(channel, "shared! again") < HIT_MS


async def test_the_cache_is_off_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    async with started(DemoOptions(log_calls=True)) as channel:
        assert await first_chunk_ms(channel, "You are a pirate. Hello") < HIT_MS
    calls = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event": "call"' in line]
    assert len(calls) == 1 and "prefix_cache" not in calls[0]


async def test_a_cache_of_one_entry_misses_every_other_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    options = DemoOptions(prefix_cache_ms=20, prefix_bytes=8, prefix_cache_entries=1, log_calls=True)
    async with started(options) as channel:
        for text in ("prefix-a 1", "prefix-a 2", "prefix-b 1", "prefix-a 3"):
            await infer_ms(channel, InferRequest(model="m", input=text))
    calls = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event": "call"' in line]
    assert [c["prefix_cache"] for c in calls] == ["miss", "hit", "miss", "miss"]
