"""Latency of one admission decision, in process: auth + model + rate limits + budget, and the settle.

    .venv/bin/python bench/decision.py                      # 5000 decisions per store
    .venv/bin/python bench/decision.py --cluster            # and on a 3-master Redis Cluster
    .venv/bin/python bench/decision.py --decisions 300 --output out.json

Runs the sidecar's real stages (`Authenticate`, `ResolveModel`, `Limits`) on a `Call` built as the
server builds it (`begin_call`, `parse`), with the limit store `sidecar.app.limit_store()` builds
from a parsed config: `RedisLimitStore` behind `GuardedStore` against Valkey on loopback (started
here, or $REDIS_URL), with `--cluster` then against a Redis Cluster of three valkey-server masters
(`redis+cluster://`, tests/harness/redis_cluster.py, or $REDIS_CLUSTER_URL), then the same with
`limits.store: memory`. Every decision passes an org request rate, an org token rate, a key
request rate and a token budget, all too large to deny.
After each decision `Limits.finish` settles the reservation (a spawned task, awaited here) and is
timed separately: `finish()` itself (what the call pays: the correction is queued) and
`finish()` + `await store.flush()` (the store round trip that applies it; the server flushes a
few ms later, batched). At the end the budget counter in Valkey (and in the cluster) must equal
the usage settled. Sequential, on uvloop like `sidecar run`, GC on as in production.
See bench/README.md, "Accuracy of limits and budgets".
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from accuracy_stack import Stack, cluster_server, read_int, redis_server, slot_owners, sync_client
from procs import cancel_on_sigterm
from redis.cluster import RedisCluster
from sidecar_client.inference.v1.inference_pb2 import InferRequest, InferResponse, Usage

from sidecar.app import limit_store
from sidecar.billing import read_usage
from sidecar.call import AttemptRecord, begin_call
from sidecar.cli import run_async
from sidecar.config import Config, parse_config
from sidecar.limits.store import LimitStore
from sidecar.stages.auth import Authenticate
from sidecar.stages.limits import Limits
from sidecar.stages.route import ResolveModel

TARGET_P99_US = 500.0
API_KEY = "decision-bench-key-0123456789"
MODEL = "chat"


def config_text(store: str, redis_url: str, org: str) -> str:
    """`store` is `limits.store` (redis: a single server or a cluster, as `redis_url` says)."""
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    redis_line = f"  redis_url: {redis_url}\n" if store == "redis" else ""
    return f"""
auth:
  api_keys:
    - {{id: bench-key, sha256: "{digest}", org: {org}}}
limits:
  store: {store}
{redis_line}  orgs:
    {org}: {{requests_per_minute: 1000000000, tokens_per_minute: 1000000000000}}
  api_keys:
    bench-key: {{requests_per_minute: 1000000000}}
budgets:
  orgs:
    {org}: {{tokens_per_day: 1000000000000000}}
models:
  {MODEL}:
    backends: [{{name: a, address: "127.0.0.1:9"}}]
"""


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))] / 1000, 1)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1] / 1000, 1),
            "mean": round(sum(ordered) / len(ordered) / 1000, 1)}


async def measure(config: Config, decisions: int, warmup: int) -> dict[str, Any]:
    """Warm-up, then `decisions` sequential decide+settle rounds; latencies in µs."""
    store: LimitStore = limit_store(config)
    auth, model = Authenticate(lambda: config), ResolveModel(lambda: config)
    limits = Limits(lambda: config, store)
    raw = InferRequest(model=MODEL, input="how long does one limit decision take?",
                       max_output_tokens=64).SerializeToString()
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    # smaller than the reservation, so that the settle has a delta to write (as with real usage)
    response = InferResponse(model=MODEL, output="fast", usage=Usage(input_tokens=8, output_tokens=12))
    answer = response.SerializeToString()
    decision_ns: list[int] = []
    stage_ns: list[int] = []
    finish_ns: list[int] = []
    settle_ns: list[int] = []
    try:
        for i in range(warmup + decisions):
            t0 = time.perf_counter_ns()
            call = begin_call("Infer", raw, metadata, None)
            call.parse()
            await auth(call)
            await model(call)
            t1 = time.perf_counter_ns()
            await limits(call)
            t2 = time.perf_counter_ns()
            if call.reservation is None or call.reservation.degraded:
                raise RuntimeError(f"decision {i}: no reservation from the {store!r} store (or degraded)")
            # as the proxy and the call's scope leave a call whose one attempt answered
            call.attempts.append(AttemptRecord("a", "OK", 1.0))
            read_usage(call, answer)
            call.last_message, call.relayed, call.status = answer, True, "OK"
            t3 = time.perf_counter_ns()
            limits.finish(call)
            t4 = time.perf_counter_ns()
            await store.flush()
            t5 = time.perf_counter_ns()
            if i >= warmup:
                decision_ns.append(t2 - t0)
                stage_ns.append(t2 - t1)
                finish_ns.append(t4 - t3)
                settle_ns.append(t5 - t3)
    finally:
        await store.aclose()
    usage = response.usage.input_tokens + response.usage.output_tokens
    return {"decision_us": percentiles(decision_ns), "limits_stage_us": percentiles(stage_ns),
            "finish_us": percentiles(finish_ns), "settle_us": percentiles(settle_ns), "store": repr(store),
            "settled_tokens": usage * (warmup + decisions)}


def cleanup_keys(url: str, org: str) -> None:
    """With a shared $REDIS_URL (or $REDIS_CLUSTER_URL): delete this run's keys (the org name is
    unique to the run; on a cluster they all sit in the org's slot)."""
    with sync_client(url) as client:
        keys = list(client.scan_iter(match=f"sidecar:*{{{org}}}*"))  # on a cluster: every master
        if keys:
            client.delete(*keys)


def server_version(url: str) -> str | None:
    with sync_client(url) as client:
        if isinstance(client, RedisCluster):
            server = client.info("server", target_nodes=RedisCluster.RANDOM)
        else:
            server = client.info("server")
    version = server.get("valkey_version") or server.get("redis_version")
    return None if version is None else str(version)


@dataclass(frozen=True)
class Backend:
    """A Redis-backed store of the run: where it is, and what ran (for the JSON settings)."""

    url: str
    what: str   # "valkey (started)", "cluster (started, 3 masters)", "external"
    owned: bool


async def bench(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    backends: dict[str, Backend] = {}
    url = await redis_server(stack)
    backends["redis"] = Backend(url, stack.store, stack.owns_redis)
    if args.cluster:
        url = cluster_server(stack)
        backends["cluster"] = Backend(url, stack.store, stack.owns_redis)
    org = f"bench-org-{os.urandom(3).hex()}"
    results: dict[str, Any] = {}
    try:
        for name in (*backends, "memory"):
            config = config_text("redis", backends[name].url, org) if name in backends else config_text(name, "", org)
            results[name] = await measure(parse_config(config), args.decisions, args.warmup)
        # every settle really reached the store: the budget holds exactly the usage reported
        key = f"sidecar:budget:{{{org}}}:org:{org}:tokens_per_day:{datetime.now(UTC):%Y-%m-%d}"
        for name, backend in backends.items():
            results[name]["store_counter"] = counter = read_int(backend.url, key)
            if counter != results[name]["settled_tokens"]:
                raise RuntimeError(f"{name}: {key} = {counter}, expected {results[name]['settled_tokens']} "
                                   "settled tokens")
    finally:
        for backend in backends.values():
            if not backend.owned:
                cleanup_keys(backend.url, org)
    settings: dict[str, Any] = {"decisions": args.decisions, "warmup": args.warmup}
    for name, backend in backends.items():
        settings[name] = backend.what
        settings[f"{name}_version"] = server_version(backend.url)
    if "cluster" in backends:
        settings["cluster_org_node"] = slot_owners(backends["cluster"].url, [org])[org]
    met = {name: results[name]["decision_us"]["p99"] <= TARGET_P99_US for name in backends}
    return {"settings": settings,
            "environment": {"python": platform.python_version(), "loop": type(asyncio.get_running_loop()).__module__,
                            "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
            "stores": results, "target_p99_us": TARGET_P99_US, "met_by_store": met, "met": all(met.values())}


def render(report: dict[str, Any]) -> str:
    s, env = report["settings"], report["environment"]
    stores = ", ".join(f"{name} {s[name + '_version']} ({s[name]})" for name in report["met_by_store"])
    lines = [(f"decision latency, µs: {s['decisions']} sequential decisions per store after {s['warmup']} warm-up; "
             f"{env['loop']} loop, {stores}, load avg {env['load_avg'][0]:.2f}"),
             (f"{'store':<8}{'decision p50':>13}{'p90':>7}{'p99':>7}{'max':>8}"
              f"{'limits p50':>12}{'p99':>7}{'finish p50':>12}{'p99':>7}{'settle p50':>12}{'p99':>7}")]
    for name, r in report["stores"].items():
        d, st, fi, se = r["decision_us"], r["limits_stage_us"], r["finish_us"], r["settle_us"]
        lines.append(f"{name:<8}{d['p50']:>13.1f}{d['p90']:>7.1f}{d['p99']:>7.1f}{d['max']:>8.1f}"
                     f"{st['p50']:>12.1f}{st['p99']:>7.1f}{fi['p50']:>12.1f}{fi['p99']:>7.1f}"
                     f"{se['p50']:>12.1f}{se['p99']:>7.1f}")
    for name, met in report["met_by_store"].items():
        p99 = report["stores"][name]["decision_us"]["p99"]
        lines.append(f"{name} decision p99 {p99:.1f} µs -> {'within' if met else 'OVER'} the "
                     f"{TARGET_P99_US:.0f} µs target")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=int, default=5000, help="measured decisions per store (5000)")
    p.add_argument("--warmup", type=int, default=500, help="decisions before measuring, per store (500)")
    p.add_argument("--cluster", action="store_true",
                   help="also measure a Redis Cluster (3 masters started here, or $REDIS_CLUSTER_URL)")
    p.add_argument("--output", type=Path, help="write the JSON report here")
    p.add_argument("--check", action="store_true",
                   help=f"exit 1 when the redis (or cluster) p99 is over {TARGET_P99_US:.0f} µs")
    args = p.parse_args(argv)
    if args.decisions < 1 or args.warmup < 0:
        p.error("--decisions must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stack = Stack(log_dir=Path(tempfile.mkdtemp(prefix="sidecar-decision-")))

    async def run() -> dict[str, Any]:
        cancel_on_sigterm()  # SIGTERM cancels like Ctrl-C, so the processes are stopped below
        return await bench(args, stack)

    try:
        report = run_async(run)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stack.stop_all()
        shutil.rmtree(stack.log_dir, ignore_errors=True)
    print(render(report))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return 1 if args.check and not report["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
