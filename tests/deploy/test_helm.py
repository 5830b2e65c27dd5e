"""The Helm chart (deploy/helm/inference-sidecar), with the real helm (scripts/k8s_tools.sh).

The checks every render of the pod must pass (schemas, native sidecar, probes, security context,
volumes, Secrets, config validated by `sidecar check-config`, ServiceMonitor, rules) run on the
chart's default, staging and production values in test_kubernetes.py. Here: `helm lint --strict`,
that the chart and the Kustomize overlays render the same pod for each environment, that the
chart's rules and dashboard are the repository's files, the chart's own values (ingress, an
existing ConfigMap, in-place reload, the listener checks) and that its values reference is current.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    ALERTS,
    CHART,
    DASHBOARD,
    ROOT,
    configmap,
    container_env,
    helm,
    helm_template,
    k8s_tool,
    only,
    pod_spec,
    rendered,
    run,
    sidecar_config_text,
    sidecar_container,
    venv_tool,
)

ENVIRONMENTS = ["base", "staging", "production"]
VALUES = {"base": (), "staging": ("-f", str(CHART / "values-staging.yaml")),
          "production": ("-f", str(CHART / "values-production.yaml"))}


def docs_of(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(docs)["containers"] if c["name"] == name]
    return found


def mounts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A container's volume mounts in path order (kustomize's patches put theirs first)."""
    return sorted(spec.get("volumeMounts", []), key=lambda m: str(m["mountPath"]))


def env_sources(spec: dict[str, Any]) -> list[tuple[str, Any]]:
    """A container's env as (name, value or the Secret key it is read from)."""
    return [(var["name"], var.get("value", var.get("valueFrom"))) for var in spec.get("env", [])]


# --- helm lint ----------------------------------------------------------------------------------


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_helm_lint_strict(environment: str) -> None:
    result = helm("lint", "--strict", str(CHART), *VALUES[environment])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_helm_3_lints_and_renders_the_same(environment: str) -> None:
    """Most clusters are still driven by Helm 3: 3.17 lints the chart and renders the very same
    documents as Helm 4."""
    helm3 = k8s_tool("helm3")
    result = run([helm3, "lint", "--strict", str(CHART), *VALUES[environment]])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout and "[WARNING]" not in result.stdout, result.stdout
    result = run([helm3, "template", "chat-app", str(CHART), "--namespace", "chat", *VALUES[environment]])
    assert result.returncode == 0, result.stderr
    assert docs_of(result.stdout) == docs_of(helm_template("--namespace", "chat", *VALUES[environment]))


def test_chart_needs_native_sidecars() -> None:
    """kubeVersion >= 1.29: before that an init container with restartPolicy Always is refused."""
    result = helm("template", "chat-app", str(CHART), "--kube-version", "1.28.9")
    assert result.returncode != 0 and "kubeVersion" in result.stderr, result.stderr
    helm_template("--kube-version", "1.29.0")


# --- the chart and the Kustomize overlays agree ---------------------------------------------------


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_chart_and_kustomize_render_the_same_pod(environment: str) -> None:
    """What the pod runs must not drift between the two ways of deploying it: the containers'
    images, args, ports, probes, resources, security, mounts and environment; the sidecar's config
    file and ${ENV} values; the pod's settings and volumes; the replica count, autoscaler, budget,
    certificate and monitoring. Only names of generated objects and labels may differ."""
    kustomized, charted = rendered(environment), rendered(f"helm-{environment}")

    k_sidecar, h_sidecar = sidecar_container(kustomized), sidecar_container(charted)
    for key in ("image", "imagePullPolicy", "restartPolicy", "args", "ports", "startupProbe", "livenessProbe",
                "readinessProbe", "resources", "securityContext"):
        assert k_sidecar.get(key) == h_sidecar.get(key), f"sidecar {key}"
    assert mounts(k_sidecar) == mounts(h_sidecar)
    assert env_sources(k_sidecar) == env_sources(h_sidecar)
    # the config file, key for key, and the values of its ${NAME} references
    k_path, k_text = sidecar_config_text(kustomized)
    h_path, h_text = sidecar_config_text(charted)
    assert k_path == h_path
    assert yaml.safe_load(k_text) == yaml.safe_load(h_text), "the sidecar's config"
    assert (configmap(kustomized, "chat-app-sidecar-env")["data"]
            == configmap(charted, "chat-app-sidecar-env")["data"]), "the config's ${NAME} values"
    if environment != "staging":  # staging's Kustomize overlay ships example Secrets; the chart none
        # (helm template leaves the namespace to `helm install -n`: POD_NAMESPACE is the cluster's)
        k_env, h_env = container_env(kustomized, k_sidecar), container_env(charted, h_sidecar)
        assert k_env.pop("POD_NAMESPACE") and h_env.pop("POD_NAMESPACE")
        assert k_env == h_env

    k_app, h_app = container(kustomized, "app"), container(charted, "app")
    for key in ("image", "imagePullPolicy", "ports", "resources", "securityContext"):
        assert k_app.get(key) == h_app.get(key), f"app {key}"
    assert env_sources(k_app) == env_sources(h_app)

    k_pod, h_pod = pod_spec(kustomized), pod_spec(charted)
    for key in ("terminationGracePeriodSeconds", "automountServiceAccountToken", "enableServiceLinks",
                "securityContext"):
        assert k_pod.get(key) == h_pod.get(key), f"pod {key}"
    pod_labels = only(charted, "Deployment")["spec"]["template"]["metadata"]["labels"]
    k_spread = k_pod.get("topologySpreadConstraints", [])
    h_spread = h_pod.get("topologySpreadConstraints", [])
    assert [{k: v for k, v in c.items() if k != "labelSelector"} for c in k_spread] == [
        {k: v for k, v in c.items() if k != "labelSelector"} for c in h_spread]
    assert all(c["labelSelector"]["matchLabels"].items() <= pod_labels.items() for c in h_spread)

    def volumes(spec: dict[str, Any]) -> dict[str, Any]:
        # a ConfigMap volume by what it holds (kustomize's name carries a hash)
        return {v["name"]: ("configMap" if "configMap" in v else {k: x for k, x in v.items() if k != "name"})
                for v in spec["volumes"]}
    assert volumes(k_pod) == volumes(h_pod)

    k_deploy, h_deploy = only(kustomized, "Deployment")["spec"], only(charted, "Deployment")["spec"]
    assert k_deploy["strategy"] == h_deploy["strategy"]
    assert k_deploy.get("revisionHistoryLimit") == h_deploy.get("revisionHistoryLimit")
    kinds = {d["kind"] for d in kustomized} - {"Secret"}
    assert kinds == {d["kind"] for d in charted}, "the same kinds of objects (the chart ships no Secret)"
    if "HorizontalPodAutoscaler" in kinds:
        k_hpa, h_hpa = only(kustomized, "HorizontalPodAutoscaler")["spec"], only(charted, "HorizontalPodAutoscaler")["spec"]
        assert k_hpa == h_hpa
        assert k_deploy["replicas"] == h_hpa["minReplicas"] and "replicas" not in h_deploy
    else:
        assert k_deploy["replicas"] == h_deploy["replicas"]
    if "PodDisruptionBudget" in kinds:
        k_pdb, h_pdb = only(kustomized, "PodDisruptionBudget")["spec"], only(charted, "PodDisruptionBudget")["spec"]
        assert k_pdb["maxUnavailable"] == h_pdb["maxUnavailable"]
        assert h_pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    if "Certificate" in kinds:
        k_cert, h_cert = only(kustomized, "Certificate")["spec"], only(charted, "Certificate")["spec"]
        assert {k: v for k, v in k_cert.items() if k != "secretTemplate"} == {
            k: v for k, v in h_cert.items() if k != "secretTemplate"}
    assert (only(kustomized, "ServiceMonitor")["spec"]["endpoints"]
            == only(charted, "ServiceMonitor")["spec"]["endpoints"])
    assert (only(kustomized, "PrometheusRule")["spec"] == only(charted, "PrometheusRule")["spec"]
            == {"groups": yaml.safe_load(ALERTS.read_text())["groups"]})


# --- one source for the rules and the dashboard -----------------------------------------------------


def test_rules_and_dashboard_are_the_repositorys_files() -> None:
    """No second copy: the chart's files are links to deploy/prometheus/alerts.yaml and
    deploy/grafana/sidecar.json, and what it renders is exactly their content."""
    for link, source in ((CHART / "files" / "alerts.yaml", ALERTS),
                         (CHART / "files" / "sidecar-dashboard.json", DASHBOARD)):
        assert link.is_symlink() and link.resolve() == source.resolve(), f"{link} is not a link to {source}"
    docs = rendered("helm-base")
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["inference-sidecar.json"]) == json.loads(DASHBOARD.read_text())


def test_the_packaged_chart_carries_the_rules_and_dashboard(tmp_path: Path) -> None:
    """`helm package` resolves the links: the .tgz a registry gets renders the same rules."""
    result = helm("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (package,) = tmp_path.glob("inference-sidecar-*.tgz")
    result = helm("template", "chat-app", str(package), "-f", str(CHART / "values-production.yaml"))
    assert result.returncode == 0, result.stderr
    docs = docs_of(result.stdout)
    assert only(docs, "PrometheusRule")["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert json.loads(dashboard["data"]["inference-sidecar.json"]) == json.loads(DASHBOARD.read_text())


# --- the chart's own values -------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "names"), [
    (("--set", "config.health_listen=0.0.0.0:50099"), "config.health_listen is 0.0.0.0:50099"),
    (("--set", "sidecar.ports.metrics=9999"), "config.ops_listen is 0.0.0.0:9464"),
    (("--set", "config.health_listen=null"), "config.health_listen is not set"),
    (("--set", "ingress.enabled=true"), "ingress.enabled needs service.enabled"),
    (("--set", "certificate.enabled=true"), "certificate.enabled needs sidecar.tlsSecretName"),
    (("--set", "metricsService.enabled=false"), "serviceMonitor.enabled needs metricsService.enabled"),
])
def test_inconsistent_values_fail_naming_the_key(flags: tuple[str, ...], names: str) -> None:
    """A probe on a port nothing listens on would restart the pod forever: refused at render."""
    result = helm("template", "chat-app", str(CHART), *flags)
    assert result.returncode != 0
    assert names in result.stderr, result.stderr


@pytest.mark.parametrize("tool", ["helm", "helm3"])
@pytest.mark.parametrize(("flags", "names"), [
    (("--set", "replicaCont=3"), ("replicaCont",)),                      # a typo
    (("--set", "replicaCount=two"), ("replicaCount",)),
    (("--set", "sidecar.ports.health=0"), ("sidecar", "ports", "health")),
    (("--set", "sidecar.secretEnv.REDIS_PASSWORD.secretName=redis"), ("REDIS_PASSWORD", "key")),
    (("--set", "autoscaling.enabeld=true"), ("enabeld",)),
])
def test_values_schema_names_the_bad_key(tool: str, flags: tuple[str, ...], names: tuple[str, ...]) -> None:
    """values.schema.json: a misspelt or mistyped value fails the install naming it, instead of
    being ignored (a typo'd `enabled` would leave the autoscaler off without a word)."""
    result = run([k8s_tool(tool), "template", "chat-app", str(CHART), *flags])
    assert result.returncode != 0, result.stdout[:500]
    assert all(name in result.stderr for name in names), result.stderr


def test_ingress_routes_to_the_application_only(tmp_path: Path) -> None:
    text = helm_template("--set", "service.enabled=true", "--set", "ingress.enabled=true",
                         "--set", "ingress.className=nginx",
                         "--set", "ingress.hosts[0].host=chat.example.com",
                         "--set", "ingress.hosts[0].paths[0].path=/")
    manifest = tmp_path / "ingress.yaml"
    manifest.write_text(text)
    result = run([venv_tool("kubernetes-validate", "kubernetes-validate"), "--strict", str(manifest)])
    assert result.returncode == 0, result.stdout + result.stderr
    docs = docs_of(text)
    ingress = only(docs, "Ingress")
    ((rule,),) = [ingress["spec"]["rules"]]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == backend["name"]]
    assert service["spec"]["ports"][0]["port"] == backend["port"]["number"]
    app_ports = {p["name"] for p in container(docs, "app")["ports"]}
    sidecar_ports = {p["name"] for p in sidecar_container(docs)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= app_ports
    assert not {p["targetPort"] for p in service["spec"]["ports"]} & sidecar_ports, "the sidecar is never exposed"


def test_existing_config_map_is_mounted_instead() -> None:
    docs = docs_of(helm_template("--set", "existingConfigMap=chat-app-config-v7"))
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert "chat-app-sidecar-config" not in names and "chat-app-sidecar-env" in names
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "sidecar-config"]
    assert volume["configMap"]["name"] == "chat-app-config-v7"


def annotations(*flags: str) -> dict[str, str]:
    docs = docs_of(helm_template(*flags))
    found: dict[str, str] = only(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    return found


def test_a_config_change_rolls_the_pods_unless_reloaded_in_place() -> None:
    """Like Kustomize's hashed ConfigMaps: a changed config or environment is a new pod template.
    With sidecar.reloadInPlace the ConfigMap changes under running sidecars, which reload it."""
    default = annotations()
    changed = annotations("--set", "config.shutdown.grace_ms=10000")
    assert default["checksum/sidecar-config"] != changed["checksum/sidecar-config"]
    assert default["checksum/sidecar-env"] == changed["checksum/sidecar-env"]
    env_changed = annotations("--set", "sidecar.env.DEPLOY_ENV=qa")
    assert default["checksum/sidecar-env"] != env_changed["checksum/sidecar-env"]
    in_place = annotations("--set", "sidecar.reloadInPlace=true")
    assert "checksum/sidecar-config" not in in_place and "checksum/sidecar-env" in in_place


def test_expected_replicas_follow_the_pod_count() -> None:
    """Each sidecar enforces 1/n of each limit while Redis is out: n is the pods a rollout has."""
    def expected(*flags: str) -> str:
        value: str = configmap(docs_of(helm_template(*flags)), "chat-app-sidecar-env")["data"]["LIMITS_EXPECTED_REPLICAS"]
        return value
    assert expected("--set", "replicaCount=3") == "3"
    assert expected("--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=6") == "6"
    assert expected("--set", "replicaCount=3", "--set", "sidecar.env.LIMITS_EXPECTED_REPLICAS=2") == "2"


# --- docs ---------------------------------------------------------------------------------------------


def test_values_reference_is_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "helm_values_doc.py"), "--check"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    reference = (ROOT / "docs" / "operations" / "helm-values.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values:
        assert f"| `{key}" in reference, f"values.yaml's {key} is undocumented: give it a `# --` comment"
