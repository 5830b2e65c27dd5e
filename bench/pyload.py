"""One load-generator worker for when h2load is missing: prints {"ok", "errors", "start", "end"} as JSON."""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

INFER = "/inference.v1.Inference/Infer"
API_KEY = "bench-key-0123456789"  # as bench/latency.py


async def load(target: str, body: bytes, requests: int, concurrency: int) -> dict[str, float]:
    counts = {"ok": 0, "errors": 0}
    remaining = requests
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INFER)

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                try:
                    await infer(body, timeout=30.0, metadata=(("authorization", f"Bearer {API_KEY}"),))
                    counts["ok"] += 1
                except grpc.aio.AioRpcError:
                    counts["errors"] += 1

        start = time.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        end = time.time()
    return {**counts, "start": start, "end": end}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--body-hex", required=True, help="serialized InferRequest, hex")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    report = asyncio.run(load(args.target, bytes.fromhex(args.body_hex), args.requests, args.concurrency))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
