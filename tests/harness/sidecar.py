"""Start the project's own processes for tests: demo backends and `sidecar run`.

Both run as separate processes through their console commands, exactly as an operator would
start them; tests talk to them over real loopback gRPC.
"""
from __future__ import annotations

import json
import sys
import textwrap
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness.certs import Issued
from tests.harness.procs import ManagedProcess, free_port, wait_for_port, wait_until

SIDECAR = [sys.executable, "-m", "sidecar"]


@dataclass
class BackendProc:
    proc: ManagedProcess
    address: str

    def calls(self) -> list[dict[str, Any]]:
        """The per-call JSON lines the backend logged (it runs with --log-calls)."""
        return [line for line in self.proc.log_lines_json() if line.get("event") == "call"]

    def call_for(self, request_id: str) -> dict[str, Any] | None:
        return next((c for c in self.calls() if c.get("request_id") == request_id), None)


def start_backend(workdir: Path, *args: str, name: str = "backend", port: int | None = None) -> BackendProc:
    """A `sidecar demo-backend` on a free port (or `port`, to restart one), logging every call."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    proc = ManagedProcess([*SIDECAR, "demo-backend", "--listen", address, "--log-calls", *args],
                          workdir / f"{name}-{port}.log")
    wait_for_port("127.0.0.1", port, timeout=20, proc=proc)
    return BackendProc(proc, address)


def backend_tls_args(server: Issued, client_ca: Path | None = None) -> tuple[str, ...]:
    """`start_backend` arguments serving TLS with `server`'s certificate; with `client_ca`, mutual
    TLS: callers must present a certificate that CA signed."""
    args = ("--tls-cert", str(server.cert), "--tls-key", str(server.key))
    return (*args, "--client-ca", str(client_ca)) if client_ca is not None else args


@dataclass
class SidecarProc:
    proc: ManagedProcess
    config_path: Path
    listen: str
    admin_listen: str
    ops_listen: str
    health_listen: str = ""  # "": none configured

    @property
    def ops_url(self) -> str:
        return f"http://{self.ops_listen}"

    def log_json(self) -> list[dict[str, Any]]:
        return self.proc.log_lines_json()

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """`GET /readyz`: (HTTP status, JSON body); the body is the same whether ready or not."""
        return readyz(self.ops_url)


def readyz(ops_url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{ops_url}/readyz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def sidecar_config(models: str, **top: Any) -> str:
    """A config text with free ports for the three listeners and the given `models:` block."""
    lines = [f"listen: 127.0.0.1:{free_port()}", f"admin_listen: 127.0.0.1:{free_port()}",
             f"ops_listen: 127.0.0.1:{free_port()}"]
    lines += [f"{key}: {value}" for key, value in top.items()]
    return "\n".join(lines) + "\nmodels:\n" + textwrap.indent(textwrap.dedent(models).strip("\n"), "  ") + "\n"


def one_model(backend: str, *, model: str = "chat", timeout_ms: int = 30_000, **top: Any) -> str:
    return sidecar_config(f"""
        {model}:
          timeout_ms: {timeout_ms}
          backends:
            - {{name: a, address: "{backend}", weight: 1}}
        """, **top)


def start_sidecar(workdir: Path, config_text: str, *, name: str = "sidecar",
                  credentials: grpc.ChannelCredentials | None = None) -> SidecarProc:
    """`sidecar run --config FILE` in its own process; returns once readiness is SERVING
    (asked over TLS with `credentials` when `listen` has TLS)."""
    import yaml

    config_path = workdir / f"{name}-{free_port()}.yaml"
    config_path.write_text(config_text)
    raw = yaml.safe_load(config_text)
    # run in the work dir: relative paths of the config (state_dir) stay inside the test's tmp dir
    proc = ManagedProcess([*SIDECAR, "run", "--config", str(config_path)], config_path.with_suffix(".log"),
                          cwd=workdir)
    sidecar = SidecarProc(proc, config_path, raw["listen"], raw["admin_listen"], raw["ops_listen"],
                          raw.get("health_listen") or "")
    wait_until(lambda: health_status(sidecar.listen, credentials=credentials) == "SERVING", 20,
               what="sidecar readiness", proc=proc)
    return sidecar


def health_status(target: str, service: str = "", timeout: float = 1.0, *,
                  credentials: grpc.ChannelCredentials | None = None) -> str:
    with channel(target, credentials) as opened:
        response = health_pb2_grpc.HealthStub(opened).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to a listener: TLS with `credentials` (e.g. `tls_credentials(pki.ca, client)`), else plaintext."""
    return grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)


def tls_credentials(ca: Path, client: Issued | None = None) -> grpc.ChannelCredentials:
    """Trusting `ca` (a `Pki.ca`), presenting `client`'s certificate when given (mutual TLS)."""
    key, cert = (client.key.read_bytes(), client.cert.read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(ca.read_bytes(), key, cert)

