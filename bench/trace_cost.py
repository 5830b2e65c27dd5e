"""What tracing costs, and that a dead collector costs calls nothing: the same sidecar with
tracing off, with every call sampled and exported to a live OTLP receiver, and with every call
sampled but the collector gone, measured as paired rounds (`pairs.py`).

    .venv/bin/python bench/trace_cost.py                 # ~5 min on 2 cores
    .venv/bin/python bench/trace_cost.py --rounds 16 --variants dead

Starts one demo backend and `bench/otlp_sink.py` (a receiver in its own process). Pairs:
`off` (no `telemetry.otlp_endpoint`) against `on` (`sample_ratio: 1.0`, the live receiver),
and `off` against `dead` (`sample_ratio: 1.0`, an endpoint where nothing listens: every export
fails and its spans are dropped). Printed per pair: the medians over rounds and the median of
the per-round differences (CPU per request, p50 and p99 latency at concurrency 1). `dead` -
`off` next to `on` - `off` answers "does a dead collector slow calls down". Needs h2load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from latency import request_bytes
from load import grpc_frame
from pairs import Results, add_arguments, measure_pair, metric_total, run_main
from procs import Proc, loopback, start, wait_serving
from run import MODEL

VARIANTS = ("on", "dead")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"which variants to run, comma-separated ({','.join(VARIANTS)}); off is always run")
    p.add_argument("--sample-ratio", type=float, default=1.0, help="telemetry.sample_ratio of on and dead (1.0)")
    return p.parse_args()


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> dict[str, Results]:
    backend_address = loopback()
    backend = start("backend", [sys.executable, "-m", "sidecar", "demo-backend", "--listen", backend_address], tmp)
    procs.append(backend)
    await wait_serving(backend, backend_address)
    receiver = loopback()
    procs.append(start("otlp-sink", [sys.executable, str(Path(__file__).parent / "otlp_sink.py"),
                                     "--listen", receiver], tmp))
    body = tmp / "request.grpc"
    body.write_bytes(grpc_frame(request_bytes(MODEL, 16)))
    endpoints = {"on": f"http://{receiver}", "dead": f"http://{loopback()}"}

    def telemetry(name: str) -> dict[str, Any]:
        if name == "off":
            return {}
        return {"telemetry": {"otlp_endpoint": endpoints[name], "sample_ratio": args.sample_ratio}}

    async def check_exported(name: str, ops: str) -> None:
        exported = metric_total(ops, "api_router_trace_spans_exported_total")
        dropped = metric_total(ops, "api_router_trace_spans_dropped_total")
        print(f"{name}: {exported:.0f} spans exported, {dropped:.0f} dropped")
        expected = args.rounds * args.requests * args.sample_ratio * 0.9
        if name == "on" and exported < expected:
            raise RuntimeError(f"on: only {exported:.0f} spans reached the receiver")
        if name == "dead" and dropped < expected:
            raise RuntimeError(f"dead: only {dropped:.0f} spans were dropped; was every call sampled?")

    pairs = {}
    for variant in (v for v in VARIANTS if v in args.variants.split(",")):
        pairs[variant] = await measure_pair(args, tmp, procs, backend_address, body,
                                            {"off": telemetry("off"), variant: telemetry(variant)}, check_exported)
    return pairs


def main() -> int:
    return run_main("trace_cost.py", parse_args(), measure, "off")


if __name__ == "__main__":
    sys.exit(main())
