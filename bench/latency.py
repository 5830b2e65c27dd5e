"""Per-call latency from a grpc.aio client: unary Infer and InferStream time-to-last-chunk."""
from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import grpc
from sidecar_client.inference.v1 import inference_pb2

INFER = "/inference.v1.Inference/Infer"
# Every target gets the same request, credentials included: the sidecar authenticates it, the
# backend and the reference proxy ignore it.
API_KEY = "bench-key-0123456789"
METADATA = (("authorization", f"Bearer {API_KEY}"),)
INFER_STREAM = "/inference.v1.Inference/InferStream"


def request_bytes(model: str, max_output_tokens: int) -> bytes:
    request = inference_pb2.InferRequest(model=model, input="hello from the benchmark",
                                         max_output_tokens=max_output_tokens)
    return request.SerializeToString()


class Target:
    """One address to call, with a channel and raw-bytes multicallables created once."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(INFER)
        self.infer_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(
            INFER_STREAM)

    async def close(self) -> None:
        await self.channel.close()

    async def check(self, request: bytes, calls: int = 5) -> inference_pb2.InferResponse:
        """A few calls that must all succeed; returns the last decoded response."""
        response = b""
        for _ in range(calls):
            response = await self.infer(request, timeout=10.0, metadata=METADATA)
        return inference_pb2.InferResponse.FromString(response)

    async def wait_ok(self, request: bytes, timeout: float = 30.0) -> None:
        """Retries Infer until it answers OK (e.g. while the sidecar still probes its backends)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.infer(request, timeout=2.0, metadata=METADATA)
                return
            except grpc.aio.AioRpcError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} at {self.address}: Infer never OK: {e.code()} "
                                       f"{e.details()}") from e
                await asyncio.sleep(0.2)


async def unary_batch(target: Target, request: bytes, calls: int, concurrency: int) -> list[int]:
    """`calls` unary Infer calls spread over `concurrency` workers; latencies in ns."""
    latencies: list[int] = []
    per_worker = [calls // concurrency + (1 if i < calls % concurrency else 0) for i in range(concurrency)]

    async def worker(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await target.infer(request, timeout=30.0, metadata=METADATA)
            latencies.append(time.perf_counter_ns() - t0)

    await _without_gc(asyncio.gather(*(worker(n) for n in per_worker)))
    return latencies


async def stream_batch(target: Target, request: bytes, calls: int) -> list[int]:
    """Sequential InferStream calls; time from the call to its last chunk, in ns."""
    latencies: list[int] = []

    async def run() -> None:
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            async for _chunk in target.infer_stream(request, timeout=30.0, metadata=METADATA):
                pass
            latencies.append(time.perf_counter_ns() - t0)

    await _without_gc(run())
    return latencies


async def _without_gc(awaitable: Awaitable[object]) -> None:
    """Runs with the collector paused so client-side GC pauses don't land in one target's tail."""
    gc.collect()
    gc.disable()
    try:
        await awaitable
    finally:
        gc.enable()


def rotated(items: Sequence[Target], by: int) -> list[Target]:
    by %= len(items)
    return [*items[by:], *items[:by]]


def percentile(samples_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile, in µs."""
    ordered = sorted(samples_ns)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank] / 1000


@dataclass
class Summary:
    calls: int
    p50_us: float
    p99_us: float
    mean_us: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Summary:
        return cls(calls=len(samples_ns), p50_us=percentile(samples_ns, 50),
                   p99_us=percentile(samples_ns, 99), mean_us=sum(samples_ns) / len(samples_ns) / 1000)
