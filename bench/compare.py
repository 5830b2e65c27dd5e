"""Before/after: the sidecar's CPU per request at two git revisions, measured interleaved.

    .venv/bin/python bench/compare.py --base HEAD~1                 # a revision vs the work tree
    .venv/bin/python bench/compare.py --base HEAD~3 --rounds 7 --limits memory
    .venv/bin/python bench/compare.py --base HEAD~1 --features full  # bench/run.py's feature sets

The base revision is checked out into a temporary git worktree and run with the same virtualenv
(its package dir first on PYTHONPATH). Both sidecars get the same config (`bench/run.py`'s:
one model, one demo backend, an API key, optionally limits) and the same backend; h2load sends
`--requests` calls to each in turn, `--rounds` times, and the sidecar's utime+stime per request
is read from /proc around each run, then `--calls` sequential calls measure the latency at
concurrency 1. The order alternates every round, and, as in bench/run.py, h2load (and the OTLP
receiver of `--features full`) run on one CPU, the sidecars and the backend on the other.
Interleaving cancels most of the machine's drift; the median of the per-round differences
(work - base) is the number to quote. Needs h2load (`apt-get install nghttp2-client`).
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from latency import Summary, Target, request_bytes, unary_batch
from load import grpc_frame, h2load_path, run_h2load
from pairs import paired
from procs import Proc, cpu_seconds, loopback, start, stop, wait_serving
from run import FEATURES, MODEL, Peers, pick_cpus, sidecar_config

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare the work tree with")
    p.add_argument("--rounds", type=int, default=5, help="interleaved h2load runs per sidecar (5)")
    p.add_argument("--requests", type=int, default=20_000, help="requests per run (20000)")
    p.add_argument("--calls", type=int, default=300, help="sequential latency calls per sidecar per round (300)")
    p.add_argument("--limits", choices=("none", "memory"), default="none",
                   help="the sidecars' limits, as in bench/run.py (none)")
    p.add_argument("--features", choices=FEATURES, default="limits",
                   help="what the sidecars do per call, as bench/run.py's --features (limits: an API key and "
                        "--limits)")
    args = p.parse_args()
    args.cpus = pick_cpus(None)
    return args


async def compare(args: argparse.Namespace, tmp: Path, base_tree: Path,
                  procs: list[Proc]) -> dict[str, dict[str, list[float]]]:
    load_cpu, server_cpu = args.cpus if args.cpus else (None, None)
    backend_address = loopback()
    backend = start("backend", [sys.executable, "-m", "sidecar", "demo-backend", "--listen", backend_address],
                    tmp, server_cpu)
    procs.append(backend)
    await wait_serving(backend, backend_address)
    otlp = None
    if args.features in ("full", "full-kafka"):
        if args.features == "full-kafka":
            raise SystemExit("compare.py: --features full-kafka is not supported here; use full")
        otlp = loopback()
        procs.append(start("otlp-sink", [sys.executable, str(Path(__file__).with_name("otlp_sink.py")),
                                         "--listen", otlp], tmp, load_cpu))
    request = request_bytes(MODEL, 16)
    sidecars: dict[str, tuple[Proc, str, Target]] = {}
    for name, tree in (("base", base_tree), ("work", ROOT)):
        listen = loopback()
        config = tmp / f"{name}.yaml"
        (tmp / f"{name}-files").mkdir()
        config.write_text(yaml.safe_dump(sidecar_config(listen, loopback(), loopback(), backend_address,
                                                        args.limits, features=args.features,
                                                        peers=Peers(tmp=tmp / f"{name}-files", otlp=otlp))))
        proc = start(name, ["env", f"PYTHONPATH={tree}", sys.executable, "-m", "sidecar", "run", "--config",
                            str(config)], tmp, server_cpu)
        procs.append(proc)
        await wait_serving(proc, listen)
        target = Target(name, listen)
        await target.wait_ok(request)
        await unary_batch(target, request, 300, 8)  # warm-up
        sidecars[name] = (proc, listen, target)
    body = tmp / "request.grpc"
    body.write_bytes(grpc_frame(request))
    results: dict[str, dict[str, list[float]]] = {n: {"cpu_us": [], "p50_us": [], "p99_us": []} for n in sidecars}
    names = list(sidecars)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            proc, listen, target = sidecars[name]
            before = cpu_seconds(proc.pid)
            result = await run_h2load(listen, body, args.requests, 4, 8, timeout=300,
                                      prefix=["taskset", "-c", load_cpu] if load_cpu else [])
            results[name]["cpu_us"].append((cpu_seconds(proc.pid) - before) / max(1, result.requests) * 1e6)
            latency = Summary.of(await unary_batch(target, request, args.calls, 1))
            results[name]["p50_us"].append(latency.p50_us)
            results[name]["p99_us"].append(latency.p99_us)
    for _, _, target in sidecars.values():
        await target.close()
    return results


def main() -> int:
    args = parse_args()
    if h2load_path() is None:
        print("compare.py needs h2load (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-compare-"))
    base_tree = tmp / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                   check=True)
    procs: list[Proc] = []
    try:
        results = asyncio.run(compare(args, tmp, base_tree, procs))
    finally:
        for proc in reversed(procs):
            stop(proc)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    for name, values in results.items():
        print(f"{name:5} CPU µs/request per round: {[round(v) for v in values['cpu_us']]}  median "
              f"{statistics.median(values['cpu_us']):.0f}; c=1 p50 {statistics.median(values['p50_us']):.0f} µs, "
              f"p99 {statistics.median(values['p99_us']):.0f} µs")
    deltas = {m: paired(results["work"][m], results["base"][m]) for m in ("cpu_us", "p50_us", "p99_us")}
    cpu, p50, p99 = deltas["cpu_us"], deltas["p50_us"], deltas["p99_us"]
    print(f"work tree - {args.base} (--features {args.features}): {cpu[0]:+.0f} µs of sidecar CPU per request "
          f"(middle half of rounds {cpu[1]:+.0f} .. {cpu[2]:+.0f}), c=1 latency {p50[0]:+.0f} µs p50, "
          f"{p99[0]:+.0f} µs p99 (medians of {args.rounds} paired rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
