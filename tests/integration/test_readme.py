"""The README's quickstart, run exactly as written: `make demo`, the calls and `sidecar smoke`
against it, Ctrl-C; and `.ci/run` is the README's test command."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from tests.harness.procs import ManagedProcess, wait_until
from tests.harness.sidecar import health_status

ROOT = Path(__file__).resolve().parents[2]
DEMO_PORTS = (50051, 50052, 9464)  # the defaults the README's commands use


def readme_commands() -> list[str]:
    """Every command line of the README's ```sh blocks, in order."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    commands = readme_commands()
    assert commands[0] == "make demo" and commands[-1] == "make test", commands
    taken = [p for p in DEMO_PORTS if port_taken(p)]
    assert not taken, f"the README's demo ports {taken} are in use on this machine; free them to run this test"
    demo = ManagedProcess(["bash", "-c", commands[0]], tmp_path / "make-demo.log", cwd=ROOT)
    try:
        wait_until(lambda: port_taken(50051) and health_status("127.0.0.1:50051") == "SERVING", 300,
                   what="`make demo` ready", proc=demo)
        for command in commands[1:-1]:
            result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True,
                                    timeout=120, check=False)
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            assert result.stdout.strip(), f"{command} printed nothing"
        os.killpg(demo.pid, signal.SIGINT)  # "Ctrl-C stops the sidecar and both backends": the terminal's group
        demo.wait(30)
        assert "sidecar demo stopped" in demo.log_text()
        assert not any(port_taken(p) for p in DEMO_PORTS)
    finally:
        demo.stop()


def test_ci_runs_the_readme_test_command() -> None:
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert steps == [readme_commands()[-1]]
