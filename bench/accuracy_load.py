"""Caller processes of the accuracy harness: grpc.aio clients hammering Infer, reporting aggregates.

Started by `bench/accuracy.py`, one process per worker, never by hand:

    python bench/accuracy_load.py SPEC_JSON

They run apart from the sidecars so that the callers' CPU is scheduled like any other process's
instead of starving one sidecar's event loop. Protocol: the worker opens one channel per sidecar
it calls, warms each up, prints `READY`, then reads one JSON line on stdin with the phase's times
as `time.monotonic()` values (CLOCK_MONOTONIC is system-wide on Linux, so the parent's clock is
the workers' clock), hammers, and prints one JSON line with its aggregates.
"""
from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferResponse

INFER = "/inference.v1.Inference/Infer"
Infer = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]  # raw bytes in and out: no (de)serializer cost
CALL_TIMEOUT = 10.0
ERROR_PAUSE = 0.01  # after an unexpected error, so a broken setup cannot spin a core


@dataclass
class RateStats:
    """One worker's rate phase. Times are time.monotonic(); `sent` is taken just before the call
    starts and `recv` just after it ends, so the real decision time lies inside [sent, recv]."""

    ok: int = 0
    denied: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_sent: float = math.inf
    first_recv: float = math.inf       # first response of any kind: the first decision was before it
    last_ok_sent: float = -math.inf    # sent time of the admitted call that was answered last
    last_ok_recv: float = -math.inf
    ok_latency: list[float] = field(default_factory=list)
    denied_latency: list[float] = field(default_factory=list)


@dataclass
class BudgetStats:
    ok: int = 0
    denied: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0              # actual usage the backend reported, summed over admitted calls
    output_tokens: int = 0
    max_call_tokens: int = 0
    gave_up: int = 0                   # callers that hit the time limit before the budget ran out
    first_sent: float = math.inf
    last_recv: float = -math.inf


def _failure(exc: grpc.aio.AioRpcError) -> tuple[str, str]:
    detail = error_detail(exc)
    return detail.code.name, detail.reason


async def rate_caller(infer: Infer, request: bytes,
                      metadata: tuple[tuple[str, str], ...], stop_at: float, stats: RateStats) -> None:
    """Calls back to back until stop_at; an admitted call is OK, a denied one RATE_LIMIT_EXCEEDED."""
    while (sent := time.monotonic()) < stop_at:
        stats.first_sent = min(stats.first_sent, sent)
        try:
            await infer(request, metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            recv = time.monotonic()
            code, reason = _failure(exc)
            if code == "RESOURCE_EXHAUSTED" and reason == "RATE_LIMIT_EXCEEDED":
                stats.denied += 1
                stats.denied_latency.append(recv - sent)
            else:
                stats.errors[f"{code}/{reason}"] += 1
                await asyncio.sleep(ERROR_PAUSE)
        else:
            recv = time.monotonic()
            stats.ok += 1
            stats.ok_latency.append(recv - sent)
            if recv > stats.last_ok_recv:
                stats.last_ok_sent, stats.last_ok_recv = sent, recv
        stats.first_recv = min(stats.first_recv, recv)


async def budget_caller(infer: Infer, request: bytes,
                        metadata: tuple[tuple[str, str], ...], give_up_at: float, quiet: int, pause: float,
                        stats: BudgetStats) -> None:
    """Calls until `quiet` BUDGET_EXCEEDED answers in a row, `pause` apart.

    Why not stop at the first denial: while other calls are in flight, their reservations
    (estimates) hold room that their settlements give back moments later; the run is over only
    once the budget stays exhausted after that.
    """
    streak = 0
    while streak < quiet:
        sent = time.monotonic()
        if sent >= give_up_at:
            stats.gave_up += 1
            return
        stats.first_sent = min(stats.first_sent, sent)
        try:
            raw = await infer(request, metadata=metadata, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            code, reason = _failure(exc)
            if code == "RESOURCE_EXHAUSTED" and reason == "BUDGET_EXCEEDED":
                stats.denied += 1
                streak += 1
                await asyncio.sleep(pause)
            else:
                stats.errors[f"{code}/{reason}"] += 1
                await asyncio.sleep(ERROR_PAUSE)
        else:
            streak = 0
            usage = InferResponse.FromString(raw).usage
            stats.ok += 1
            stats.input_tokens += usage.input_tokens
            stats.output_tokens += usage.output_tokens
            stats.max_call_tokens = max(stats.max_call_tokens, usage.input_tokens + usage.output_tokens)
        stats.last_recv = max(stats.last_recv, time.monotonic())


async def warm_up(channels: dict[str, grpc.aio.Channel], spec: dict[str, Any]) -> None:
    """Connects every channel and makes a few calls with the warm-up key (an org of its own)."""
    request = bytes.fromhex(spec["warm_request"])
    metadata = (("authorization", f"Bearer {spec['warm_key']}"),)
    for channel in channels.values():
        await asyncio.wait_for(channel.channel_ready(), 20)
        infer: Infer = channel.unary_unary(INFER)
        await asyncio.gather(*(infer(request, metadata=metadata, timeout=CALL_TIMEOUT) for _ in range(8)))


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    channels = {address: grpc.aio.insecure_channel(address) for address in sorted(set(spec["targets"]))}
    try:
        await warm_up(channels, spec)
        print("READY", flush=True)
        times = json.loads(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
        await asyncio.sleep(max(0.0, times["start_at"] - time.monotonic()))
        request = bytes.fromhex(spec["request"])
        metadata = (("authorization", f"Bearer {spec['api_key']}"),)
        infers: list[Infer] = [channels[t].unary_unary(INFER) for t in spec["targets"]]
        if spec["phase"] == "rate":
            rate = RateStats()
            await asyncio.gather(*(
                rate_caller(infer, request, metadata, times["tail_until"] if tail else times["stop_at"], rate)
                for infer, tail in zip(infers, spec["tail"], strict=True)))
            return asdict(rate)
        budget = BudgetStats()
        await asyncio.gather(*(budget_caller(infer, request, metadata, times["give_up_at"], spec["quiet"],
                                             spec["pause"], budget) for infer in infers))
        return asdict(budget)
    finally:
        for channel in channels.values():
            await channel.close()


def main() -> None:
    import uvloop

    spec = json.loads(sys.argv[1])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
