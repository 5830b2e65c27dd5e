"""`sidecar demo`: the sidecar and two demo backends on embedded defaults, one process tree.

The backends run as child processes (`sidecar demo-backend`) on free loopback ports; the sidecar
runs in this process with an embedded config routing model `chat` 3:1 across them. Ctrl-C (or
SIGTERM) drains the sidecar, then stops the backends.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from sidecar.app import Sidecar
from sidecar.config import Config, ConfigError, parse_config

DEMO_API_KEY = "demo-key"  # a demo needs a known key; real configs hold digests of secret keys
DEMO_ADMIN_TOKEN = "demo-admin"
DEMO_USAGE_PATH = "./var/usage/demo-usage.jsonl"  # one JSON usage record per call
DEMO_CONFIG = """\
listen: {listen}
admin_listen: {admin_listen}
ops_listen: {ops_listen}
shutdown: {{grace_ms: 5000}}
auth:
  api_keys:
    - {{id: demo-app, sha256: "{demo_key_digest}", org: demo, models: ["*"]}}
  admin_tokens:
    - {{id: demo-ops, sha256: "{demo_admin_digest}"}}
limits:
  store: memory
  orgs:
    demo: {{requests_per_minute: 600, tokens_per_minute: 100000}}
budgets:
  orgs:
    demo: {{tokens_per_day: 1000000}}
usage:
  sink: file
  file: {{path: "{usage_path}"}}
models:
  chat:
    timeout_ms: 30000
    backends:
      - {{name: a, address: "{backend_a}", weight: 3}}
      - {{name: b, address: "{backend_b}", weight: 1}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_backend(address: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "sidecar", "demo-backend", "--listen", address],
                            stdout=subprocess.DEVNULL)


def _wait_listening(address: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    host, _, port = address.rpartition(":")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"demo backend on {address} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"demo backend on {address} did not start in {timeout:.0f}s")


def demo_config(listen: str, admin_listen: str, ops_listen: str, backend_a: str, backend_b: str) -> Config:
    digest = hashlib.sha256(DEMO_API_KEY.encode()).hexdigest()
    admin_digest = hashlib.sha256(DEMO_ADMIN_TOKEN.encode()).hexdigest()
    return parse_config(DEMO_CONFIG.format(listen=listen, admin_listen=admin_listen, ops_listen=ops_listen,
                                           backend_a=backend_a, backend_b=backend_b, demo_key_digest=digest,
                                           demo_admin_digest=admin_digest, usage_path=DEMO_USAGE_PATH))


def run_demo(listen: str, admin_listen: str, ops_listen: str) -> int:
    from sidecar.cli import run_async
    from sidecar.telemetry.logging import configure_logging

    configure_logging("WARNING")
    addresses = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    backends = [_start_backend(a) for a in addresses]
    try:
        for address, proc in zip(addresses, backends, strict=True):
            _wait_listening(address, proc)
        try:
            config = demo_config(listen, admin_listen, ops_listen, *addresses)
        except ConfigError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return 2

        async def serve() -> None:
            sidecar = Sidecar(config, "demo")  # grpc.aio objects belong to the running loop
            started = asyncio.create_task(sidecar.run_until_signalled(), name="sidecar")
            ready = asyncio.create_task(sidecar.health.wait_started(), name="sidecar-ready")
            await asyncio.wait((started, ready), return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if not started.done():
                _print_banner(sidecar, addresses)
            await started

        run_async(serve)
        print("sidecar demo stopped", flush=True)
        return 0
    except (OSError, RuntimeError) as exc:
        print(f"sidecar demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in backends:
            proc.terminate()
        for proc in backends:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def _print_banner(sidecar: Sidecar, backends: list[str]) -> None:
    exe = sys.argv[0] if Path(sys.argv[0]).name == "sidecar" else f"{sys.executable} -m sidecar"
    target = sidecar.listeners.listen
    print(json.dumps({"event": "demo ready", "listen": target, "admin_listen": sidecar.listeners.admin_listen,
                      "ops_listen": sidecar.listeners.ops_listen, "backends": backends}), flush=True)
    print(f"""
sidecar demo is running
  inference (gRPC)   {target}     model "chat" -> backends a (weight 3), b (weight 1)
                                       API key "{DEMO_API_KEY}" (org "demo")
                                       limits: 600 requests/min, 100000 tokens/min,
                                       1000000 tokens/day (memory store)
  admin (gRPC)       {sidecar.listeners.admin_listen}     admin token "{DEMO_ADMIN_TOKEN}"
  ops (HTTP)         http://{sidecar.listeners.ops_listen}/readyz   /healthz   /metrics
  usage records      {Path(DEMO_USAGE_PATH).resolve()}

Try, in another terminal:
  {exe} call --target {target} --api-key {DEMO_API_KEY} --model chat --input "hello sidecar"
  {exe} call --target {target} --api-key {DEMO_API_KEY} --model chat --input "hello sidecar" --stream

Ctrl-C stops everything.
""", flush=True)
