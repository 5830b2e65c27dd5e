"""The shipped monitoring: Prometheus rules (deploy/prometheus/alerts.yaml), their unit tests
(alerts_test.yaml), the Alertmanager example (alertmanager.yaml) and the Grafana dashboard
(deploy/grafana/sidecar.json), checked with the real tools (promtool, amtool, a running
Alertmanager) and against the /metrics of a real running sidecar.

promtool and amtool come from Debian's prometheus and prometheus-alertmanager packages
(scripts/system_tools.sh, run by `make test`); without them these tests fail, they never skip.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from tests.conftest import Launcher
from tests.harness.load import INFER
from tests.harness.otlp import OtlpReceiver
from tests.harness.procs import ManagedProcess, free_port, wait_until
from tests.harness.sidecar import SidecarProc
from tests.integration.test_metrics import KEYS
from tests.integration.test_metrics import config as metrics_config

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
ALERTMANAGER = ROOT / "deploy" / "prometheus" / "alertmanager.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sidecar.json"
OBSERVABILITY_DOC = ROOT / "docs" / "operations" / "observability.md"
RUNBOOKS_DOC = ROOT / "docs" / "operations" / "runbooks.md"

TOOL_PACKAGES = {"promtool": "prometheus", "amtool": "prometheus-alertmanager",
                 "prometheus-alertmanager": "prometheus-alertmanager"}
RUNBOOK_SECTIONS = {
    "backend-degradation", "routing-policy-change", "failover-recovery", "spool-buffer-recovery",
    "kafka-outage", "redis-outage", "rate-limit-and-budget-troubleshooting", "dlq-handling",
    "config-reload-failure", "config-source-unreachable", "rotating-certificates", "backend-tls-errors",
}
SEVERITIES = {"critical", "warning", "info"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: it comes from the Debian package {TOOL_PACKAGES[name]} "
                    f"(run `bash scripts/system_tools.sh`, which `make test` does first)")
    return path


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "record" in rule}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of every templating variable's inner query."""
    exprs = [(f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
             for panel in dashboard_panels() for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"variable {variable['name']}: not a label_values(selector, label) query: {query}"
        exprs.append((f"variable ${variable['name']}", match.group(1)))
    return exprs


# --- PromQL helpers ----------------------------------------------------------------------------

GRAFANA_GLOBALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def substitute_grafana_variables(expr: str, variables: set[str]) -> str:
    """Grafana's $vars replaced by concrete values a PromQL parser accepts (ranges by durations,
    template variables -- always used inside a regex matcher -- by `.*`). Unknown names fail."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in GRAFANA_GLOBALS:
            return GRAFANA_GLOBALS[name]
        assert name in variables, f"${name} is not a dashboard variable: {expr}"
        return ".*"
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                   "unless", "offset", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords,
    label names (in matchers or by/without/on/ignoring/group_* lists), numbers or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)   # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)                                         # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                                        # ranges, subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w:.])\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b", " ", text)  # durations
    text = re.sub(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)", " ", text)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        if match.group().lower() in PROMQL_KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names in its matchers) of every `name{...}` selector."""
    found = []
    for match in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:[^"\\]|\\.)*"', '""', match.group(2))))
        found.append((match.group(1), labels))
    return found


def test_the_metric_name_helper_finds_metrics_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"x|y", job="j"}[5m]))) > 3 '
            'and on (model) b_total offset 1h30m unless ignoring(code) (c{code!="OK"} * 1e3 > bool 0x1F) '
            'or sum(rate(d_seconds_sum[$__rate_interval])) without (instance) / e:recorded:ratio_rate5m '
            '- label_replace(f, "dst", "$1", "src", "(.*)") + vector(0) + count_over_time(g[1d:5m]) + Inf')
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d_seconds_sum", "e:recorded:ratio_rate5m", "f", "g"}
    assert selector_labels(expr) == [("a_bucket", {"model", "job"}), ("c", {"code"})]


def exposed_series_names(text: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """From an exposition: queryable series name -> family, for every declared family (also those
    without samples yet), and sample name -> label names seen."""
    names: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total", "_created"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "info": ["_info"], "untyped": [""]}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            base = family
            if kind == "counter":
                base = family.removesuffix("_total")
            elif kind == "info":
                base = family.removesuffix("_info")
            for suffix in suffixes[kind]:
                names.setdefault(base + suffix, set()).add(family)
        elif line and not line.startswith("#"):
            name = re.match(r"[A-Za-z_:][\w:]*", line).group()  # type: ignore[union-attr]
            labels.setdefault(name, set()).update(re.findall(r'(\w+)="', line.partition("{")[2].rpartition("}")[0]))
    return names, labels


# --- alert rules -------------------------------------------------------------------------------


def test_promtool_check_rules_accepts_the_alert_rules() -> None:
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = run(tool("promtool"), "test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_severity_summary_description_and_a_runbook_url() -> None:
    header = re.search(r"^# DOCS_BASE_URL: (\S+)$", ALERTS.read_text(), re.MULTILINE)
    assert header, "alerts.yaml names its docs base URL in a `# DOCS_BASE_URL:` line"
    base = header.group(1)
    observability_anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", OBSERVABILITY_DOC.read_text(), re.MULTILINE)}
    runbook_anchors = ({github_anchor(h) for h in re.findall(r"^#+ (.+)$", RUNBOOKS_DOC.read_text(), re.MULTILINE)}
                       if RUNBOOKS_DOC.exists() else RUNBOOK_SECTIONS)
    problems = []
    for rule in alert_rules():
        name, labels, annotations = rule["alert"], rule.get("labels", {}), rule.get("annotations", {})
        if labels.get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity {labels.get('severity')!r}")
        for key in ("summary", "description", "runbook_url"):
            if not str(annotations.get(key, "")).strip():
                problems.append(f"{name}: no {key}")
        url = str(annotations.get("runbook_url", ""))
        page, _, anchor = url.removeprefix(base + "/").partition("#")
        if not url.startswith(base + "/"):
            problems.append(f"{name}: runbook_url {url} does not start with {base}")
        elif page == "runbooks.md":
            if anchor not in RUNBOOK_SECTIONS or anchor not in runbook_anchors:
                problems.append(f"{name}: runbooks.md has no section #{anchor}")
        elif page == "observability.md":
            if anchor not in observability_anchors:
                problems.append(f"{name}: observability.md has no section #{anchor}")
        else:
            problems.append(f"{name}: runbook_url points at {page}")
    assert not problems, problems


def github_anchor(heading: str) -> str:
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def test_every_alert_has_a_firing_and_a_quiet_unit_test_case() -> None:
    """Each alert rule (an alert name may have several, told apart by their labels) has a case in
    alerts_test.yaml where it fires with its labels, and each alert name one where it does not."""
    cases = [case for test in load_yaml(ALERTS_TEST)["tests"] for case in test.get("alert_rule_test", [])]
    firing: dict[str, list[dict[str, Any]]] = {}
    quiet: set[str] = set()
    for case in cases:
        if case.get("exp_alerts"):
            firing.setdefault(case["alertname"], []).extend(a.get("exp_labels", {}) for a in case["exp_alerts"])
        else:
            quiet.add(case["alertname"])
    problems = []
    for rule in alert_rules():
        name, labels = rule["alert"], {k: str(v) for k, v in rule.get("labels", {}).items()}
        if not any(labels.items() <= {k: str(v) for k, v in exp.items()}.items() for exp in firing.get(name, [])):
            problems.append(f"{name} {labels}: no case where it fires")
        if name not in quiet:
            problems.append(f"{name}: no case where it does not fire")
    unknown = (set(firing) | quiet) - {rule["alert"] for rule in alert_rules()}
    assert not problems and not unknown, (problems, f"tests of unknown alerts: {unknown}")


# --- Alertmanager ------------------------------------------------------------------------------


def test_amtool_accepts_the_alertmanager_config() -> None:
    result = run(tool("amtool"), "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(("severity", "receiver"), [("critical", "pager"), ("warning", "chat"), ("info", "email")])
def test_alertmanager_routes_by_severity(severity: str, receiver: str) -> None:
    result = run(tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                 f"--verify.receivers={receiver}", "alertname=Anything", f"severity={severity}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_placeholders_are_obvious() -> None:
    config = load_yaml(ALERTMANAGER)
    secrets = [config["global"]["smtp_auth_password"], config["global"]["smtp_smarthost"],
               *(c["routing_key"] for r in config["receivers"] for c in r.get("pagerduty_configs", [])),
               *(c["api_url"] for r in config["receivers"] for c in r.get("slack_configs", [])),
               *(c["to"] for r in config["receivers"] for c in r.get("email_configs", []))]
    assert secrets and all(re.search(r"<[A-Z_#]+>", str(s)) for s in secrets), secrets


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager with the example config, on a loopback port, no cluster."""
    port = free_port()
    proc = ManagedProcess([tool("prometheus-alertmanager"), f"--config.file={ALERTMANAGER}",
                           f"--storage.path={tmp_path}", f"--web.listen-address=127.0.0.1:{port}",
                           "--cluster.listen-address="], tmp_path / "alertmanager.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200, 20,
                   what="alertmanager ready", proc=proc)
        yield url
    finally:
        proc.stop()


def test_alertmanager_inhibit_rules(alertmanager: str) -> None:
    """Alerts posted to a running Alertmanager: which are suppressed by which."""
    def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
        return {"labels": {"alertname": name, "severity": severity, **labels}}
    alerts = [
        alert("BackendUnhealthy", "warning", model="chat", backend="a"),
        alert("BackendLatencyP95High", "warning", model="chat", backend="a"),      # inhibited
        alert("BackendErrorRateHigh", "warning", model="chat", backend="a"),       # inhibited
        alert("BackendLatencyP95High", "warning", model="chat", backend="b"),      # another backend
        alert("ModelNoHealthyBackend", "critical", model="embed"),
        alert("BackendUnhealthy", "warning", model="embed", backend="x"),          # inhibited
        alert("RoutingFailoversHigh", "warning", model="embed"),                   # inhibited
        alert("UsageKafkaDown", "critical", instance="pod-1"),
        alert("UsageBufferBacklogHigh", "warning", instance="pod-1"),              # inhibited
        alert("UsageBufferOldestRecordStale", "critical", instance="pod-1"),       # inhibited
        alert("UsageBufferBacklogHigh", "warning", instance="pod-2"),              # Kafka is up there
        alert("InferenceErrorBudgetBurn", "critical", burn_rate="14.4"),
        alert("InferenceErrorBudgetBurn", "warning", burn_rate="3"),               # inhibited
        alert("InferenceLatencyP95High", "warning", grpc_method="Infer"),          # no critical of its name
    ]
    request = urllib.request.Request(f"{alertmanager}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    assert urllib.request.urlopen(request, timeout=5).status == 200

    def states() -> dict[tuple[str, ...], str]:
        with urllib.request.urlopen(f"{alertmanager}/api/v2/alerts", timeout=5) as response:
            got = json.load(response)
        return {tuple(f"{k}={v}" for k, v in sorted(a["labels"].items()) if k != "severity"): a["status"]["state"]
                for a in got}

    suppressed = {
        ("alertname=BackendLatencyP95High", "backend=a", "model=chat"),
        ("alertname=BackendErrorRateHigh", "backend=a", "model=chat"),
        ("alertname=BackendUnhealthy", "backend=x", "model=embed"),
        ("alertname=RoutingFailoversHigh", "model=embed"),
        ("alertname=UsageBufferBacklogHigh", "instance=pod-1"),
        ("alertname=UsageBufferOldestRecordStale", "instance=pod-1"),
        ("alertname=InferenceErrorBudgetBurn", "burn_rate=3"),
    }
    def settled() -> dict[tuple[str, ...], str] | None:
        # the inhibitor learns of source alerts asynchronously: poll until the states settle
        now = states()
        if len(now) == len(alerts) and {k for k, state in now.items() if state == "suppressed"} == suppressed:
            return now
        return None
    try:
        got = wait_until(settled, 10, what="the expected alerts suppressed")
    except TimeoutError:
        got = states()
    assert isinstance(got, dict)
    assert {k for k, state in got.items() if state == "suppressed"} == suppressed, got
    assert all(state == "active" for k, state in got.items() if k not in suppressed), got


# --- Grafana dashboard -------------------------------------------------------------------------


def test_the_dashboard_is_importable_json_with_a_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"model", "backend", "org"} <= set(variables)
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for item in (panel, *panel["targets"]):
            assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    """promtool cannot parse a bare expression, so every dashboard query (Grafana's variables
    replaced by concrete values) becomes a recording rule, and `promtool check rules` parses them."""
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    rules = [{"record": f"dashboard:query:{i}", "expr": substitute_grafana_variables(expr, variables),
              "labels": {"where": where}} for i, (where, expr) in enumerate(dashboard_exprs())]
    assert len(rules) > 40
    rule_file = tmp_path / "dashboard_rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, width=1000))
    result = run(tool("promtool"), "check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout, result.stdout

    # the check has teeth: a broken expression is refused
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "dashboard:broken", "expr": "sum by (model (rate(x[5m]))"}]}]}))
    assert run(tool("promtool"), "check", "rules", str(rule_file)).returncode != 0


# --- every referenced metric exists on a real sidecar --------------------------------------------

# Labelled counters without a sample until their event happens (the family is declared all the
# same); the traffic below produces a sample of every other referenced series.
EVENT_ONLY = {
    "api_router_usage_records_dead_lettered_total", "api_router_usage_producer_rebuilds_total",
    "api_router_rate_limit_shadow_denials_total", "api_router_limit_degraded_decisions_total",
    "api_router_backend_ejections_total",
    # a series per TLS listener: the sidecar of this test has none (tests/grpc/test_listener_tls.py)
    "api_router_tls_certificate_expiry_timestamp_seconds", "api_router_tls_certificate_reloads_total",
    # series of backends with TLS only (tests/grpc/test_backend_tls.py)
    "api_router_backend_tls_errors_total",
}
TARGET_LABELS = {"job", "instance"}   # added by Prometheus at scrape time
def scrape(sidecar: SidecarProc) -> str:
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def sample_value(text: str, name: str) -> float:
    return sum(float(line.rsplit(maxsplit=1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def test_every_metric_the_alerts_and_the_dashboard_use_is_exported_by_a_running_sidecar(
        launch: Launcher, kafka_bootstrap: str, tmp_path: Path) -> None:
    receiver = OtlpReceiver().start()
    try:
        good = launch.backend()
        failing = launch.backend("--fail-rate", "1.0", "--fail-code", "UNAVAILABLE")
        # the metrics test's sidecar, with a failover tier for `flaky` and traces
        sidecar = launch.sidecar(metrics_config(good, failing, kafka_bootstrap, tmp_path / "spool", failover=True,
                                                extra=f"telemetry: {{otlp_endpoint: {receiver.endpoint}}}\n"))
        with grpc.insecure_channel(sidecar.listen) as channel:
            infer: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INFER)

            def call(key: str, model: str = "chat") -> grpc.StatusCode:
                try:
                    infer(InferRequest(model=model, input="hello").SerializeToString(),
                          metadata=(("x-api-key", KEYS[key]),), timeout=10)
                except grpc.RpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            assert [call("app") for _ in range(5)] == [grpc.StatusCode.OK] * 5
            assert [call("app", "flaky") for _ in range(8)] == [grpc.StatusCode.OK] * 8  # f fails, a answers
            assert call("slow") == grpc.StatusCode.OK
            assert call("slow") == grpc.StatusCode.RESOURCE_EXHAUSTED      # rate limit
            assert call("poor") == grpc.StatusCode.RESOURCE_EXHAUSTED      # budget
        wait_until(lambda: sample_value(scrape(sidecar), "api_router_usage_records_published_total") >= 15
                   and sample_value(scrape(sidecar), "api_router_trace_spans_exported_total") > 0, 30,
                   what="usage records published and spans exported")
        exported, sample_labels = exposed_series_names(scrape(sidecar))
    finally:
        receiver.stop()

    recorded = recorded_names()
    referenced: dict[str, set[str]] = {}
    selectors: list[tuple[str, str, set[str]]] = []
    for rule in (r for group in load_yaml(ALERTS)["groups"] for r in group["rules"]):
        where = f"alerts.yaml {rule.get('alert') or rule.get('record')}"
        for name in metric_names(rule["expr"]):
            referenced.setdefault(name, set()).add(where)
        selectors += [(where, *s) for s in selector_labels(rule["expr"])]
    for where, expr in dashboard_exprs():
        for name in metric_names(expr):
            referenced.setdefault(name, set()).add(f"dashboard {where}")
        selectors += [(f"dashboard {where}", *s) for s in selector_labels(expr)]
    assert len(referenced) > 30, sorted(referenced)

    missing = {name: sorted(where) for name, where in referenced.items()
               if name not in exported and name not in recorded}
    assert not missing, f"referenced but not exported by the sidecar (nor recorded in alerts.yaml): {missing}"
    no_sample = {name for name in referenced if name in exported and name not in sample_labels}
    assert no_sample <= EVENT_ONLY, f"no sample after the traffic: {sorted(no_sample - EVENT_ONLY)}"

    wrong_labels = [(where, name, sorted(labels - sample_labels[name] - TARGET_LABELS))
                    for where, name, labels in selectors
                    if name in sample_labels and labels - sample_labels[name] - TARGET_LABELS]
    assert not wrong_labels, f"matchers on labels the series do not have: {wrong_labels}"
