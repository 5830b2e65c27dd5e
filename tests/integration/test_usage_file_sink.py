"""`usage.sink: file` when the file cannot be written, seen from the outside: a path that can
never be written is refused before the sidecar starts (`check-config` and `run` exit 2 naming
`usage.file.path`); a file that stops being writable while the sidecar runs makes the usage
component degraded in `/readyz`, and its records are held and written once it can be written
again (none lost, none twice); what is still held at shutdown is counted as dropped and logged.

"Cannot be written" is made in a way root cannot get around: the file's directory is replaced
by a regular file, so creating or opening the file fails with ENOTDIR for any user.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from tests.conftest import Launcher
from tests.harness.invariants import assert_idle
from tests.harness.load import INFER
from tests.harness.procs import ManagedProcess, wait_until
from tests.harness.sidecar import SIDECAR, BackendProc, SidecarProc, one_model

KEY = "sk-usage-file"
METADATA = (("x-api-key", KEY),)


def file_config(backend: str, path: Path) -> str:
    return one_model(backend) + f"""auth:
  api_keys:
    - {{id: app, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", org: acme}}
usage:
  sink: file
  file: {{path: "{path}"}}
"""




def dropped(sidecar: SidecarProc) -> float:
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("api_router_usage_records_dropped_total{"))


def call_all(sidecar: SidecarProc, request_ids: list[str]) -> None:
    request = InferRequest(model="chat", input="hello").SerializeToString()
    with grpc.insecure_channel(sidecar.listen) as channel:
        infer = channel.unary_unary(INFER)
        for request_id in request_ids:
            infer(request, metadata=(*METADATA, ("x-request-id", request_id)), timeout=10)  # raises unless OK


def records(path: Path) -> list[str]:
    """The request ids of the records in the usage file, in order (every line must be whole JSON)."""
    if not path.exists():
        return []
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines()]


def block(directory: Path) -> Path:
    """Makes `directory` unwritable for anyone: moved aside, a regular file in its place."""
    aside = directory.with_name(directory.name + "-aside")
    directory.rename(aside)
    directory.write_text("not a directory\n")
    return aside


def unblock(directory: Path, aside: Path) -> None:
    directory.unlink()
    aside.rename(directory)


def test_a_usage_file_that_cannot_be_written_is_refused_at_start(backend: BackendProc, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file, not a directory\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text(file_config(backend.address, blocker / "usage.jsonl"))

    check = subprocess.run([*SIDECAR, "check-config", str(config)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert check.returncode == 2, check.stdout + check.stderr
    assert check.stdout.startswith("usage.file.path: "), check.stdout
    assert str(blocker) in check.stdout

    run = ManagedProcess([*SIDECAR, "run", "--config", str(config)], tmp_path / "run.log", cwd=tmp_path)
    try:
        code = run.wait(60)
    finally:
        run.stop()
    assert code == 2, run.log_tail()
    assert "usage.file.path: " in run.log_text()


def test_a_usage_file_that_becomes_unwritable_holds_its_records_and_degrades_readiness(
        launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    directory = tmp_path / "usage"
    path = directory / "usage.jsonl"
    sidecar = launch.sidecar(file_config(backend.address, path))
    status, body = sidecar.readyz()
    assert status == 200 and body["components"]["usage"]["status"] == "ok"
    first = [f"before-{i}" for i in range(5)]
    call_all(sidecar, first)
    wait_until(lambda: records(path) == first, 10, what="the first records written")

    aside = block(directory)
    held = [f"held-{i}" for i in range(30)]
    call_all(sidecar, held)  # every call is still served
    usage = wait_until(lambda: (u := sidecar.readyz()[1]["components"]["usage"])["held"] == 30 and u, 20,
                       what="30 records held")
    assert isinstance(usage, dict) and usage["status"] == "degraded", usage
    assert "NotADirectoryError" in usage["write_error"] or "FileExistsError" in usage["write_error"], usage
    assert sidecar.readyz()[0] == 200  # calls are served: their records wait in memory
    assert dropped(sidecar) == 0
    assert any(line.get("msg") == "usage file cannot be written; records are held and retried"
               for line in sidecar.log_json())
    assert not any("Traceback" in line for line in sidecar.proc.log_text().splitlines())

    unblock(directory, aside)
    wait_until(lambda: records(path) == first + held, 20, what="the held records written")
    usage = sidecar.readyz()[1]["components"]["usage"]
    assert (usage["status"], usage["held"], usage["written"]) == ("ok", 0, 35), usage
    assert dropped(sidecar) == 0
    assert_idle(sidecar)

    aside = block(directory)
    lost = [f"lost-{i}" for i in range(3)]
    call_all(sidecar, lost)
    wait_until(lambda: sidecar.readyz()[1]["components"]["usage"]["held"] == 3, 20, what="3 records held")
    assert sidecar.proc.stop() == 0
    line = next(line for line in sidecar.log_json() if line.get("msg") == "usage records lost: the usage file "
                "cannot be written")
    assert line["records"] == 3 and line["path"] == str(path)
    unblock(directory, aside)
    assert records(path) == first + held
