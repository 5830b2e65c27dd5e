"""Writes docs/operations/helm-values.md, the values reference of the Helm chart, from the `# --`
comments of deploy/helm/inference-sidecar/values.yaml (the comment block right above a key
documents it; its default is the value there).

    python scripts/helm_values_doc.py          # rewrite the reference
    python scripts/helm_values_doc.py --check  # exit 1 when it is stale (a test runs this)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VALUES = ROOT / "deploy" / "helm" / "inference-sidecar" / "values.yaml"
REFERENCE = ROOT / "docs" / "operations" / "helm-values.md"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
_DOC = re.compile(r"^(?P<indent> *)# -- (?P<text>.*)$")
_MORE = re.compile(r"^(?P<indent> *)#(?: (?P<text>.*))?$")
MAX_DEFAULT = 80  # longer defaults are left to values.yaml


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key path, description) of every key with a `# --` comment, in file order."""
    found: list[tuple[str, str]] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the keys enclosing the current line
    doc: list[str] | None = None
    doc_indent = -1
    for line in text.splitlines():
        if (match := _DOC.match(line)) is not None:
            doc, doc_indent = [match["text"].strip()], len(match["indent"])
            continue
        if doc is not None and (match := _MORE.match(line)) is not None and len(match["indent"]) == doc_indent:
            doc.append((match["text"] or "").strip())
            continue
        if (match := _KEY.match(line)) is None:
            if not line.strip().startswith("#") and line.strip() and not line.lstrip().startswith("-"):
                doc = None
            if not line.strip():
                doc = None
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([key for _, key in parents] + [match["key"]])
        if doc is not None and indent == doc_indent:
            found.append((path, " ".join(part for part in doc if part)))
        doc = None
        parents.append((indent, match["key"]))
    return found


def default_of(values: dict[str, Any], path: str) -> str:
    value: Any = values
    for key in path.split("."):
        value = value[key]
    shown = json.dumps(value, separators=(", ", ": "))
    if isinstance(value, dict | list) and len(shown) > MAX_DEFAULT:
        return "see values.yaml"
    return f"`{shown}`"


def render(text: str) -> str:
    values = yaml.safe_load(text)
    lines = [
        "# Helm chart values",
        "",
        "<!-- GENERATED from deploy/helm/inference-sidecar/values.yaml by scripts/helm_values_doc.py:",
        "     do not edit; edit the `# --` comments there and run the script (a test checks). -->",
        "",
        "The values of `deploy/helm/inference-sidecar` ([Deploying](deploy.md#helm)). Maps merge across",
        "values files (`-f values-production.yaml` changes only the keys it names); lists are replaced.",
        "",
        "| Key | Default | Description |",
        "|---|---|---|",
    ]
    for path, description in documented_keys(text):
        cell = description.replace("|", "\\|")
        lines.append(f"| `{path}` | {default_of(values, path)} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when the reference is stale")
    args = parser.parse_args(argv)
    wanted = render(VALUES.read_text())
    if args.check:
        if not REFERENCE.exists() or REFERENCE.read_text() != wanted:
            print(f"{REFERENCE.relative_to(ROOT)} is stale: run python scripts/helm_values_doc.py", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
