"""Paired rounds: two sidecars of the work tree that differ in one config section, measured
against each other with nothing else alive on the CPUs (`usage_cost.py`, `trace_cost.py`).

Per round each sidecar gets `--requests` h2load calls (4 connections x 8 streams; the order
alternates) and its utime+stime per request is read from /proc, then `--calls` sequential calls
measure latency at concurrency 1. The result is the median of the per-round differences: a
slow round (another process, a busy disk) shifts both sidecars and cancels out.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from latency import Summary, Target, request_bytes, unary_batch
from load import h2load_path, run_h2load
from procs import Proc, loopback, start, stop, wait_serving
from procs import cpu_seconds as process_cpu_seconds
from run import MODEL, sidecar_config

Results = dict[str, dict[str, list[float]]]  # sidecar name -> metric -> one value per round


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="paired rounds (10)")
    parser.add_argument("--requests", type=int, default=12_000, help="h2load requests per sidecar per round (12000)")
    parser.add_argument("--calls", type=int, default=300, help="sequential latency calls per sidecar per round (300)")


async def measure_pair(args: argparse.Namespace, tmp: Path, procs: list[Proc], backend_address: str, body: Path,
                       sections: dict[str, dict[str, Any]],
                       before_stop: Callable[[str, str], Awaitable[None]] | None = None) -> Results:
    """Starts one sidecar per entry of `sections` (name -> top-level config sections added to
    `bench/run.py`'s config), measures them in alternating order, calls `before_stop(name, ops
    address)` for each, and stops them."""
    request = request_bytes(MODEL, 16)
    sidecars: dict[str, tuple[Proc, str, str]] = {}
    for name, extra in sections.items():
        listen, ops = loopback(), loopback()
        config = {**sidecar_config(listen, loopback(), ops, backend_address, "memory"), **extra}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = start(name, [sys.executable, "-m", "sidecar", "run", "--config", str(path)], tmp)
        procs.append(proc)
        await wait_serving(proc, listen)
        sidecars[name] = (proc, listen, ops)
    targets = {name: Target(name, listen) for name, (_, listen, _) in sidecars.items()}
    for target in targets.values():
        await target.wait_ok(request)
        await unary_batch(target, request, 200, 4)  # warm-up
    names = list(sidecars)
    results: Results = {n: {"cpu_us": [], "p50_us": [], "p99_us": []} for n in sidecars}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            proc, listen, _ = sidecars[name]
            before = process_cpu_seconds(proc.pid)
            load = await run_h2load(listen, body, args.requests, 4, 8, timeout=300)
            results[name]["cpu_us"].append((process_cpu_seconds(proc.pid) - before) / max(1, load.requests) * 1e6)
            latency = Summary.of(await unary_batch(targets[name], request, args.calls, 1))
            results[name]["p50_us"].append(latency.p50_us)
            results[name]["p99_us"].append(latency.p99_us)
    for target in targets.values():
        await target.close()
    await asyncio.sleep(1)
    for name, (proc, _, ops) in sidecars.items():
        if before_stop is not None:
            await before_stop(name, ops)
        stop(proc)
    return results


def metric_total(ops: str, name: str) -> float:
    """The sum of a metric's samples on a sidecar's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{ops}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def paired(variant: list[float], base: list[float]) -> tuple[float, float, float]:
    """The median of the per-round differences, and their interquartile range."""
    diffs = [v - b for v, b in zip(variant, base, strict=True)]
    if len(diffs) < 4:
        return statistics.median(diffs), min(diffs), max(diffs)
    q1, _, q3 = statistics.quantiles(diffs, n=4)
    return statistics.median(diffs), q1, q3


def report(pairs: dict[str, Results], base: str, rounds: int) -> None:
    """Per pair: each sidecar's medians, then variant - base as paired differences."""
    print(f"{'variant':15} {'CPU µs/req':>11} {'p50 µs c=1':>11} {'p99 µs c=1':>11}   CPU per round")
    for variant, results in pairs.items():
        for name, values in results.items():
            median = {k: statistics.median(v) for k, v in values.items()}
            print(f"{name:15} {median['cpu_us']:11.0f} {median['p50_us']:11.0f} {median['p99_us']:11.0f}   "
                  f"{[round(v) for v in values['cpu_us']]}")
        cpu = paired(results[variant]["cpu_us"], results[base]["cpu_us"])
        p50 = paired(results[variant]["p50_us"], results[base]["p50_us"])
        p99 = paired(results[variant]["p99_us"], results[base]["p99_us"])
        print(f"{variant} - {base}: {cpu[0]:+.0f} µs CPU/request (middle half of rounds {cpu[1]:+.0f} .. "
              f"{cpu[2]:+.0f}), {p50[0]:+.0f} µs p50, {p99[0]:+.0f} µs p99 (median of {rounds} paired rounds)\n")


def run_main(script: str, args: argparse.Namespace,
             measure: Callable[[argparse.Namespace, Path, list[Proc]], Awaitable[dict[str, Results]]],
             base: str) -> int:
    """A paired bench's `main`: needs h2load; a temporary directory and every process started
    are cleaned up however the run ends; the report compares each variant with `base`."""
    if h2load_path() is None:
        print(f"{script} needs h2load (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix=f"sidecar-{Path(script).stem}-"))
    procs: list[Proc] = []
    try:
        pairs = asyncio.run(measure(args, tmp, procs))
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    report(pairs, base, args.rounds)
    return 0
