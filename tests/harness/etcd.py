"""A real etcd, and sidecars that take their config from it, for tests: no mocks.

etcd is Debian's `etcd-server` (3.4; `scripts/system_tools.sh` installs it), one member on two
ephemeral loopback ports (client and peer), its data in the test's directory. `EtcdServer`
can be killed and restarted on the same ports with the same data, as an outage does.

`start_etcd_sidecar` runs `sidecar run --config BOOTSTRAP` with a bootstrap naming that etcd;
the config in etcd is shared by every sidecar, so what differs between them (their listeners)
comes from the environment (`listeners_env`): the shared config says
`listen: ${SC_LISTEN:-…}` (`SHARED_LISTENERS`).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.harness.procs import ManagedProcess, ProcessDiedError, free_port, wait_until
from tests.harness.sidecar import SIDECAR, SidecarProc, health_status

ETCD_READY_TIMEOUT = 20.0
START_ATTEMPTS = 3
KEY = "/sidecar/config"
# the listeners of a config every sidecar shares: each sidecar's own come from its environment
SHARED_LISTENERS = ("listen: ${SC_LISTEN:-127.0.0.1:50051}\n"
                    "admin_listen: ${SC_ADMIN_LISTEN:-127.0.0.1:50052}\n"
                    "ops_listen: ${SC_OPS_LISTEN:-127.0.0.1:9464}\n")


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if found is None:
        raise RuntimeError("no etcd binary: run `bash scripts/system_tools.sh` (Debian etcd-server)")
    return found


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throwaway CA, an etcd server certificate (127.0.0.1) and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> Certificates:
    """Made with the openssl command line, valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                            ("client", "extendedKeyUsage=clientAuth")):
        (directory / f"{name}.ext").write_text(extension + "\n")
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                        directory / "client.pem", directory / "client.key")


def _healthy(endpoint: str, tls: Certificates | None) -> bool:
    context = None
    if tls is not None:
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(tls.client_cert, tls.client_key)
    scheme = "https" if tls else "http"
    with urllib.request.urlopen(f"{scheme}://{endpoint}/health", timeout=1, context=context) as response:
        return bool(json.load(response).get("health") == "true")


def _launch(workdir: Path, port: int, peer_port: int, args: tuple[str, ...] = (),
            tls: Certificates | None = None) -> ManagedProcess:
    client, peer = f"http{'s' if tls else ''}://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    secure = [] if tls is None else ["--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key),
                                     "--trusted-ca-file", str(tls.ca), "--client-cert-auth"]
    argv = [etcd_binary(), "--name", "test", "--data-dir", str(workdir / "data"), "--logger", "zap",
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", *secure, *args]
    proc = ManagedProcess(argv, workdir / f"etcd-{port}.log", cwd=workdir)
    try:
        wait_until(lambda: _healthy(f"127.0.0.1:{port}", tls), ETCD_READY_TIMEOUT, what=f"etcd at {client}",
                   proc=proc, interval=0.05)
    except BaseException:
        proc.kill()
        raise
    return proc


@dataclass
class EtcdServer:
    """One etcd member owned by a test; `proc` is replaced by `restart`."""

    proc: ManagedProcess
    port: int
    peer_port: int
    workdir: Path
    args: tuple[str, ...] = ()
    tls: Certificates | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()

    def restart(self) -> None:
        """Kills it if it runs, and starts it again on the same ports with the same data."""
        self.proc.kill()
        self.proc = _launch(self.workdir, self.port, self.peer_port, self.args, self.tls)

    def stop(self) -> None:
        self.proc.stop()


def start_etcd(tmp_path: Path, *args: str, tls: Certificates | None = None) -> EtcdServer:
    """A fresh etcd on free ports (a lost bind race is retried on other ports); `args`: more
    etcd flags (e.g. `--auth-token-ttl 1`); `tls`: clients must use TLS and a client certificate."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        port, peer_port = free_port(), free_port()
        try:
            return EtcdServer(_launch(tmp_path, port, peer_port, args, tls), port, peer_port, tmp_path, args, tls)
        except ProcessDiedError:
            if attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


# --- the sidecar side ----------------------------------------------------------------------------


CACHE_FILE = "config-cache.json"  # relative: each sidecar runs in a directory of its own


def bootstrap(endpoint: str, key: str = KEY, extra: str = "") -> str:
    return (f"config_source:\n  kind: etcd\n  endpoints: [\"{endpoint}\"]\n  key: {key}\n"
            f"  cache_file: ./{CACHE_FILE}\n  timeout_ms: 1000\n{extra}")


def write_bootstrap(workdir: Path, endpoint: str, name: str = "bootstrap", extra: str = "") -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(bootstrap(endpoint, extra=extra))
    return path


@dataclass(frozen=True)
class Listeners:
    listen: str
    admin_listen: str
    ops_listen: str

    @classmethod
    def free(cls) -> Listeners:
        return cls(*(f"127.0.0.1:{free_port()}" for _ in range(3)))

    def env(self) -> dict[str, str]:
        return {"SC_LISTEN": self.listen, "SC_ADMIN_LISTEN": self.admin_listen, "SC_OPS_LISTEN": self.ops_listen}


def start_etcd_sidecar(workdir: Path, bootstrap_path: Path, listeners: Listeners, *,
                       wait: bool = True) -> SidecarProc:
    """`sidecar run --config BOOTSTRAP` in `workdir` with `listeners` in its environment;
    returns once readiness is SERVING (or at once with `wait=False`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **listeners.env()}
    proc = ManagedProcess([*SIDECAR, "run", "--config", str(bootstrap_path)],
                          workdir / f"sidecar-{listeners.listen.rpartition(':')[2]}.log", env=env, cwd=workdir)
    sidecar = SidecarProc(proc, bootstrap_path, listeners.listen, listeners.admin_listen, listeners.ops_listen)
    if wait:
        wait_until(lambda: health_status(sidecar.listen) == "SERVING", 30, what="sidecar readiness", proc=proc)
    return sidecar


def config_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`sidecar config ARGS…`, its output captured."""
    return subprocess.run([*SIDECAR, "config", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def push(config_path: Path, bootstrap_path: Path, *extra: str) -> int:
    """`sidecar config push`, which must succeed: the revision it wrote."""
    result = config_cli("push", str(config_path), "--config", str(bootstrap_path), *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("pushed "), result.stdout
    return int(result.stdout.split("revision ", 1)[1].split(",", 1)[0])


def put_raw(endpoint: str, value: bytes, key: str = KEY) -> int:
    """Writes `value` to the key directly, around the CLI's checks (as etcdctl would)."""
    from sidecar.config import ConfigSourceConfig
    from sidecar.etcd_kv import EtcdKV

    async def put() -> int:
        kv = EtcdKV(ConfigSourceConfig(kind="etcd", endpoints=[endpoint], key=key))
        try:
            return await kv.put(key, value)
        finally:
            await kv.aclose()

    return asyncio.run(put())
