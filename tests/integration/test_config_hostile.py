"""Hostile and careless config files against the real commands (issue 15): `sidecar check-config`
and `sidecar run` answer exit 2 with one `key.path: message` line per problem, never a
traceback; a running sidecar given one on SIGHUP keeps answering calls with its old config.

Bulk fuzzing runs in-process (tests/unit/test_config_fuzz.py); this file sends a handful of
cases through real processes.
"""
from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from sidecar.app import config_version
from tests.conftest import Launcher
from tests.grpc.test_reload import chat, listeners, logged, readyz, reloads, replace_file, routes
from tests.harness.load import Load
from tests.harness.procs import wait_until
from tests.harness.sidecar import SIDECAR, one_model

INVALID = Path(__file__).resolve().parent.parent / "configs" / "invalid"
NODES = "more than 200000 values, lists and mappings (aliases counted as copies of what they name)"
TOO_BIG = "larger than 1048576 bytes (1 MiB), the most a config file may be"
MEMORY = 2 << 30  # address space of a command under test: a file that blows memory up fails, not the host


def expected(name: str) -> list[str]:
    text = (INVALID / name).read_bytes().decode(errors="replace")
    return [line.removeprefix("# expect: ") for line in text.splitlines() if line.startswith("# expect: ")]


def limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def sidecar_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDECAR, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          preexec_fn=limited_memory)


def alias_bomb(levels: int, name: str = "x-lol") -> str:
    """A mapping `name` whose last list expands to 10 ** `levels` strings through nested aliases."""
    lines = [f"  l0: &l0 [{', '.join(['lol'] * 10)}]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"{name}:\n" + "\n".join(lines) + "\n"


def padded(text: str, size: int) -> str:
    """`text` and comment lines up to `size` bytes: a valid config, just big."""
    line = "# " + "padding " * 12 + "\n"
    return text + line * ((size - len(text)) // len(line) + 1)


# --- finding 1: unbounded parsing --------------------------------------------------------------


def test_check_config_refuses_a_billion_laughs_at_once(tmp_path: Path) -> None:
    """10^9 strings from ten lines: refused while reading; the old code ran past 20 s and 1 GB.
    20 s is far more than the refusal takes on a loaded machine, and far less than expanding."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9) + "models: {chat: {backends: [{name: a, address: '127.0.0.1:1'}]}}\n")
    result = sidecar_command("check-config", str(path), timeout=20)
    assert (result.returncode, result.stderr) == (2, "")
    assert result.stdout.splitlines() == [f"x-lol.l5[0]: {NODES}; a config needs far fewer"]


def test_hostile_reloads_leave_calls_answered_and_the_old_config_serving(launch: Launcher) -> None:
    """SIGHUP with a 32 MiB file, then an alias bomb of 10^7 nodes, while callers call: both are
    refused naming the bound, and no call fails (parsing them on the event loop stalled it for
    seconds: every call in flight ended DEADLINE_EXCEEDED)."""
    a, b = launch.backend(), launch.backend()
    head = listeners()
    original = chat(head, [("a", a.address, 1), ("b", b.address, 0)])
    flipped = chat(head, [("a", a.address, 0), ("b", b.address, 1)])  # valid: what must not apply
    sidecar = launch.sidecar(original)
    loads = [Load(sidecar.listen).start() for _ in range(3)]
    try:
        wait_until(lambda: len(a.calls()) > 20, 10, what="load on a")
        cases = [(padded(flipped, 32 << 20), f"{sidecar.config_path}: {TOO_BIG}"),
                 (alias_bomb(7) + flipped, f"x-lol.l5[0]: {NODES}; a config needs far fewer")]
        for hostile, _ in cases:
            counted = reloads(sidecar, "failure") + reloads(sidecar, "success")
            replace_file(sidecar.config_path, hostile)
            sidecar.proc.signal(signal.SIGHUP)
            wait_until(lambda n=counted: reloads(sidecar, "failure") + reloads(sidecar, "success") > n, 60,
                       what="the reload", proc=sidecar.proc)
            answered = sum(load.total()["OK"] for load in loads)
            wait_until(lambda n=answered: sum(load.total()["OK"] for load in loads) > n + 20, 30,
                       what="calls answered after the reload")
    finally:
        for load in loads:
            load.finish()
    outcomes = sum((load.total() for load in loads), Counter[str]())
    assert set(outcomes) == {"OK"}, outcomes
    for _, problem in cases:
        wait_until(lambda p=problem: [p] in [line["problems"] for line in logged(sidecar, "config reload rejected")],
                   30, what=f"rejected: {problem}", proc=sidecar.proc)
    assert routes(sidecar, {"a": a, "b": b}) == {"a": 10}  # the old weights
    assert readyz(sidecar)["components"]["config"]["version"] == config_version(original)
    assert reloads(sidecar, "success") == 0
    # the file watcher may have rejected a file too: never with another problem
    assert {tuple(line["problems"]) for line in logged(sidecar, "config reload rejected")} == {
        (problem,) for _, problem in cases}


# --- finding 4 and fuzzing: every failure is exit 2 with a key path ---------------------------


PROCESS_CASES = ["timeout_bool.yaml", "duplicate_key.yaml", "weight_inf.yaml", "timeout_too_large.yaml",
                 "limits_rpm_inf.yaml", "not_utf8.yaml", "nesting_5000_deep.yaml", "alias_recursive.yaml"]


@pytest.mark.parametrize("name", PROCESS_CASES, ids=lambda n: n.removesuffix(".yaml"))
def test_check_config_and_run_refuse_nonsense_with_exit_2(name: str) -> None:
    checked = sidecar_command("check-config", str(INVALID / name))
    assert (checked.returncode, checked.stderr) == (2, "")
    assert checked.stdout.splitlines() == expected(name)
    ran = sidecar_command("run", "--config", str(INVALID / name))
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert ran.stderr.splitlines()[-len(expected(name)):] == expected(name)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_and_oversized_files_through_the_command(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "random.yaml"
    if seed == 0:
        path.write_bytes(b"models: {}\n" + b"#" * (2 << 20))
        want = [f"{path}: {TOO_BIG}"]
    else:
        path.write_bytes(rng.randbytes(rng.randrange(1, 4096)))
        want = []
    result = sidecar_command("check-config", str(path))
    assert (result.returncode, result.stderr) == (2, "")
    lines = result.stdout.splitlines()
    assert lines and all(line.split(": ", 1)[0] and ": " in line for line in lines), lines
    assert not want or lines == want


# --- finding 9: a usage spool directory that cannot be made -----------------------------------


def test_an_uncreatable_spool_dir_is_refused_naming_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = tmp_path / "config.yaml"
    path.write_text(one_model("127.0.0.1:1", usage=f"{{sink: kafka, spool_dir: '{blocker}/spool'}}"))
    problem = f"usage.spool_dir: cannot be used: {blocker} is not a directory"
    ran = sidecar_command("run", "--config", str(path))
    assert ran.returncode == 2 and problem in ran.stderr.splitlines(), ran.stderr
    checked = sidecar_command("check-config", str(path))
    assert (checked.returncode, checked.stdout.splitlines()) == (2, [problem])


# --- fuzzing through SIGHUP on a running sidecar ----------------------------------------------


SIZE = 16 << 10  # every file of the SIGHUP test: rewritten in place, the file watcher cannot tell


def test_nonsense_on_sighup_is_rejected_and_the_old_config_stays(launch: Launcher) -> None:
    a, b = launch.backend(), launch.backend()
    head = listeners()
    original = chat(head, [("a", a.address, 1), ("b", b.address, 0)])
    flipped = chat(head, [("a", a.address, 0), ("b", b.address, 1)])
    sidecar = launch.sidecar(padded(original, SIZE)[:SIZE])
    running = config_version(sidecar.config_path.read_text())
    models = head.count("\n") + 1  # the line of `models:`
    cases: list[tuple[bytes, list[str] | None]] = [
        (flipped.replace("timeout_ms: 5000", "timeout_ms: true").encode(),
         ["models.chat.timeout_ms: must be a number, not true or false"]),
        (flipped.replace("timeout_ms: 5000", "timeout_ms: 5000\n    timeout_ms: 6000").encode(),
         [f"models.chat.timeout_ms: duplicate key (first on line {models + 2}); remove one"]),
        (flipped.replace("weight: 1}", "weight: .inf}").encode(), ["models.chat.backends[1].weight: must be a finite number"]),
        (flipped.replace("timeout_ms: 5000", f"timeout_ms: {10**29}").encode(),
         ["models.chat.timeout_ms: must be <= 604800000"]),
        (flipped.encode().replace(b"name: b", b"name: \xff"),
         [f"(root): not UTF-8 text: byte 0xff at line {models + 5}, column 16; a config file must be UTF-8"]),
        (("x: " + "[" * 5000 + "]" * 5000 + "\n" + flipped).encode(),
         ["(root): invalid YAML at line 1, column 1003: exceeded maximum nesting depth"]),
        (alias_bomb(6).encode() + flipped.encode(), [f"x-lol.l5[0]: {NODES}; a config needs far fewer"]),
        (random.Random(1).randbytes(2048), None),
    ]
    for number, (hostile, problems) in enumerate(cases, start=1):
        rewrite_unseen(sidecar.config_path, hostile + b"\n#" + b"-" * (SIZE - len(hostile) - 2))
        sidecar.proc.signal(signal.SIGHUP)
        wait_until(lambda n=number: reloads(sidecar, "failure") == n, 30, what=f"rejection {number}",
                   proc=sidecar.proc)
        line = logged(sidecar, "config reload rejected")[-1]
        assert line["config_version"] == running
        assert line["problems"] == problems if problems is not None else line["problems"], line
        assert all(": " in problem and "\n" not in problem for problem in line["problems"])
    assert len(logged(sidecar, "config reload rejected")) == len(cases)
    assert routes(sidecar, {"a": a, "b": b}) == {"a": 10}
    assert readyz(sidecar)["components"]["config"]["version"] == running
    assert reloads(sidecar, "success") == 0 and not logged(sidecar, "config reload failed")


def rewrite_unseen(path: Path, data: bytes) -> None:
    """Rewrites the file in place, same size, its mtime put back: only SIGHUP reloads it."""
    before = path.stat()
    assert len(data) == before.st_size
    with path.open("r+b") as out:
        out.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
