"""Where a call's CPU goes inside the sidecar: py-spy samples the sidecar process under h2load load
and the samples are summed per component and per sidecar function.

    .venv/bin/python bench/profile.py                        # --features full, 20 s, ~40 s in all
    .venv/bin/python bench/profile.py --features min --seconds 30 --native
    .venv/bin/python bench/profile.py --rate 1000            # open loop at 1,000 calls/s instead

Starts the demo backend, what the feature set sends to (bench/run.py's `--features`), and one
`sidecar run`, pinned as bench/run.py pins them (load generators on one CPU, servers on the
other). While h2load drives the sidecar, `py-spy record` samples it (non-blocking, so the sidecar
runs undisturbed; `--native` pauses it per sample to unwind C frames as well: grpc's core,
protobuf's upb). Printed:

- **components**: each sample's innermost frame (leaf), classified by where its code lives: grpc's
  Cython layer and core, protobuf, the event loop, logging and JSON, prometheus_client, the OTLP
  exporter, each sidecar module, ... "self" time: what the CPU was executing.
- **sidecar functions, inclusive**: each sample counted once for every sidecar function on its
  stack: what a stage or finisher costs with everything it calls.

Shares are of the samples py-spy took while the sidecar was on the CPU (idle is not sampled);
multiply by the CPU µs per request printed at the end to get µs per call. The raw stacks are
kept (`--keep`) for a flame graph (e.g. `inferno-flamegraph < stacks.txt`).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from latency import METADATA, Target, request_bytes, unary_batch
from load import grpc_frame, h2load_path
from procs import cpu_seconds, loopback, start, stop, wait_serving
from run import FEATURES, MODEL, Stack, pick_cpus, sidecar_argv, sidecar_config, start_peers

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (component, test on "file function" of the innermost frame), first match wins. py-spy names
# files relative to their sys.path entry (grpc/aio/_call.py, sidecar/server.py); native frames
# (--native) by their library or C function.
COMPONENTS: list[tuple[str, re.Pattern[str]]] = [
    ("grpc aio (python + cython)", re.compile(r"^grpc/aio/|_cython|cygrpc")),
    ("grpc (python)", re.compile(r"^grpc/")),
    ("grpc core (C)", re.compile(r"libgrpc|grpc_core|grpc::|grpc_|tsi_|absl|gpr_")),
    ("protobuf", re.compile(r"^google/protobuf|upb|protobuf")),
    ("event loop (uvloop/asyncio; without --native: C below it)", re.compile(r"^uvloop|^asyncio/|libuv|uv_|epoll")),
    ("threads (threading, concurrent)", re.compile(r"^threading\.py|^concurrent/|^queue\.py")),
    ("logging + json", re.compile(r"^logging/|^json/|orjson")),
    ("prometheus_client", re.compile(r"^prometheus_client")),
    ("opentelemetry", re.compile(r"^opentelemetry")),
    ("confluent_kafka", re.compile(r"confluent_kafka|librdkafka|rd_kafka")),
    ("redis", re.compile(r"^redis/")),
    ("python runtime (C)", re.compile(r"libpython|python3\.\d+|_Py|Py[A-Z]")),
    ("libc / kernel", re.compile(r"libc\.so|libc-|libpthread|\[kernel|syscall|__GI_|memcpy|memmove|malloc|free")),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", choices=FEATURES, default="full", help="bench/run.py's feature sets (full)")
    p.add_argument("--limits", choices=("memory", "none"), default="memory", help="the limit store (memory)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to sample under load (20)")
    p.add_argument("--rate", type=int, default=0,
                   help="open loop at this many calls/s (h2load --rps over 4 connections); 0: closed loop, "
                        "4 connections x 8 streams (default)")
    p.add_argument("--sample-rate", type=int, default=250, help="py-spy samples per second (250)")
    p.add_argument("--native", action="store_true", help="also unwind native frames (pauses the sidecar per sample)")
    p.add_argument("--top", type=int, default=40, help="sidecar functions to list (40)")
    p.add_argument("--keep", type=Path, help="write the raw collapsed stacks here")
    p.add_argument("--tokens", type=int, default=8, help="demo backend --tokens (8)")
    args = p.parse_args()
    args.cpus = pick_cpus(None)
    return args


def py_spy() -> str:
    found = Path(sys.executable).with_name("py-spy")
    if found.exists():
        return str(found)
    which = shutil.which("py-spy")
    if which is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy (it is in the [test] extra)")
    return which


def component_of(frame: str) -> str:
    match = FRAME.match(frame)
    file = match["file"] if match else ""
    if file.startswith("sidecar/"):
        return file
    where = f"{file} {match['function']}" if match else frame
    for name, pattern in COMPONENTS:
        if pattern.search(where):
            return name
    return "other: " + (file or frame[:40])


def sidecar_function(frame: str) -> str | None:
    match = FRAME.match(frame)
    if match is None or not match["file"].startswith("sidecar/"):
        return None
    return f"{match['file'].removeprefix('sidecar/')}:{match['function']}"


def summarize(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(count for _, count in stacks) or 1
    components: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        components[component_of(frames[-1])] += count
        for name in {f for f in map(sidecar_function, frames) if f is not None}:
            inclusive[name] += count
    lines = [f"{total} samples", "", "components (self: the innermost frame)"]
    lines += [f"  {share / total:6.1%}  {name}" for name, share in components.most_common()]
    lines += ["", f"sidecar functions, inclusive (top {top})"]
    lines += [f"  {share / total:6.1%}  {name}" for name, share in inclusive.most_common(top)]
    return "\n".join(lines)


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            # py-spy's raw format: the thread first, then frames root to leaf
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if frames:
                stacks.append((frames, int(count)))
    return stacks


async def profile(args: argparse.Namespace, stack: Stack) -> str:
    server_cpus = args.cpus[1] if args.cpus else None
    backend_address = loopback()
    backend = stack.add(start("backend", sidecar_argv("demo-backend", "--listen", backend_address,
                                                      "--tokens", str(args.tokens)), stack.tmp, server_cpus))
    await wait_serving(backend, backend_address)
    peers = start_peers(args, stack)
    listen, admin, ops = loopback(), loopback(), loopback()
    config = stack.tmp / "sidecar.yaml"
    config.write_text(yaml.safe_dump(sidecar_config(listen, admin, ops, backend_address, args.limits,
                                                    features=args.features, peers=peers)))
    sidecar = stack.add(start("sidecar", sidecar_argv("run", "--config", str(config)), stack.tmp, server_cpus))
    await wait_serving(sidecar, listen)
    request = request_bytes(MODEL, args.tokens)
    target = Target("sidecar", listen)
    await target.wait_ok(request)
    await unary_batch(target, request, 500, 8)  # warm-up
    body = stack.tmp / "request.grpc"
    body.write_bytes(grpc_frame(request))

    stacks_file = args.keep or stack.tmp / "stacks.txt"
    # in a thread: blocking calls in a coroutine are what ruff's ASYNC rules refuse (nothing else
    # runs on this loop meanwhile, so the behaviour is the same)
    spy = await asyncio.to_thread(
        subprocess.Popen, [py_spy(), "record", "--pid", str(sidecar.pid), "--rate", str(args.sample_rate),
                           "--format", "raw", "--output", str(stacks_file), "--duration", str(int(args.seconds)),
                           *(["--native"] if args.native else ["--nonblocking"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    await asyncio.sleep(0.5)  # py-spy attaches
    cpu0, t0 = cpu_seconds(sidecar.pid), time.monotonic()
    load = [*(["taskset", "-c", args.cpus[0]] if args.cpus else []), h2load_path() or "h2load",
            "-D", str(int(args.seconds) - 1), "-t", "1", "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"authorization: Bearer {dict(METADATA)['authorization'].removeprefix('Bearer ')}"]
    load += (["-c", "4", "-m", "16", "--rps", str(max(1, args.rate // 4))] if args.rate else ["-c", "4", "-m", "8"])
    out = await asyncio.to_thread(subprocess.run, [*load, f"http://{listen}/inference.v1.Inference/Infer"],
                                  capture_output=True, text=True, check=False, timeout=args.seconds + 60)
    cpu1, t1 = cpu_seconds(sidecar.pid), time.monotonic()
    _, err = spy.communicate(timeout=args.seconds + 60)
    await target.close()
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done", out.stdout)
    requests = int(done[1]) if done else 0
    if spy.returncode != 0 or not stacks_file.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-2000:]}")
    report = summarize(read_stacks(stacks_file), args.top)
    per_request = (cpu1 - cpu0) / max(1, requests) * 1e6
    return (f"{report}\n\nfeatures {args.features}: {requests} requests in {t1 - t0:.0f} s "
            f"({requests / (t1 - t0):.0f}/s), sidecar CPU {per_request:.0f} µs per request "
            f"({'py-spy --native pauses the process: inflated' if args.native else 'py-spy non-blocking'})")


def main() -> int:
    args = parse_args()
    if h2load_path() is None:
        print("profile.py needs h2load (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-profile-"))
    stack = Stack(tmp=tmp)
    try:
        print(asyncio.run(profile(args, stack)))
    finally:
        for proc in reversed(stack.procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
