"""Prefix-aware routing: time to first chunk with `affinity: prefix` against `weighted_random`.

    .venv/bin/python bench/prefix_affinity.py                  # ~40 s on 2 cores
    .venv/bin/python bench/prefix_affinity.py --rounds 8 --calls 400 --cache-entries 1024

Two stacks, each one sidecar of the work tree in front of its own three demo backends with the
simulated prefix cache (`demo-backend --prefix-cache-ms --prefix-bytes --prefix-cache-entries`:
a call whose first `--prefix-bytes` bytes the backend does not hold waits `--prefill-ms` before
its first chunk). The stacks differ in one key of model `bench`:

- `prefix`: `affinity: prefix` with `prefix_bytes` = `--prefix-bytes`;
- `weighted_random`: no affinity (the default balancer, equal weights).

The workload: `--prefixes` shared system prompts (each longer than `--prefix-bytes`), each call
one of them at random followed by a random question, as `InferStream` calls from one grpc.aio
client with `--concurrency` calls in flight, in `--rounds` rounds that alternate the stacks.
Each stack has its own backends, so neither warms the other's caches. Measured per call: the
time to its first chunk (TTFT); from the backends' call logs, how many calls found their prefix
cached and how the calls spread over the backends. Prints a table; writes JSON to
bench/results/prefix_affinity-<time>.json (`--output` to choose).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from latency import Summary, percentile
from procs import Proc, loopback, start, stop, wait_serving

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))
from sidecar_client.inference.v1.inference_pb2 import InferRequest

MODEL = "bench"
INFER_STREAM = "/inference.v1.Inference/InferStream"
VARIANTS = {"prefix": ["affinity: prefix", "prefix_bytes: {prefix_bytes}"], "weighted_random": []}  # model keys
SIDECAR = [sys.executable, "-m", "sidecar"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefixes", type=int, default=8, help="shared system prompts in the workload")
    p.add_argument("--prefix-bytes", type=int, default=256, help="the prefix hashed and cached")
    p.add_argument("--prefill-ms", type=float, default=20.0, help="a backend's wait for a prefix it lacks")
    p.add_argument("--cache-entries", type=int, default=4,
                   help="prefixes each backend holds (least recently used dropped first)")
    p.add_argument("--rounds", type=int, default=6, help="rounds; each calls both stacks")
    p.add_argument("--calls", type=int, default=300, help="calls per stack per round")
    p.add_argument("--concurrency", type=int, default=6, help="calls in flight")
    p.add_argument("--tokens", type=int, default=8, help="chunks per answer")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", type=Path, default=None, help="JSON results (default bench/results/...)")
    return p.parse_args(argv)


def prompts(count: int, length: int) -> list[str]:
    """`count` system prompts that differ from their first bytes on, each `length` + 32 bytes long."""
    base = "You are a careful assistant for team {i}. Answer briefly, cite sources, never guess. "
    return [(base.format(i=i) * (length // len(base) + 2))[:length + 32] for i in range(count)]


def sidecar_config(listen: str, backends: list[str], variant: str, prefix_bytes: int) -> str:
    keys = "".join(f"\n    {key.format(prefix_bytes=prefix_bytes)}" for key in VARIANTS[variant])
    lines = "".join(f'\n      - {{name: b{i}, address: "{a}"}}' for i, a in enumerate(backends))
    return f"""listen: {listen}
admin_listen: {loopback()}
ops_listen: {loopback()}
telemetry: {{access_log: false}}
models:
  {MODEL}:{keys}
    backends:{lines}
"""


class Stack:
    """Three demo backends and a sidecar in front of them."""

    def __init__(self, variant: str, backends: list[Proc], sidecar: Proc, listen: str) -> None:
        self.variant, self.backends, self.sidecar, self.listen = variant, backends, sidecar, listen
        self.ttft_ns: list[int] = []

    def backend_calls(self) -> list[dict[str, Any]]:
        """The `call` lines of the backends' logs, each with the backend's name."""
        calls = []
        for proc in self.backends:
            for line in proc.log.read_text().splitlines():
                if line.startswith("{") and '"event": "call"' in line:
                    calls.append({**json.loads(line), "backend": proc.name.rsplit("-", 1)[1]})
        return calls


async def start_stack(args: argparse.Namespace, variant: str, tmp: Path, procs: list[Proc]) -> Stack:
    addresses = [loopback() for _ in range(3)]
    backends = []
    for i, address in enumerate(addresses):
        proc = start(f"{variant}-b{i}", [*SIDECAR, "demo-backend", "--listen", address, "--log-calls",
                                         "--tokens", str(args.tokens), "--prefix-cache-ms", str(args.prefill_ms),
                                         "--prefix-bytes", str(args.prefix_bytes),
                                         "--prefix-cache-entries", str(args.cache_entries)], tmp)
        procs.append(proc)
        backends.append(proc)
    for proc, address in zip(backends, addresses, strict=True):
        await wait_serving(proc, address)
    listen = loopback()
    path = tmp / f"{variant}.yaml"
    path.write_text(sidecar_config(listen, addresses, variant, args.prefix_bytes))
    sidecar = start(f"{variant}-sidecar", [*SIDECAR, "run", "--config", str(path)], tmp)
    procs.append(sidecar)
    await wait_serving(sidecar, listen)
    return Stack(variant, backends, sidecar, listen)


async def one_round(stack: Stack, channel: grpc.aio.Channel, bodies: list[bytes], concurrency: int) -> None:
    call = channel.unary_stream(INFER_STREAM)
    queue = iter(bodies)

    async def worker() -> None:
        for body in queue:
            started = time.perf_counter_ns()
            first = True
            async for _chunk in call(body, timeout=30):
                if first:
                    stack.ttft_ns.append(time.perf_counter_ns() - started)
                    first = False

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def workload(args: argparse.Namespace, rng: random.Random, systems: list[str]) -> list[bytes]:
    """One round's requests: a system prompt at random, then a question of random words."""
    words = ["why", "how", "what", "is", "the", "sky", "blue", "tax", "rate", "code", "bug", "plan"]
    return [InferRequest(model=MODEL, input=rng.choice(systems) + " ".join(rng.choices(words, k=12)) + "?")
            .SerializeToString() for _ in range(args.calls)]


def summarize(stack: Stack) -> dict[str, Any]:
    calls = [c for c in stack.backend_calls() if c.get("prefix_cache")]
    hits = sum(c["prefix_cache"] == "hit" for c in calls)
    ttft = Summary.of(stack.ttft_ns)
    return {"calls": ttft.calls, "ttft_p50_ms": ttft.p50_us / 1000,
            "ttft_p90_ms": percentile(stack.ttft_ns, 90) / 1000, "ttft_p99_ms": ttft.p99_us / 1000,
            "ttft_mean_ms": ttft.mean_us / 1000, "cache_hit_share": hits / len(calls) if calls else 0.0,
            "calls_per_backend": dict(sorted(Counter(c["backend"] for c in calls).items()))}


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> dict[str, Any]:
    stacks = [await start_stack(args, variant, tmp, procs) for variant in VARIANTS]
    systems = prompts(args.prefixes, args.prefix_bytes)
    rng = random.Random(args.seed)
    channels = {s.variant: grpc.aio.insecure_channel(s.listen) for s in stacks}
    try:
        for round_ in range(args.rounds):
            bodies = workload(args, rng, systems)  # the same calls for both stacks, in turn first
            for stack in stacks[round_ % 2:] + stacks[:round_ % 2]:
                await one_round(stack, channels[stack.variant], bodies, args.concurrency)
    finally:
        for channel in channels.values():
            await channel.close()
    await asyncio.sleep(0.3)  # the backends' last log lines
    return {stack.variant: summarize(stack) for stack in stacks}


def render(results: dict[str, Any]) -> str:
    lines = ["| routing | calls | TTFT p50 | TTFT p90 | TTFT p99 | TTFT mean | prefix cache hits | calls per backend |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, r in results.items():
        spread = " / ".join(str(n) for n in r["calls_per_backend"].values())
        lines.append(f"| {variant} | {r['calls']} | {r['ttft_p50_ms']:.1f} ms | {r['ttft_p90_ms']:.1f} ms | "
                     f"{r['ttft_p99_ms']:.1f} ms | "
                     f"{r['ttft_mean_ms']:.1f} ms | {r['cache_hit_share']:.1%} | {spread} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs: list[Proc] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prefix-affinity-") as tmp:
        try:
            results = asyncio.run(measure(args, Path(tmp), procs))
        finally:
            for proc in procs:
                stop(proc)
    report = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results,
              "seconds": round(time.monotonic() - began, 1)}
    output = args.output or BENCH_DIR / "results" / f"prefix_affinity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"{args.prefixes} prompts x random questions, prefill {args.prefill_ms:g} ms, "
          f"{args.cache_entries} prefixes cached per backend, {args.concurrency} calls in flight, "
          f"{args.rounds} x {args.calls} InferStream calls per routing:")
    print(render(results))
    print(f"({report['seconds']:.0f} s; {output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
