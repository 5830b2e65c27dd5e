"""`sidecar smoke` against `sidecar demo`, as CI and an operator after a deploy run it: every
check passes on a healthy sidecar, and a broken setup fails with the check named."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.procs import ManagedProcess, free_port, wait_until
from tests.harness.sidecar import SIDECAR, health_status


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[list[str]]:
    """A `sidecar demo` on free ports; yields the smoke command's address options."""
    listen, admin, ops = (f"127.0.0.1:{free_port()}" for _ in range(3))
    proc = ManagedProcess([*SIDECAR, "demo", "--listen", listen, "--admin-listen", admin, "--ops-listen", ops],
                          tmp_path / "demo.log", cwd=tmp_path)
    try:
        wait_until(lambda: health_status(listen) == "SERVING", 30, what="demo readiness", proc=proc)
        yield ["--target", listen, "--admin", admin, "--ops", ops]
    finally:
        proc.stop()


def checks(output: str) -> list[tuple[str, str]]:
    """(ok | FAIL, check name) per check line: `ok    unary call             4 tokens, ...`."""
    return [(line[:4].strip(), line[6:29].strip()) for line in output.splitlines() if line.startswith(("ok", "FAIL"))]


def smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDECAR, "smoke", *args], capture_output=True, text=True, timeout=120, check=False)


def test_smoke_passes_against_the_demo(demo: list[str]) -> None:
    result = smoke(*demo)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert checks(result.stdout) == [
        ("ok", "health"), ("ok", "unary call"), ("ok", "streamed call"), ("ok", "auth failure"), ("ok", "metrics"),
        ("ok", "audit lookup"), ("ok", "admin ListRoutes"), ("ok", "rate-limit denial")]
    assert "RATE_LIMIT_EXCEEDED" in result.stdout and "INVALID_API_KEY" in result.stdout
    assert lines[-1] == "8 of 8 checks passed"


def test_smoke_fails_and_names_the_failing_checks(demo: list[str]) -> None:
    result = smoke(*demo, "--admin-token", "not-the-token", "--skip-rate-limit")
    assert result.returncode == 1
    failed = [name for outcome, name in checks(result.stdout) if outcome == "FAIL"]
    assert failed == ["audit lookup", "admin ListRoutes"]
    assert "UNAUTHENTICATED" in result.stdout
    assert result.stdout.splitlines()[-1] == "5 of 7 checks passed; failed: audit lookup, admin ListRoutes"


def test_smoke_fails_when_nothing_listens() -> None:
    port = free_port()
    result = smoke("--target", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{port}", "--ops", f"127.0.0.1:{port}",
                   "--skip-rate-limit")
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1].startswith("0 of 7 checks passed")


def admin(demo: list[str], *args: str, token: str = "demo-admin") -> subprocess.CompletedProcess[str]:
    admin_address = demo[demo.index("--admin") + 1]
    return subprocess.run([*SIDECAR, "admin", "--admin", admin_address, "--token", token, *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_admin_commands_the_runbooks_use(demo: list[str]) -> None:
    import json

    routes = json.loads(admin(demo, "routes").stdout)
    assert [(b["name"], b["configured_weight"]) for b in routes["routes"][0]["backends"]] == [("a", 3.0), ("b", 1.0)]
    drained = admin(demo, "override", "chat", "b", "--drain", "--ttl", "60", "--reason", "runbook test")
    assert drained.returncode == 0 and json.loads(drained.stdout)["created_by"] == "demo-ops"
    backends = json.loads(admin(demo, "routes", "--model", "chat").stdout)["routes"][0]["backends"]
    assert {b["name"]: b.get("effective_weight", 0.0) for b in backends} == {"a": 3.0, "b": 0.0}
    assert json.loads(admin(demo, "clear", "chat", "b").stdout) == {"cleared": True}
    assert json.loads(admin(demo, "clear", "chat", "b").stdout) == {"cleared": False}
    target = demo[demo.index("--target") + 1]
    called = subprocess.run([*SIDECAR, "call", "--target", target, "--api-key", "demo-key", "--model", "chat",
                             "--input", "hi", "--request-id", "runbook-req-1"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert called.returncode == 0, called.stderr
    record = json.loads(admin(demo, "audit", "runbook-req-1").stdout)
    assert record["usage"]["org"] == "demo" and record["routing_decision"] == "primary"
    missing = admin(demo, "audit", "no-such-request")
    assert missing.returncode == 1 and json.loads(missing.stderr)["reason"] == "REQUEST_NOT_FOUND"
    refused = admin(demo, "routes", token="wrong")
    assert refused.returncode == 1 and json.loads(refused.stderr)["reason"] == "INVALID_API_KEY"
