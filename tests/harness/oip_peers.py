"""Real KServe v2 (Open Inference Protocol) peers: MLServer as a backend, tritonclient as a caller.

Both live in virtualenvs of their own that `scripts/oip_peers.sh` creates once and caches (they need
protobuf < 7, and their generated `inference` stubs cannot share a process with ours or with
each other). :func:`oip_peers` runs the script (a no-op once the cache is complete) and fails --
never skips -- when it cannot install them. MLServer runs as a `ManagedProcess` serving
`tests/oip_peers/echo_runtime.py`; tritonclient runs `tests/oip_peers/triton_calls.py` per batch
of calls and reports each call's outcome as JSON.

The test process never imports an OIP stub: readiness is asked with hand-encoded bytes.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from tests.harness.procs import ManagedProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "oip_peers.sh"
PEER_CODE = ROOT / "tests" / "oip_peers"
INSTALL_TIMEOUT = 900  # seconds: a cold install is ~40 s on a good link
MODEL_READY = "/inference.GRPCInferenceService/ModelReady"


@dataclass(frozen=True)
class OipPeers:
    mlserver_python: Path
    tritonclient_python: Path
    install_seconds: float

    @property
    def mlserver(self) -> Path:
        return self.mlserver_python.parent / "mlserver"


_installed: OipPeers | RuntimeError | None = None


def oip_peers() -> OipPeers:
    """The two peer virtualenvs, installed by scripts/oip_peers.sh when missing (cached after).

    Fails (RuntimeError, never a skip) when they cannot be installed, e.g. PyPI is unreachable;
    a failure is remembered, so the rest of the session fails at once instead of retrying.
    """
    global _installed
    if _installed is None:
        _installed = _install()
    if isinstance(_installed, RuntimeError):
        raise _installed
    return _installed


def _install() -> OipPeers | RuntimeError:
    started = time.monotonic()
    try:
        done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired as error:
        return RuntimeError(f"scripts/oip_peers.sh did not finish in {INSTALL_TIMEOUT} s (is PyPI reachable?); "
                            f"output so far:\n{error.stderr!s}")
    if done.returncode != 0:
        return RuntimeError(f"scripts/oip_peers.sh failed (exit {done.returncode}); it installs MLServer and "
                            f"tritonclient from PyPI into {cache_dir()} -- is PyPI reachable?\n"
                            f"{done.stderr[-3000:]}")
    paths = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return OipPeers(Path(paths["mlserver"]), Path(paths["tritonclient"]), time.monotonic() - started)


def cache_dir() -> Path:
    """Where scripts/oip_peers.sh keeps the virtualenvs (same rule as the script)."""
    if "OIP_PEERS_DIR" in os.environ:
        return Path(os.environ["OIP_PEERS_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "inference-sidecar" / "oip"


def _peer_env(pythonpath: Path | None = None) -> dict[str, str]:
    """The environment of a peer process: ours minus anything that would point it at our venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- MLServer -------------------------------------------------------------------------------

ECHO_TENSORS = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}, {"name": "s", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}, {"name": "s", "datatype": "BYTES", "shape": [-1]}],
}


def _encode_string_field(number: int, value: str) -> bytes:
    data = value.encode()
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


def model_ready(address: str, model: str, timeout: float = 1.0) -> bool:
    """`ModelReady{name: model}` asked with hand-encoded bytes (no OIP stub in this process)."""
    with grpc.insecure_channel(address) as channel:
        answer = channel.unary_unary(MODEL_READY)(_encode_string_field(1, model), timeout=timeout)
    return bool(answer == b"\x08\x01")


def start_mlserver(workdir: Path, models: tuple[str, ...] = ("echo",)) -> tuple[ManagedProcess, str]:
    """`mlserver start` serving the echo runtime as each of `models`, on free ports.

    Returns once every model answers ModelReady over gRPC. Its REST and metrics servers listen on
    free loopback ports too (MLServer always starts REST), so nothing clashes with other tests.
    """
    peers = oip_peers()
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEER_CODE / "echo_runtime.py", workdir / "echo_runtime.py")
    grpc_port = free_port()
    settings = {"debug": False, "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": free_port(),
                "metrics_port": free_port(), "parallel_workers": 0, "load_models_at_startup": True}
    (workdir / "settings.json").write_text(json.dumps(settings))
    for model in models:
        (workdir / model).mkdir(exist_ok=True)
        (workdir / model / "model-settings.json").write_text(json.dumps(
            {"name": model, "implementation": "echo_runtime.EchoModel", **ECHO_TENSORS}))
    address = f"127.0.0.1:{grpc_port}"
    proc = ManagedProcess([peers.mlserver, "start", str(workdir)], workdir / "mlserver.log",
                          env=_peer_env(workdir), cwd=workdir)
    try:
        wait_until(lambda: all(model_ready(address, m) for m in models), 60, what="MLServer's models ready",
                   proc=proc, interval=0.1)
    except BaseException:
        proc.stop()
        raise
    return proc, address


# --- tritonclient -----------------------------------------------------------------------------


def triton_calls(url: str, calls: list[dict[str, Any]], headers: dict[str, str] | None = None,
                 timeout: float = 60) -> list[dict[str, Any]]:
    """Run `calls` with the real tritonclient (its own venv) against `url`; one result dict per call."""
    spec = {"url": url, "headers": headers or {}, "calls": calls}
    done = subprocess.run([str(oip_peers().tritonclient_python), str(PEER_CODE / "triton_calls.py")],
                          input=json.dumps(spec), capture_output=True, text=True, timeout=timeout,
                          env=_peer_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"triton_calls.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def triton_call(url: str, call: str, headers: dict[str, str] | None = None, **fields: Any) -> dict[str, Any]:
    """One tritonclient call (see :func:`triton_calls`)."""
    return triton_calls(url, [{"call": call, **fields}], headers)[0]


@dataclass(frozen=True)
class StatusDetails:
    """The `google.rpc.Status` a failed call's `grpc-status-details-bin` trailer carried."""
    code: int
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]


def status_details(result: dict[str, Any]) -> StatusDetails | None:
    """Decode the status details a failed tritonclient call reported; None when there were none."""
    if not result.get("details_bin"):
        return None
    status = status_pb2.Status.FromString(base64.b64decode(result["details_bin"]))
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return StatusDetails(status.code, status.message, info.reason, info.domain, dict(info.metadata))
    return StatusDetails(status.code, status.message, "", "", {})
