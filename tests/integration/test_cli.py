"""The commands of CONTRACT §1 as a user runs them: `hash-key`, `call`, `demo`."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

from tests.harness.procs import ManagedProcess, free_port, wait_until
from tests.harness.sidecar import SIDECAR, BackendProc, health_status, one_model, start_sidecar


def sidecar_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDECAR, *args], capture_output=True, text=True, timeout=60, check=False)


def test_hash_key_prints_the_sha256_form() -> None:
    result = sidecar_cli("hash-key", "sk-live-123")
    assert result.returncode == 0
    assert result.stdout.strip() == "sha256:" + hashlib.sha256(b"sk-live-123").hexdigest()


def test_call_unary_and_stream(backend: BackendProc, tmp_path: Path) -> None:
    sidecar = start_sidecar(tmp_path, one_model(backend.address))
    try:
        unary = sidecar_cli("call", "--target", sidecar.listen, "--model", "chat", "--input", "hello world",
                            "--api-key", "k", "--request-id", "cli-1")
        assert unary.returncode == 0, unary.stderr
        assert unary.stdout.strip() == "hello world hello world hello world hello world"
        assert "request_id=cli-1 input_tokens=2 output_tokens=8 finish_reason=stop" in unary.stderr
        stream = sidecar_cli("call", "--target", sidecar.listen, "--model", "chat", "--input", "a b", "--stream",
                             "--max-output-tokens", "3")
        assert stream.returncode == 0, stream.stderr
        assert stream.stdout.strip() == "a b a"
        as_json = sidecar_cli("call", "--target", sidecar.listen, "--model", "chat", "--input", "x", "--json")
        assert json.loads(as_json.stdout)["usage"] == {"inputTokens": 1, "outputTokens": 8}
        failed = sidecar_cli("call", "--target", sidecar.listen, "--model", "nope")
        assert failed.returncode == 1
        assert json.loads(failed.stderr)["reason"] == "NOT_FOUND"
    finally:
        sidecar.proc.stop()


def test_demo_runs_answers_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    listen = f"127.0.0.1:{ports[0]}"
    demo = ManagedProcess([*SIDECAR, "demo", "--listen", listen, "--admin-listen", f"127.0.0.1:{ports[1]}",
                           "--ops-listen", f"127.0.0.1:{ports[2]}"], tmp_path / "demo.log", cwd=tmp_path)
    try:
        wait_until(lambda: health_status(listen) == "SERVING", 30, what="demo readiness", proc=demo)
        ready = wait_until(lambda: next((line for line in demo.log_lines_json()
                                         if line.get("event") == "demo ready"), None), 5, what="demo banner")
        assert isinstance(ready, dict) and len(ready["backends"]) == 2
        assert f"sidecar call --target {listen} --api-key demo-key --model chat" in demo.log_text()
        anonymous = sidecar_cli("call", "--target", listen, "--model", "chat", "--input", "hi")
        assert anonymous.returncode == 1 and json.loads(anonymous.stderr)["reason"] == "UNAUTHORIZED"
        key = ("--api-key", "demo-key")
        unary = sidecar_cli("call", "--target", listen, *key, "--model", "chat", "--input", "hello sidecar")
        assert unary.returncode == 0 and unary.stdout.strip().startswith("hello sidecar"), unary.stderr
        stream = sidecar_cli("call", "--target", listen, *key, "--model", "chat", "--input", "hello sidecar",
                             "--stream")
        assert stream.returncode == 0 and stream.stdout.strip().startswith("hello sidecar"), stream.stderr
        backend_pids = _children(demo.pid)
        assert len(backend_pids) == 2
        assert demo.stop(timeout=15, sig=signal.SIGINT) == 0
        assert "sidecar demo stopped" in demo.log_text()
        assert not [pid for pid in backend_pids if Path(f"/proc/{pid}").exists()]
        # the demo keeps usage records in a local file: the two calls with the key, not the anonymous one
        records = [json.loads(line) for line in (tmp_path / "var/usage/demo-usage.jsonl").read_text().splitlines()]
        assert [(r["org"], r["status"], bool(r.get("streamed"))) for r in records] == [
            ("demo", "OK", False), ("demo", "OK", True)]
    finally:
        demo.stop()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=True).stdout
    return [int(p) for p in out.split()]


def test_run_reports_a_port_in_use(backend: BackendProc, tmp_path: Path) -> None:
    first = start_sidecar(tmp_path, one_model(backend.address))
    try:
        text = one_model(backend.address)
        own_listen = next(line for line in text.splitlines() if line.startswith("listen:"))
        clash = text.replace(own_listen, f"listen: {first.listen}")
        path = tmp_path / "clash.yaml"
        path.write_text(clash)
        result = subprocess.run([*SIDECAR, "run", "--config", str(path)], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1
        assert f"cannot listen on {first.listen}" in result.stderr
    finally:
        first.proc.stop()


def test_version() -> None:
    result = sidecar_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("sidecar ")
