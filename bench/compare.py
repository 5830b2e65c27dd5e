"""Before/after: the sidecar's CPU per request at two git revisions, measured interleaved.

    .venv/bin/python bench/compare.py --base HEAD~1                 # a revision vs the work tree
    .venv/bin/python bench/compare.py --base HEAD~3 --rounds 7 --limits memory

The base revision is checked out into a temporary git worktree and run with the same virtualenv
(its package dir first on PYTHONPATH). Both sidecars get the same config (`bench/run.py`'s:
one model, one demo backend, an API key, optionally limits) and the same backend; h2load sends
`--requests` calls to each in turn, `--rounds` times, and the sidecar's utime+stime per request
is read from /proc around each run. Interleaving cancels most of the machine's drift; the
median of the rounds is the number to quote. Needs h2load (`apt-get install nghttp2-client`).
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
from latency import request_bytes
from load import grpc_frame, h2load_path, run_h2load
from procs import Proc, cpu_seconds, loopback, start, stop, wait_serving
from run import MODEL, sidecar_config

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare the work tree with")
    p.add_argument("--rounds", type=int, default=5, help="interleaved h2load runs per sidecar (5)")
    p.add_argument("--requests", type=int, default=20_000, help="requests per run (20000)")
    p.add_argument("--limits", choices=("none", "memory"), default="none",
                   help="the sidecars' limits, as in bench/run.py (none)")
    return p.parse_args()


async def compare(args: argparse.Namespace, tmp: Path, base_tree: Path, procs: list[Proc]) -> dict[str, list[float]]:
    backend_address = loopback()
    backend = start("backend", [sys.executable, "-m", "sidecar", "demo-backend", "--listen", backend_address],
                    tmp)
    procs.append(backend)
    await wait_serving(backend, backend_address)
    sidecars: dict[str, tuple[Proc, str]] = {}
    for name, tree in (("base", base_tree), ("work", ROOT)):
        listen = loopback()
        config = tmp / f"{name}.yaml"
        config.write_text(yaml.safe_dump(sidecar_config(listen, loopback(), loopback(), backend_address,
                                                        args.limits)))
        proc = start(name, ["env", f"PYTHONPATH={tree}", sys.executable, "-m", "sidecar", "run", "--config",
                            str(config)], tmp)
        procs.append(proc)
        await wait_serving(proc, listen)
        sidecars[name] = (proc, listen)
    body = tmp / "request.grpc"
    body.write_bytes(grpc_frame(request_bytes(MODEL, 16)))
    cpu: dict[str, list[float]] = {name: [] for name in sidecars}
    for _ in range(args.rounds):
        for name, (proc, listen) in sidecars.items():
            before = cpu_seconds(proc.pid)
            result = await run_h2load(listen, body, args.requests, 4, 8, timeout=300)
            cpu[name].append((cpu_seconds(proc.pid) - before) / max(1, result.requests) * 1e6)
    return cpu


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
        cpu = asyncio.run(compare(args, tmp, base_tree, procs))
    finally:
        for proc in reversed(procs):
            stop(proc)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    for name, values in cpu.items():
        print(f"{name:5} CPU µs/request per round: {[round(v) for v in values]}  median {statistics.median(values):.0f}")
    delta = statistics.median(cpu["work"]) - statistics.median(cpu["base"])
    print(f"work tree - {args.base}: {delta:+.0f} µs of sidecar CPU per request (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
