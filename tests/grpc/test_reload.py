"""Config hot reload through the public interface: a real `sidecar run --config FILE`, its file
rewritten and SIGHUP sent, while callers keep calling."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest

from sidecar.app import config_version
from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.grpc.test_proxy import INFER_STREAM, params
from tests.grpc.test_routing import FAST_CHECKS, infer
from tests.harness.load import Load
from tests.harness.procs import free_port, wait_until
from tests.harness.sidecar import BackendProc, SidecarProc

RESTART = "cannot change while running; restart the sidecar"


def listeners() -> str:
    return "".join(f"{key}: 127.0.0.1:{free_port()}\n" for key in ("listen", "admin_listen", "ops_listen"))


def chat(head: str, backends: list[tuple[str, str, int]], extra: str = "") -> str:
    """A config with the listeners `head` and model `chat` over (name, address, weight)."""
    lines = "".join(f'\n      - {{name: {n}, address: "{address}", weight: {w}}}' for n, address, w in backends)
    return f"{head}models:\n  chat:\n    timeout_ms: 5000\n    backends:{lines}\n{FAST_CHECKS}{extra}"


def replace_file(path: Path, text: str) -> None:
    """As deploy tools do: write another file, rename it over the config."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def rewrite_unseen(path: Path, text: str) -> None:
    """Rewrites the file in place with the same size and puts its mtime back: the file watcher
    cannot tell, so only SIGHUP can apply it."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    with path.open("r+") as out:
        out.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def readyz(sidecar: SidecarProc) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{sidecar.ops_url}/readyz", timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = json.loads(error.read())
    return body


def reloads(sidecar: SidecarProc, result: str) -> float:
    return metric(sidecar, "api_router_config_reloads_total", {"result": result})


def logged(sidecar: SidecarProc, message: str) -> list[dict[str, Any]]:
    return [line for line in sidecar.log_json() if line.get("msg") == message]


def routes(sidecar: SidecarProc, backends: dict[str, BackendProc], calls: int = 10) -> Counter[str]:
    """Where `calls` sequential calls went, by the backends' call logs."""
    seen = Counter[str]()
    for i in range(calls):
        request_id = f"route-{time.monotonic_ns()}-{i}"
        assert infer(sidecar.listen, request_id=request_id) is None
        seen.update(n for n, b in backends.items() if b.call_for(request_id) is not None)
    return seen


def test_a_weight_change_under_load_drops_no_call(launch: Launcher) -> None:
    a, b = launch.backend(), launch.backend()
    head = listeners()
    original = chat(head, [("a", a.address, 1), ("b", b.address, 0)])
    flipped = chat(head, [("a", a.address, 0), ("b", b.address, 1)])
    sidecar = launch.sidecar(original)
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=2) as response:
        text = response.read().decode()
    assert all(f'api_router_config_reloads_total{{result="{r}"}} 0.0' in text
               for r in ("success", "failure", "unchanged"))  # the series exist before the first reload
    loads = [Load(sidecar.listen).start() for _ in range(4)]
    try:
        wait_until(lambda: len(a.calls()) > 20, 10, what="load on a")
        rewrite_unseen(sidecar.config_path, flipped)
        sidecar.proc.signal(signal.SIGHUP)
        wait_until(lambda: reloads(sidecar, "success") == 1, 5, what="reload by SIGHUP", proc=sidecar.proc)
        assert routes(sidecar, {"a": a, "b": b}) == {"b": 10}
        assert readyz(sidecar)["components"]["config"]["version"] == config_version(flipped)
        replace_file(sidecar.config_path, original)
        wait_until(lambda: reloads(sidecar, "success") == 2, 5, what="reload by file change", proc=sidecar.proc)
        assert routes(sidecar, {"a": a, "b": b}) == {"a": 10}
        assert readyz(sidecar)["components"]["config"]["version"] == config_version(original)
    finally:
        for load in loads:
            load.finish()
    outcomes = sum((load.total() for load in loads), Counter[str]())
    assert set(outcomes) == {"OK"} and outcomes["OK"] > 100, outcomes
    lines = logged(sidecar, "config reloaded")
    assert [(line["trigger"], line["backends_changed"]) for line in lines] == [
        ("signal", ["chat/a", "chat/b"]), ("file", ["chat/a", "chat/b"])]
    assert lines[0]["old_version"] == config_version(original) == lines[1]["new_version"]
    assert reloads(sidecar, "failure") == 0


def test_an_added_backend_is_checked_and_called_and_a_removed_one_finishes_its_stream(launch: Launcher) -> None:
    a, b = launch.backend(), launch.backend()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: its health checks fail
    head = listeners()
    sidecar = launch.sidecar(chat(head, [("a", a.address, 1)]))
    # 3 s: it outlives the moment a's channel starts to close (1 s after the reload)
    slow = InferRequest(model="chat", input="x", parameters=params(tokens=30, chunk_delay_ms=100))
    with grpc.insecure_channel(sidecar.listen) as channel:
        stream = channel.unary_stream(INFER_STREAM)(slow.SerializeToString(), timeout=10,
                                                    metadata=(("x-request-id", "slow-stream"),))
        chunks = [next(stream)]                          # running on a
        replace_file(sidecar.config_path, chat(head, [("b", b.address, 1), ("c", dead, 1)]))
        sidecar.proc.signal(signal.SIGHUP)               # at once, not at the next look at the file
        wait_until(lambda: reloads(sidecar, "success") == 1, 5, what="reload", proc=sidecar.proc)
        chunks += list(stream)                           # a is out of the config, its stream goes on
    assert len(chunks) == 30 and InferChunk.FromString(chunks[-1]).usage.output_tokens == 30
    assert (a.call_for("slow-stream") or {}).get("outcome") == "ok"
    wait_until(lambda: readyz(sidecar)["components"]["backends"]["models"]["chat"] == {
        "b": "healthy", "c": "unhealthy"}, 5, what="c checked and found down")
    calls_on_a = len(a.calls())
    assert routes(sidecar, {"a": a, "b": b}) == {"b": 10}
    assert len(a.calls()) == calls_on_a
    assert metric(sidecar, "api_router_backend_healthy", {"backend": "c"}) == 0
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=2) as response:
        assert 'api_router_backend_healthy{backend="a"' not in response.read().decode()
    wait_until(lambda: any(line.get("address") == a.address for line in logged(sidecar, "backend channel closed")),
               5, what="a's channel closed after its stream")
    [reloaded] = logged(sidecar, "config reloaded")
    assert (reloaded["backends_added"], reloaded["backends_removed"]) == (["chat/b", "chat/c"], ["chat/a"])


def test_an_invalid_config_is_rejected_and_the_old_one_keeps_serving(launch: Launcher) -> None:
    a, b = launch.backend(), launch.backend()
    head = listeners()
    original = chat(head, [("a", a.address, 1), ("b", b.address, 0)])
    sidecar = launch.sidecar(original)
    version = config_version(original)

    def rejected(count: int, problems: list[str]) -> None:
        wait_until(lambda: reloads(sidecar, "failure") == count, 5, what=f"rejection {count}", proc=sidecar.proc)
        line = logged(sidecar, "config reload rejected")[-1]
        assert (line["level"], line["problems"], line["path"]) == ("error", problems, str(sidecar.config_path))
        assert routes(sidecar, {"a": a, "b": b}) == {"a": 10}  # as the old config says
        assert readyz(sidecar)["components"]["config"]["version"] == version

    replace_file(sidecar.config_path, chat(head, [("a", a.address, -1), ("b", b.address, 1)]))
    rejected(1, ["models.chat.backends[0].weight: must be >= 0"])
    # valid, but a listener and the usage topic need a restart: none of it applies, the weights neither
    moved = head.replace(head.split("\n")[0], f"listen: 127.0.0.1:{free_port()}")
    replace_file(sidecar.config_path, chat(moved, [("a", a.address, 0), ("b", b.address, 1)],
                                           extra="usage: {kafka: {topic: elsewhere}}\n"))
    rejected(2, [f"listen: {RESTART}", f"usage.kafka.topic: {RESTART}"])
    sidecar.proc.signal(signal.SIGHUP)                   # SIGHUP validates the file again
    rejected(3, [f"listen: {RESTART}", f"usage.kafka.topic: {RESTART}"])
    replace_file(sidecar.config_path, original)          # back to what runs: nothing to do
    sidecar.proc.signal(signal.SIGHUP)
    wait_until(lambda: reloads(sidecar, "unchanged") == 1, 5, what="unchanged", proc=sidecar.proc)
    assert reloads(sidecar, "success") == 0 and reloads(sidecar, "failure") == 3


def test_a_burst_of_sighups_applies_a_change_once(launch: Launcher) -> None:
    """Reloads run one at a time, off the event loop: SIGHUPs during one make one more, which
    finds the file unchanged; the change is applied once and calls see one config or the other."""
    a, b = launch.backend(), launch.backend()
    head = listeners()
    original = chat(head, [("a", a.address, 1), ("b", b.address, 0)])
    flipped = chat(head, [("a", a.address, 0), ("b", b.address, 1)])
    sidecar = launch.sidecar(original)
    rewrite_unseen(sidecar.config_path, flipped)
    for _ in range(5):
        sidecar.proc.signal(signal.SIGHUP)
    wait_until(lambda: reloads(sidecar, "success") == 1, 10, what="the reload", proc=sidecar.proc)
    assert routes(sidecar, {"a": a, "b": b}) == {"b": 10}
    assert reloads(sidecar, "success") == 1 and reloads(sidecar, "failure") == 0
    assert reloads(sidecar, "unchanged") <= 4 and len(logged(sidecar, "config reloaded")) == 1
