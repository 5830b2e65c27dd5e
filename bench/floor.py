"""How far the sidecar is from the floor: CPU per call of the sidecar, of the floor (the least
work of the same features, inline: bench/floor_hop.py) and of the reference+rid hop, side by side.

    .venv/bin/python bench/floor.py                  # min and full, 8 rounds, ~6 minutes
    .venv/bin/python bench/floor.py --ablate         # + the full sidecar without one feature at a time
    .venv/bin/python bench/floor.py --rounds 3 --requests 2000   # a quick look

One demo backend, bench/reference_proxy.py --request-id, floor_hop.py --features min and full,
and the sidecar with bench/run.py's `--features min` and `full` config (the OTLP receiver of
`full` on the load generator's CPU), each its own process on the server CPU. Every round runs
h2load (`--requests`, 4 connections x 8 streams) against each target in turn, alternating the
order, and reads each process's utime+stime around it. Printed: each target's CPU per call and
its ratio to reference+rid, the median of the per-round ratios with the middle half of them.
`--ablate` adds four sidecars of the full config, each without one feature (usage records, the
access log, traces, limits), to price each feature in the running sidecar: what a feature costs
is `full` minus `full without it`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from floor_hop import FLUSH_SECONDS
from latency import Target, request_bytes
from load import grpc_frame, h2load_path, run_h2load
from procs import Proc, cpu_seconds, loopback, start, stop, wait_serving
from run import MODEL, Peers, pick_cpus, sidecar_argv, sidecar_config

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "floor.json"
BASE = "reference+rid"
# the full sidecar without one feature: the config change that takes it out
ABLATIONS: dict[str, Any] = {
    "full-no-usage": lambda c: c.pop("usage"),
    "full-no-access-log": lambda c: c["telemetry"].update(access_log=False),
    "full-no-traces": lambda c: c["telemetry"].pop("otlp_endpoint"),
    "full-no-limits": lambda c: (c.pop("limits"), c.pop("budgets")),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (8)")
    p.add_argument("--requests", type=int, default=8000, help="h2load requests per target per round (8000)")
    p.add_argument("--ablate", action="store_true", help="also the full sidecar without each feature")
    p.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    return p.parse_args(argv)


async def start_targets(args: argparse.Namespace, tmp: Path, procs: list[Proc],
                        cpus: tuple[str, str] | None) -> dict[str, tuple[str, Proc]]:
    load_cpu, server_cpu = cpus if cpus else (None, None)
    backend = loopback()
    procs.append(start("backend", sidecar_argv("demo-backend", "--listen", backend, "--tokens", "8"), tmp, server_cpu))
    peers = Peers(tmp=tmp, otlp=loopback())
    procs.append(start("otlp-sink", [sys.executable, str(BENCH_DIR / "otlp_sink.py"), "--listen", peers.otlp],
                       tmp, load_cpu))
    targets: dict[str, tuple[str, Proc]] = {}

    def add(name: str, argv: list[str]) -> str:
        address = loopback()
        argv = [arg.replace("{listen}", address) for arg in argv]
        proc = start(name, argv, tmp, server_cpu)
        procs.append(proc)
        targets[name] = (address, proc)
        return address

    add(BASE, [sys.executable, str(BENCH_DIR / "reference_proxy.py"), "--listen", "{listen}", "--backend", backend,
               "--uvloop", "--request-id"])
    for features in ("min", "full"):
        directory = tmp / f"floor-{features}"
        directory.mkdir()
        add(f"floor-{features}", [sys.executable, str(BENCH_DIR / "floor_hop.py"), "--listen", "{listen}",
                                  "--backend", backend, "--features", features, "--otlp", peers.otlp or "",
                                  "--dir", str(directory), "--uvloop"])
    sidecars = {"sidecar-min": ("min", None), "sidecar-full": ("full", None)}
    if args.ablate:
        sidecars.update({name: ("full", change) for name, change in ABLATIONS.items()})
    for name, (features, change) in sidecars.items():
        listen = loopback()
        config = sidecar_config(listen, loopback(), loopback(), backend, "memory", None, features, peers)
        if features == "full":  # each full sidecar writes its own usage file
            config["usage"]["file"]["path"] = str(tmp / f"{name}-usage.jsonl")
        if change is not None:
            change(config)
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = start(name, sidecar_argv("run", "--config", str(path)), tmp, server_cpu)
        procs.append(proc)
        targets[name] = (listen, proc)
        await wait_serving(proc, listen)
    request = request_bytes(MODEL, 8)
    for name, (address, _) in targets.items():
        target = Target(name, address)
        await target.wait_ok(request)
        await target.close()
    return targets


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> dict[str, list[float]]:
    cpus = pick_cpus(None)
    targets = await start_targets(args, tmp, procs, cpus)
    prefix = ["taskset", "-c", cpus[0]] if cpus else None
    body = tmp / "request.bin"
    body.write_bytes(grpc_frame(request_bytes(MODEL, 8)))
    for address, _ in targets.values():  # warm-up
        await run_h2load(address, body, min(2000, args.requests), 4, 8, timeout=120, prefix=prefix)
    cpu: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            address, proc = targets[name]
            before = cpu_seconds(proc.pid)
            load = await run_h2load(address, body, args.requests, 4, 8, timeout=300, prefix=prefix)
            cpu[name].append((cpu_seconds(proc.pid) - before) / max(1, load.requests) * 1e6)
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in cpu.items()),
              file=sys.stderr)
    await asyncio.sleep(10 * FLUSH_SECONDS)  # the last batches written
    measured = args.rounds * args.requests
    for name in ("floor-full", "sidecar-full"):  # the records were written, not skipped
        usage = tmp / ("floor-full/usage.jsonl" if name == "floor-full" else f"{name}-usage.jsonl")
        lines = len(usage.read_bytes().splitlines()) if usage.exists() else 0
        if lines < measured:
            raise RuntimeError(f"{name} wrote {lines} usage records for more than {measured} calls")
    access = len((tmp / "floor-full" / "access.log").read_bytes().splitlines())
    if access < measured:
        raise RuntimeError(f"floor-full wrote {access} access lines for more than {measured} calls")
    return cpu


def summarize(cpu: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name, values in cpu.items():
        ratios = [v / b for v, b in zip(values, cpu[BASE], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else (min(ratios), 0, max(ratios))
        summary[name] = {"cpu_us": statistics.median(values), "ratio": statistics.median(ratios),
                         "ratio_iqr": [q1, q3], "rounds_us": [round(v, 1) for v in values]}
    return summary


def render(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'target':22} {'CPU µs/call':>12} {'× ' + BASE:>18}   middle half of rounds",
             "-" * 78]
    for name, entry in summary.items():
        q1, q3 = entry["ratio_iqr"]
        lines.append(f"{name:22} {entry['cpu_us']:12.0f} {entry['ratio']:17.3f}×   {q1:.3f} .. {q3:.3f}")
    for features in ("min", "full"):
        sidecar, floor = summary.get(f"sidecar-{features}"), summary.get(f"floor-{features}")
        if sidecar and floor:
            lines.append(f"sidecar-{features} above floor-{features}: "
                         f"{(sidecar['ratio'] - floor['ratio']) * summary[BASE]['cpu_us']:+.0f} µs per call")
    full = summary.get("sidecar-full")
    for name in ABLATIONS:
        if full and name in summary:
            feature = name.removeprefix("full-no-")
            lines.append(f"{feature} costs the full sidecar "
                         f"{(full['ratio'] - summary[name]['ratio']) * summary[BASE]['cpu_us']:+.0f} µs per call")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if h2load_path() is None:
        print("bench/floor.py needs h2load (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-floor-") as tmp:
        try:
            cpu = asyncio.run(measure(args, Path(tmp), procs))
        finally:
            for proc in reversed(procs):
                stop(proc)
    summary = summarize(cpu)
    print(render(summary))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rounds": args.rounds, "requests": args.requests, "targets": summary},
                                      indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
