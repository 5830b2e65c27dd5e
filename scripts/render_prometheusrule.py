"""Renders deploy/prometheus/alerts.yaml into the PrometheusRule of deploy/kubernetes/base.

The rule file (plain Prometheus format, `groups:`) is the one source of the alert rules: this
wraps its groups, unchanged, in a `monitoring.coreos.com/v1` PrometheusRule for the Prometheus
Operator. Run it after editing alerts.yaml; tests/deploy/test_kubernetes.py fails while the
checked-in manifest differs from what this renders.

    python scripts/render_prometheusrule.py           # writes deploy/kubernetes/base/prometheusrule.yaml
    python scripts/render_prometheusrule.py --check   # exit 1 when that file is stale
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
OUTPUT = ROOT / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by scripts/render_prometheusrule.py: do not edit.
# Edit alerts.yaml and run `python scripts/render_prometheusrule.py` (a test checks they agree).
# Your Prometheus selects PrometheusRules by label (kube-prometheus-stack: `release: <name>`):
# add that label in an overlay if it needs one.
"""


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (PromQL, descriptions), no anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def manifest(alerts_text: str) -> dict[str, Any]:
    """The PrometheusRule object for the rule file's text."""
    rules = yaml.safe_load(alerts_text)
    if not isinstance(rules, dict) or not isinstance(rules.get("groups"), list):
        raise TypeError("alerts.yaml: expected a Prometheus rule file with a `groups:` list")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "inference-sidecar",
            "labels": {
                "app.kubernetes.io/name": "inference-sidecar",
                "app.kubernetes.io/component": "alert-rules",
                "app.kubernetes.io/part-of": "inference",
            },
        },
        "spec": {"groups": rules["groups"]},
    }


def render(alerts_text: str) -> str:
    body = yaml.dump(manifest(alerts_text), Dumper=_Dumper, sort_keys=False, width=110,
                     allow_unicode=True, default_flow_style=False)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the checked-in file is stale")
    args = parser.parse_args(argv)
    text = render(ALERTS.read_text())
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python scripts/render_prometheusrule.py",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
