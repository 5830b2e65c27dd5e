"""Accuracy of shared rate limits and budgets: K sidecars, one Valkey, C callers hammering.

    .venv/bin/python bench/accuracy.py                                    # full size: 4 sidecars, 64 callers
    .venv/bin/python bench/accuracy.py --cluster                          # the same on a 3-master Redis Cluster
    .venv/bin/python bench/accuracy.py --sidecars 2 --callers 16 --seconds 3 --output out.json

Starts a Valkey (or uses $REDIS_URL), demo backends and K `sidecar run` processes that share it
(`limits.store: redis`), then two phases, each on an org of its own, with callers in separate
worker processes (bench/accuracy_load.py). With `--cluster` the store is a Redis Cluster of
three valkey-server masters instead (tests/harness/redis_cluster.py), or $REDIS_CLUSTER_URL, and
the sidecars get `limits.redis_url: redis+cluster://...`.

1. rate: an org with requests_per_minute R and burst B; how many calls were admitted compared
   with what GCRA allows in the measured window;
2. budget: an org with tokens_per_day T; callers run until the budget stays exhausted; the
   actual usage of the admitted calls compared with T and with one call's reservation.

Exit 0 when every target is met, 1 when one is missed (or a call failed unexpectedly), 2 when
the harness itself could not run. See bench/README.md, "Accuracy of limits and budgets".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from accuracy_report import Check, budget_summary, checks, rate_summary, render
from accuracy_stack import (
    MODEL,
    Caller,
    Stack,
    cluster_server,
    flush_db,
    read_int,
    redis_server,
    scrape_limit_metrics,
    sidecar_config,
    slot_owners,
    start_backends,
    start_sidecars,
)
from procs import cancel_on_sigterm
from sidecar_client.inference.v1.inference_pb2 import InferRequest

BENCH_DIR = Path(__file__).resolve().parent
WORKER = BENCH_DIR / "accuracy_load.py"
BUDGET_WORD = "accountability"  # 15 bytes with its space: 3.75 estimated input tokens for 1 actual


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sidecars", type=int, default=4, help="sidecar processes sharing one Redis (4)")
    p.add_argument("--cluster", action="store_true",
                   help="share a Redis Cluster (3 masters started here, or $REDIS_CLUSTER_URL) instead of one Valkey")
    p.add_argument("--callers", type=int, default=64, help="concurrent callers, round-robin over sidecars (64)")
    p.add_argument("--workers", type=int, default=2, help="caller processes the callers are spread over (2)")
    p.add_argument("--backends", type=int, default=1, help="demo backends (1)")
    p.add_argument("--seconds", type=float, default=6.0, help="rate phase: seconds of full load (6)")
    p.add_argument("--tail-seconds", type=float, default=0.5,
                   help="rate phase: after the full load, one caller per worker goes on this long, so the "
                   "last admitted answer arrives without queueing delay (0.5)")
    p.add_argument("--rpm", type=float, default=3000, help="rate phase: requests_per_minute R (3000)")
    p.add_argument("--burst", type=int, default=50, help="rate phase: burst B (50)")
    p.add_argument("--budget", type=int, default=20000, help="budget phase: tokens_per_day T (20000)")
    p.add_argument("--budget-words", type=int, default=24, help=f"budget phase: input words ({BUDGET_WORD!r})")
    p.add_argument("--max-output-tokens", type=int, default=24, help="budget phase: request max_output_tokens")
    p.add_argument("--backend-tokens", type=int, default=16, help="demo backend --tokens (16)")
    p.add_argument("--budget-timeout", type=float, default=60.0, help="budget phase: give up after (60 s)")
    p.add_argument("--max-over-pct", type=float, default=1.0, help="target: over-admission, %% of allowed (1)")
    p.add_argument("--max-under-pct", type=float, default=1.0, help="target: under-admission, %% of allowed (1)")
    p.add_argument("--max-overshoot", type=float, default=1.0,
                   help="target: budget overshoot, in reservations of one call (1)")
    p.add_argument("--max-unused", type=float, default=1.0,
                   help="target: budget left unused once exhausted, in reservations of one call (1)")
    p.add_argument("--no-check", action="store_true", help="report only; exit 0 unless the harness failed")
    p.add_argument("--output", type=Path, help="write the JSON summary here")
    args = p.parse_args(argv)
    if min(args.sidecars, args.callers, args.workers, args.backends) < 1:
        p.error("--sidecars, --callers, --workers and --backends must be >= 1")
    args.workers = min(args.workers, args.callers)
    return args


def orgs_and_keys(external_redis: bool) -> dict[str, Caller]:
    """The three API keys; with a shared $REDIS_URL (or $REDIS_CLUSTER_URL) the orgs get a per-run
    suffix instead of FLUSHDB."""
    suffix = f"-{os.urandom(3).hex()}" if external_redis else ""
    return {phase: Caller(f"{phase}-key", f"accuracy-{phase}-secret-{os.urandom(8).hex()}", f"{phase}-org{suffix}")
            for phase in ("rate", "budget", "warm")}


def budget_request(args: argparse.Namespace) -> InferRequest:
    return InferRequest(model=MODEL, input=" ".join([BUDGET_WORD] * args.budget_words),
                        max_output_tokens=args.max_output_tokens)


def reservation_of(request: InferRequest) -> int:
    """What the sidecar reserves for one call (sidecar/limits/budget.py estimate_tokens), redone
    here from the documented rule: ceil(UTF-8 bytes of input / 4) + max_output_tokens."""
    return math.ceil((len(request.input.encode()) + len(request.input_bytes)) / 4) + request.max_output_tokens


# --------------------------------------------------------------------------- workers


async def run_workers(stack: Stack, specs: list[dict[str, Any]], times: dict[str, float],
                      timeout: float) -> list[dict[str, Any]]:
    """Starts one caller process per spec, waits until all are warm, releases them at one instant
    (times are offsets from now, turned into time.monotonic() values) and collects their JSON."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i, spec in enumerate(specs):
            with (stack.log_dir / f"worker-{i}.log").open("ab") as log:
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, str(WORKER), json.dumps(spec), stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=log, limit=64 * 1024 * 1024))
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"READY":
                raise RuntimeError(f"caller worker {i} failed to start; see {stack.log_dir}/worker-{i}.log")
        now = time.monotonic() + 0.2  # time for the release line to reach every worker
        released = json.dumps({name: now + offset for name, offset in times.items()}).encode() + b"\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(released)
            await proc.stdin.drain()
        results = []
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"caller worker {i} died; see {stack.log_dir}/worker-{i}.log")
            results.append(json.loads(line))
        return results
    finally:
        for proc in procs:  # by pid; normally they have exited already
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def worker_specs(args: argparse.Namespace, stack: Stack, phase: str, caller: Caller, warm: Caller,
                 request: InferRequest, **extra: Any) -> list[dict[str, Any]]:
    """Caller g calls sidecar g % K and runs in worker g % W; the first caller of each worker is
    the one that goes on through the rate phase's tail."""
    warm_request = InferRequest(model=MODEL, input="warm up", max_output_tokens=4).SerializeToString().hex()
    specs = []
    for w in range(args.workers):
        mine = range(w, args.callers, args.workers)
        specs.append({"phase": phase, "targets": [stack.sidecars[g % len(stack.sidecars)] for g in mine],
                      "tail": [g == w for g in mine], "api_key": caller.secret,
                      "request": request.SerializeToString().hex(), "warm_key": warm.secret,
                      "warm_request": warm_request, **extra})
    return specs


# --------------------------------------------------------------------------- phases


async def rate_phase(args: argparse.Namespace, stack: Stack, keys: dict[str, Caller]) -> dict[str, Any]:
    request = InferRequest(model=MODEL, input="hello accuracy", max_output_tokens=8)
    before = scrape_limit_metrics(stack.ops)
    specs = worker_specs(args, stack, "rate", keys["rate"], keys["warm"], request)
    times = {"start_at": 0.0, "stop_at": args.seconds, "tail_until": args.seconds + args.tail_seconds}
    results = await run_workers(stack, specs, times, timeout=args.seconds + args.tail_seconds + 60)
    return rate_summary(results, args.rpm, args.burst, _delta(before, scrape_limit_metrics(stack.ops)))


async def budget_phase(args: argparse.Namespace, stack: Stack, keys: dict[str, Caller]) -> dict[str, Any]:
    request = budget_request(args)
    org = keys["budget"].org
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    before = scrape_limit_metrics(stack.ops)
    # quiet x pause: a caller stops after 10 denials over >= 200 ms, long after the last
    # settlement of an admitted call could still give room back
    specs = worker_specs(args, stack, "budget", keys["budget"], keys["warm"], request, quiet=10, pause=0.02)
    results = await run_workers(stack, specs, {"start_at": 0.0, "give_up_at": args.budget_timeout},
                                timeout=args.budget_timeout + 60)
    await asyncio.sleep(0.5)  # settlements are spawned after each answer: let the last land
    key = f"sidecar:budget:{{{org}}}:org:{org}:tokens_per_day:{day}"
    return budget_summary(results, args.budget, reservation_of(request), key, read_int(stack.redis_url, key),
                          _delta(before, scrape_limit_metrics(stack.ops)))


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def accuracy(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    url = cluster_server(stack) if args.cluster else await redis_server(stack)
    keys = orgs_and_keys(external_redis=not stack.owns_redis)
    if stack.owns_redis:
        flush_db(url)
    await start_backends(stack, args.backends, args.backend_tokens)
    org_limits = {keys["rate"].org: {"requests_per_minute": args.rpm, "burst": args.burst},
                  keys["warm"].org: {"requests_per_minute": 1e9}}
    org_budgets = {keys["budget"].org: {"tokens_per_day": args.budget}, keys["warm"].org: {"tokens_per_day": 10**12}}
    # default_max_output_tokens is unused: every request of the harness sets max_output_tokens
    configs = [sidecar_config(stack, args.sidecars, list(keys.values()), org_limits, org_budgets,
                              default_max_output_tokens=64) for _ in range(args.sidecars)]
    await start_sidecars(stack, configs)
    started = time.monotonic()
    rate = await rate_phase(args, stack, keys)
    budget = await budget_phase(args, stack, keys)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    orgs = {k: v.org for k, v in keys.items()}
    # on a cluster: the master that owns each org's slot (every key of an org carries it as hash tag)
    owners = slot_owners(url, list(orgs.values()))
    return {"settings": {**settings, "redis": stack.store, "orgs": orgs, **({"org_nodes": owners} if owners else {})},
            "rate": rate, "budget": budget, "seconds": round(time.monotonic() - started, 1)}


async def accuracy_and_stop(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    """accuracy(), then stops every process; SIGTERM cancels it like Ctrl-C (cleanup still runs)."""
    cancel_on_sigterm()
    try:
        return await accuracy(args, stack)
    finally:
        stack.stop_all()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stack = Stack(log_dir=Path(tempfile.mkdtemp(prefix="sidecar-accuracy-")))
    passed = False
    try:
        summary = asyncio.run(accuracy_and_stop(args, stack))
        results: list[Check] = checks(summary, args)
        passed = all(c.ok for c in results)
        summary["checks"] = [c.as_dict() for c in results]
        summary["passed"] = passed
        print(render(summary, results))
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(summary, indent=2))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - any crash of the harness is reported as one
        print(f"harness failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        stack.stop_all()  # normally done already; the safety net
        if passed:
            shutil.rmtree(stack.log_dir, ignore_errors=True)
        else:
            print(f"process logs kept in {stack.log_dir}", file=sys.stderr)
    return 0 if passed or args.no_check else 1


if __name__ == "__main__":
    sys.exit(main())
