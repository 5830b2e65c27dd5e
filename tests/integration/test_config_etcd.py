"""etcd as the config source, against a real etcd (Debian's etcd-server) and real `sidecar run`
processes: push, watch, refusals (by the CLI and by the sidecar), outages, the start from the
cache, get and history. The fleet of three: tests/chaos/test_fleet.py."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config_cache import read_cache
from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.grpc.test_reload import routes
from tests.harness.etcd import (
    CACHE_FILE,
    KEY,
    SHARED_LISTENERS,
    EtcdServer,
    Listeners,
    config_cli,
    make_certificates,
    put_raw,
    start_etcd,
    start_etcd_sidecar,
    write_bootstrap,
)
from tests.harness.procs import free_port, wait_until
from tests.harness.sidecar import SIDECAR, BackendProc, SidecarProc

RESTART = "cannot change while running; restart the sidecar"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = start_etcd(tmp_path / "etcd")
    try:
        yield server
    finally:
        server.stop()


class Fleet:
    """Sidecars of one test, each in a directory of its own (its cache, its state), stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sidecars: list[SidecarProc] = []

    def start(self, bootstrap: Path, name: str = "", wait: bool = True) -> SidecarProc:
        sidecar = start_etcd_sidecar(self.workdir / (name or f"sidecar-{len(self.sidecars)}"), bootstrap,
                                     Listeners.free(), wait=wait)
        self.sidecars.append(sidecar)
        return sidecar

    def stop_all(self) -> None:
        for sidecar in self.sidecars:
            sidecar.proc.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    sidecars = Fleet(tmp_path)
    try:
        yield sidecars
    finally:
        sidecars.stop_all()


def shared_config(weights: dict[str, tuple[BackendProc, float]], extra: str = "") -> str:
    """The config every sidecar shares: model `chat` over `weights` (name -> backend, weight)."""
    lines = "".join(f'\n      - {{name: {n}, address: "{b.address}", weight: {w}}}' for n, (b, w) in weights.items())
    return (f"{SHARED_LISTENERS}health_checks: {{enabled: false}}\n{extra}"
            f"models:\n  chat:\n    timeout_ms: 5000\n    backends:{lines}\n")


def push_text(tmp_path: Path, bootstrap: Path, text: str, *extra: str) -> tuple[int, str]:
    """`sidecar config push` of `text`, which must succeed: (revision, config version)."""
    path = tmp_path / f"push-{time.monotonic_ns()}.yaml"
    path.write_text(text)
    result = config_cli("push", str(path), "--config", str(bootstrap), *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    revision = int(result.stdout.split("revision ", 1)[1].split(",", 1)[0])
    version = result.stdout.split("config version ", 1)[1].split(",", 1)[0]
    return revision, version


def source(sidecar: SidecarProc) -> dict[str, Any]:
    component: dict[str, Any] = sidecar.readyz()[1]["components"]["config_source"]
    return component


def version(sidecar: SidecarProc) -> str:
    running: str = sidecar.readyz()[1]["components"]["config"]["version"]
    return running


def logged(sidecar: SidecarProc, message: str) -> list[dict[str, Any]]:
    return [line for line in sidecar.log_json() if line.get("msg") == message]


def run_sidecar(bootstrap: Path, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`sidecar run` expected to exit by itself."""
    return subprocess.run([*SIDECAR, "run", "--config", str(bootstrap)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, check=False)


# --- push, watch, live -----------------------------------------------------------------------------


def test_a_pushed_config_goes_live_on_a_running_sidecar(etcd: EtcdServer, launch: Launcher, fleet: Fleet,
                                                        tmp_path: Path) -> None:
    a, b = launch.backend(), launch.backend()
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint)
    first, _ = push_text(tmp_path, bootstrap, shared_config({"a": (a, 1), "b": (b, 0)}))
    sidecar = fleet.start(bootstrap)
    assert routes(sidecar, {"a": a, "b": b}) == {"a": 10}
    assert source(sidecar) == {"status": "ok", "kind": "etcd", "key": KEY, "etcd": "up", "origin": "etcd",
                               "revision": first, "last_error": None}

    started = time.monotonic()
    second, pushed_version = push_text(tmp_path, bootstrap, shared_config({"a": (a, 0), "b": (b, 1)}))
    pushed = time.monotonic()
    wait_until(lambda: version(sidecar) == pushed_version, 5, what="the pushed config live", interval=0.01)
    live = time.monotonic()
    print(f"\npush -> live on one sidecar: {live - pushed:.3f} s after `sidecar config push` returned "
          f"({live - started:.3f} s from its start)")
    assert live - pushed < 2.0
    assert routes(sidecar, {"a": a, "b": b}) == {"b": 10}  # the behaviour changed, not only a version

    assert source(sidecar)["revision"] == second and source(sidecar)["status"] == "ok"
    assert metric(sidecar, "api_router_config_source_revision", {}) == second
    assert metric(sidecar, "api_router_config_source_up", {}) == 1
    assert metric(sidecar, "api_router_config_reloads_total", {"result": "success"}) == 1
    (reloaded,) = logged(sidecar, "config reloaded")
    assert reloaded["trigger"] == "etcd" and reloaded["backends_changed"] == ["chat/a", "chat/b"]
    cached = read_cache(sidecar.proc.log_path.parent / CACHE_FILE)
    assert cached is not None and cached.revision == second and cached.key == KEY
    with urllib.request.urlopen(f"{sidecar.ops_url}/healthz", timeout=5) as response:
        assert json.load(response)["config_source"]["revision"] == second


def test_push_refuses_an_invalid_config_with_key_paths_and_writes_nothing(etcd: EtcdServer, backend: BackendProc,
                                                                         tmp_path: Path) -> None:
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint)
    valid = shared_config({"a": (backend, 1)})
    revision, _ = push_text(tmp_path, bootstrap, valid)

    def refused(text: str, *extra: str) -> list[str]:
        path = tmp_path / "refused.yaml"
        path.write_text(text)
        result = config_cli("push", str(path), "--config", str(bootstrap), *extra)
        assert result.returncode == 2, result.stdout + result.stderr
        return result.stderr.splitlines()

    assert refused(valid.replace("weight: 1", "weight: -1").replace("timeout_ms: 5000", "timeout_ms: 5000\n"
                                                                    "    timeuot_ms: 1")) == [
        "models.chat.backends[0].weight: must be >= 0", "models.chat.timeuot_ms: unknown key"]
    assert refused("config_source: {kind: file}\n" + valid) == [
        ("config_source: not in a config kept in etcd: it belongs in each sidecar's bootstrap file "
        "(`sidecar run --config`)")]
    assert refused("max_message_bytes: 1048576\n" + valid) == [
        f"max_message_bytes: {RESTART}",
        "(root): running sidecars refuse these; to publish anyway: --allow-restart, then restart them"]
    same = tmp_path / "same.yaml"
    same.write_text(valid)
    result = config_cli("push", str(same), "--config", str(bootstrap))
    assert result.returncode == 0 and result.stdout.strip() == (
        f"unchanged: {KEY} revision {revision} holds this config already")
    result = config_cli("get", "--config", str(bootstrap), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["revision"] == revision  # nothing was written


def test_an_invalid_value_written_around_the_cli_is_refused_and_counted(etcd: EtcdServer, launch: Launcher,
                                                                       fleet: Fleet, tmp_path: Path) -> None:
    a, b = launch.backend(), launch.backend()
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint)
    good, good_version = push_text(tmp_path, bootstrap, shared_config({"a": (a, 1), "b": (b, 0)}))
    sidecar = fleet.start(bootstrap)

    bad = put_raw(etcd.endpoint, shared_config({"a": (a, 0), "b": (b, -1)}).encode())
    wait_until(lambda: metric(sidecar, "api_router_config_reloads_total", {"result": "failure"}) == 1, 5,
               what="the refusal counted")
    (rejected,) = logged(sidecar, "config reload rejected")
    assert rejected["trigger"] == "etcd" and rejected["path"] == f"etcd {KEY} revision {bad}"
    assert rejected["problems"] == ["models.chat.backends[1].weight: must be >= 0"]
    component = source(sidecar)
    assert component["status"] == "degraded" and component["revision"] == good
    assert component["refused"] == {"revision": bad, "problems": ["models.chat.backends[1].weight: must be >= 0"]}
    assert component["last_error"] == f"revision {bad} refused: models.chat.backends[1].weight: must be >= 0"
    assert version(sidecar) == good_version and sidecar.readyz()[0] == 200
    assert routes(sidecar, {"a": a, "b": b}) == {"a": 10}  # the old config still routes

    put_raw(etcd.endpoint, b"\xff\xfe not utf-8")  # not even text: refused the same way
    wait_until(lambda: metric(sidecar, "api_router_config_reloads_total", {"result": "failure"}) == 2, 5,
               what="the second refusal counted")
    put_raw(etcd.endpoint, b"models: {chat: {backends: []}}\n" + b"#" * (1024 * 1024))  # bigger than a config
    wait_until(lambda: metric(sidecar, "api_router_config_reloads_total", {"result": "failure"}) == 3, 5,
               what="the third refusal counted")
    problems = [line["problems"] for line in logged(sidecar, "config reload rejected")]
    assert problems[1][0].startswith("(root): not UTF-8 text")
    assert problems[2] == [(f"etcd {KEY} revision {bad + 2}: larger than 1048576 bytes (1 MiB), the most a config "
                           "file may be")]

    fixed, fixed_version = push_text(tmp_path, bootstrap, shared_config({"a": (a, 0), "b": (b, 1)}))
    wait_until(lambda: version(sidecar) == fixed_version, 5, what="the fixed config live")
    assert source(sidecar) == {"status": "ok", "kind": "etcd", "key": KEY, "etcd": "up", "origin": "etcd",
                               "revision": fixed, "last_error": None}
    assert routes(sidecar, {"a": a, "b": b}) == {"b": 10}


def test_a_restart_only_change_is_refused_until_the_sidecar_restarts(etcd: EtcdServer, backend: BackendProc,
                                                                     fleet: Fleet, tmp_path: Path) -> None:
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint)
    push_text(tmp_path, bootstrap, shared_config({"a": (backend, 1)}))
    sidecar = fleet.start(bootstrap, name="restarted")
    old_version = version(sidecar)
    revision, new_version = push_text(tmp_path, bootstrap, "max_message_bytes: 1048576\n" +
                                      shared_config({"a": (backend, 1)}), "--allow-restart")
    wait_until(lambda: logged(sidecar, "config reload rejected"), 5, what="the refusal")
    assert logged(sidecar, "config reload rejected")[0]["problems"] == [f"max_message_bytes: {RESTART}"]
    assert version(sidecar) == old_version and source(sidecar)["refused"]["revision"] == revision
    sidecar.proc.signal(signal.SIGHUP)  # reads the key again, and validates a refused value anew
    wait_until(lambda: len(logged(sidecar, "config reload rejected")) == 2, 5, what="SIGHUP's refusal")
    assert metric(sidecar, "api_router_config_reloads_total", {"result": "failure"}) == 2
    sidecar.proc.stop()
    again = start_etcd_sidecar(sidecar.proc.log_path.parent, bootstrap, Listeners.free())
    fleet.sidecars.append(again)
    assert version(again) == new_version and source(again)["status"] == "ok"


# --- etcd down, the cache ---------------------------------------------------------------------------


def test_etcd_down_keeps_serving_and_a_push_after_it_returns_applies(etcd: EtcdServer, launch: Launcher,
                                                                    fleet: Fleet, tmp_path: Path) -> None:
    a, b = launch.backend(), launch.backend()
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint)
    first, _ = push_text(tmp_path, bootstrap, shared_config({"a": (a, 1), "b": (b, 0)}))
    sidecar = fleet.start(bootstrap)
    etcd.kill()
    wait_until(lambda: source(sidecar)["etcd"] == "down", 5, what="the source down")
    component = source(sidecar)
    assert component["status"] == "degraded" and component["revision"] == first
    assert etcd.endpoint in component["last_error"]
    assert sidecar.readyz()[0] == 200  # still ready: it serves the config it has
    assert metric(sidecar, "api_router_config_source_up", {}) == 0
    assert routes(sidecar, {"a": a, "b": b}) == {"a": 10}
    time.sleep(3)  # a few failed reconnects: the backoff grows
    assert routes(sidecar, {"a": a, "b": b}) == {"a": 10}

    etcd.restart()
    second, second_version = push_text(tmp_path, bootstrap, shared_config({"a": (a, 0), "b": (b, 1)}))
    wait_until(lambda: version(sidecar) == second_version, 10, what="the push after the outage live")
    assert source(sidecar)["status"] == "ok" and source(sidecar)["revision"] == second
    assert routes(sidecar, {"a": a, "b": b}) == {"b": 10}
    assert logged(sidecar, "config source: etcd reachable again")


def test_a_sidecar_started_while_etcd_is_down_starts_from_its_cache(etcd: EtcdServer, launch: Launcher,
                                                                   fleet: Fleet, tmp_path: Path) -> None:
    a, b = launch.backend(), launch.backend()
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint)
    push_text(tmp_path, bootstrap, shared_config({"a": (a, 1), "b": (b, 0)}))
    second, second_version = push_text(tmp_path, bootstrap, shared_config({"a": (a, 0), "b": (b, 1)}))
    first_run = fleet.start(bootstrap, name="cached")
    first_run.proc.stop()
    etcd.kill()

    started = time.monotonic()
    sidecar = fleet.start(bootstrap, name="cached")  # the same directory: the same cache file
    print(f"\nstart from the cache while etcd is down: ready in {time.monotonic() - started:.2f} s")
    assert version(sidecar) == second_version
    assert routes(sidecar, {"a": a, "b": b}) == {"b": 10}
    component = source(sidecar)
    assert (component["status"], component["etcd"], component["origin"], component["revision"]) == (
        "degraded", "down", "cache", second)
    (line,) = logged(sidecar, "config from the cache")
    assert line["revision"] == second and line["reason"].startswith("etcd cannot be read")

    etcd.restart()
    wait_until(lambda: source(sidecar)["status"] == "ok", 10, what="the source ok again")
    assert source(sidecar)["origin"] == "etcd" and source(sidecar)["revision"] == second


def test_no_etcd_and_no_cache_exits_2_saying_why(etcd: EtcdServer, backend: BackendProc, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    bootstrap = write_bootstrap(tmp_path, dead, name="dead")
    result = run_sidecar(bootstrap, tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"config_source: no config to start from: etcd cannot be read (read at {dead}: "
                           "UNAVAILABLE")
    assert line.endswith(f"and there is no cache file ./{CACHE_FILE}; it starts once etcd can be read")

    absent = write_bootstrap(tmp_path, etcd.endpoint, name="absent")
    result = run_sidecar(absent, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"config_source: no config to start from: etcd key {KEY} does not exist, and there is no cache file "
        f"./{CACHE_FILE}; push a config first: sidecar config push FILE --config BOOTSTRAP")

    bad = put_raw(etcd.endpoint, shared_config({"a": (backend, -1)}).encode())
    result = run_sidecar(absent, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-2:] == [
        (f"config_source: no config to start from: revision {bad} of etcd key {KEY} is refused, and there is no "
        f"cache file ./{CACHE_FILE}"), "models.chat.backends[0].weight: must be >= 0"]


# --- get, history -----------------------------------------------------------------------------------


def test_get_and_history_show_what_is_live_and_what_was(etcd: EtcdServer, backend: BackendProc,
                                                        tmp_path: Path) -> None:
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint)
    texts = [shared_config({"a": (backend, w)}) for w in (1, 2, 3)]
    pushed = [push_text(tmp_path, bootstrap, text) for text in texts]
    (r1, _), (r2, _), (r3, v3) = pushed

    result = config_cli("get", "--config", str(bootstrap))
    assert result.returncode == 0
    assert result.stdout.startswith("# sidecar config push: ") and result.stdout.endswith(texts[2])
    assert result.stderr.startswith(f"# {KEY}: revision {r3}, config version {v3}, ")
    old = config_cli("get", "--config", str(bootstrap), "--revision", str(r1), "--json")
    body = json.loads(old.stdout)
    assert body["revision"] == r1 and body["text"].endswith(texts[0]) and body["valid"] is True

    history = config_cli("history", "--config", str(bootstrap))
    lines = history.stdout.splitlines()
    assert lines[0].split() == ["REVISION", "CONFIG", "VERSION", "BYTES", "VALID", "PUSHED"]
    assert [int(line.split()[0]) for line in lines[1:4]] == [r3, r2, r1]
    assert [line.split()[1] for line in lines[1:4]] == [v for _, v in reversed(pushed)]
    assert all(line.split()[3] == "yes" and line.endswith(".yaml") for line in lines[1:4])
    assert lines[4] == f"(the key was created at revision {r1})"
    entries = [json.loads(line) for line in config_cli("history", "--config", str(bootstrap), "--json",
                                                       "--limit", "2").stdout.splitlines()]
    assert [e["revision"] for e in entries] == [r3, r2]

    rolled = config_cli("rollback", str(r1), "--config", str(bootstrap))
    assert rolled.returncode == 0, rolled.stderr
    r4 = int(rolled.stdout.split("revision ", 1)[1].split(",", 1)[0])
    now = json.loads(config_cli("get", "--config", str(bootstrap), "--json").stdout)
    assert now["revision"] == r4 and now["text"].endswith(texts[0])
    assert now["pushed"].endswith(f" rollback-to-revision-{r1}")
    wrong = config_cli("rollback", "1", "--config", str(bootstrap))  # etcd's first revision: before any push
    assert wrong.returncode == 1 and "revision 1 did not write etcd key" in wrong.stderr

    compact(etcd.endpoint, r2)
    lines = config_cli("history", "--config", str(bootstrap)).stdout.splitlines()
    assert [int(line.split()[0]) for line in lines[1:4]] == [r4, r3, r2]
    assert lines[4] == f"(revisions before {r2} were compacted by etcd)"
    gone = config_cli("get", "--config", str(bootstrap), "--revision", str(r1))
    assert gone.returncode == 1 and gone.stderr.strip() == f"sidecar config: revision {r1} was compacted by etcd"


def compact(endpoint: str, revision: int) -> None:
    from etcd3aio import Etcd3Client

    async def run() -> None:
        async with Etcd3Client([endpoint]) as client:
            assert client.kv is not None
            await client.kv.compact(revision, physical=True, timeout=5)

    asyncio.run(run())


def test_a_dead_endpoint_is_passed_over_for_the_next(etcd: EtcdServer, backend: BackendProc, fleet: Fleet,
                                                     tmp_path: Path) -> None:
    bootstrap = tmp_path / "two.yaml"
    bootstrap.write_text(write_bootstrap(tmp_path, etcd.endpoint).read_text().replace(
        f'["{etcd.endpoint}"]', f'["127.0.0.1:{free_port()}", "{etcd.endpoint}"]'))
    revision, pushed_version = push_text(tmp_path, bootstrap, shared_config({"a": (backend, 1)}))
    sidecar = fleet.start(bootstrap)
    assert version(sidecar) == pushed_version
    assert source(sidecar) == {"status": "ok", "kind": "etcd", "key": KEY, "etcd": "up", "origin": "etcd",
                               "revision": revision, "last_error": None}


def test_the_cli_exits_1_when_etcd_is_unreachable(tmp_path: Path) -> None:
    bootstrap = write_bootstrap(tmp_path, f"127.0.0.1:{free_port()}")
    result = config_cli("get", "--config", str(bootstrap))
    assert result.returncode == 1 and result.stderr.startswith("sidecar config: etcd: read at 127.0.0.1:")


# --- credentials ----------------------------------------------------------------------------------


def enable_auth(endpoint: str, password: str) -> None:
    """etcd's own procedure: a root user with the root role, then auth on."""
    from etcd3aio import Etcd3Client

    async def run() -> None:
        async with Etcd3Client([endpoint]) as client:
            assert client.auth is not None
            await client.auth.role_add("root", timeout=5)
            await client.auth.user_add("root", password, timeout=5)
            await client.auth.user_grant_role("root", "root", timeout=5)
            await client.auth.auth_enable(timeout=5)

    asyncio.run(run())


def test_username_and_password_from_the_environment(etcd: EtcdServer, backend: BackendProc, fleet: Fleet,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enable_auth(etcd.endpoint, "s3cret-etcd")
    credentials = "  username: root\n  password: ${SC_ETCD_PASSWORD}\n"
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint, extra=credentials)
    monkeypatch.setenv("SC_ETCD_PASSWORD", "s3cret-etcd")  # the CLI's and the sidecars' environment
    revision, pushed_version = push_text(tmp_path, bootstrap, shared_config({"a": (backend, 1)}))
    sidecar = fleet.start(bootstrap)
    assert version(sidecar) == pushed_version and source(sidecar)["revision"] == revision
    _second, second_version = push_text(tmp_path, bootstrap, shared_config({"a": (backend, 2)}))
    wait_until(lambda: version(sidecar) == second_version, 5, what="the second push live")
    assert "s3cret-etcd" not in sidecar.proc.log_text()

    monkeypatch.setenv("SC_ETCD_PASSWORD", "wrong")
    result = config_cli("get", "--config", str(bootstrap))
    assert result.returncode == 1 and "authentication failed" in result.stderr


def test_an_expired_auth_token_is_renewed(tmp_path: Path) -> None:
    from sidecar.config import ConfigSourceConfig
    from sidecar.etcd_kv import EtcdKV

    server = start_etcd(tmp_path / "etcd", "--auth-token-ttl", "1")
    try:
        enable_auth(server.endpoint, "pw")
        settings = ConfigSourceConfig(kind="etcd", endpoints=[server.endpoint], username="root", password="pw")

        async def run() -> None:
            kv = EtcdKV(settings)
            try:
                revision = await kv.put(KEY, b"models: {}\n")
                await asyncio.sleep(2.5)  # the token expires
                value, _ = await kv.get(KEY)
                assert value is not None and value.mod_revision == revision
            finally:
                await kv.aclose()

        asyncio.run(run())
    finally:
        server.stop()


def test_tls_with_a_client_certificate(backend: BackendProc, fleet: Fleet, tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path / "pki")
    server = start_etcd(tmp_path / "etcd", tls=certificates)
    try:
        tls = (f"  tls: {{ca_file: {certificates.ca}, cert_file: {certificates.client_cert}, "
               f"key_file: {certificates.client_key}}}\n")
        bootstrap = write_bootstrap(tmp_path, server.endpoint, extra=tls)
        revision, pushed_version = push_text(tmp_path, bootstrap, shared_config({"a": (backend, 1)}))
        sidecar = fleet.start(bootstrap)
        assert version(sidecar) == pushed_version and source(sidecar)["revision"] == revision
        second, second_version = push_text(tmp_path, bootstrap, shared_config({"a": (backend, 2)}))
        wait_until(lambda: version(sidecar) == second_version, 5, what="the second push live over TLS")

        plain = write_bootstrap(tmp_path, server.endpoint, name="plain")  # no TLS: etcd does not answer
        result = config_cli("get", "--config", str(plain))
        assert result.returncode == 1 and result.stderr.startswith("sidecar config: etcd: read at ")
        no_client_cert = write_bootstrap(tmp_path, server.endpoint, name="no-cert",
                                         extra=f"  tls: {{ca_file: {certificates.ca}}}\n")
        assert config_cli("get", "--config", str(no_client_cert)).returncode == 1
        assert second > revision
    finally:
        server.stop()
