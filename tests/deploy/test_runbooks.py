"""The runbooks name only what exists: every `sidecar` command parses with the sidecar's own
command line (a dry run), every alert and dashboard panel they cite is in the shipped files,
every metric they grep for is exported, and every alert's runbook link lands on a section."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sidecar.cli import _parser
from tests.deploy.test_monitoring import alert_rules, dashboard_panels

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "operations" / "runbooks.md"
VALUES = {"$ADMIN": "127.0.0.1:50052", "$OPS": "127.0.0.1:9464", "$CONFIG": "/etc/sidecar/config.yaml"}


def text() -> str:
    return RUNBOOKS.read_text()


def sidecar_commands() -> list[str]:
    """Every `sidecar …` command: lines of the sh blocks, and inline code in the prose that is a
    whole command (a subcommand and its arguments, not a bare `sidecar admin` in a sentence)."""
    blocks = re.findall(r"```sh\n(.*?)```", text(), flags=re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    inline = [c for c in re.findall(r"`(sidecar [^`]+)`", text()) if len(c.split()) >= 3]
    return [c for c in lines + inline if c.startswith("sidecar ")]


def sections() -> dict[str, str]:
    """GitHub's anchor of each `##` heading -> the section's text."""
    found = {}
    for chunk in text().split("\n## ")[1:]:
        heading = chunk.splitlines()[0]
        found[re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")] = chunk
    return found


def top_level_alternatives(pattern: str) -> list[str]:
    """`a_(b|c)|d` -> ["a_(b|c)", "d"]."""
    parts, depth, current = [], 0, ""
    for char in pattern:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def test_the_runbooks_have_commands_to_check() -> None:
    assert len(sidecar_commands()) >= 20


@pytest.mark.parametrize("command", sidecar_commands())
def test_every_sidecar_command_parses(command: str) -> None:
    for name, value in VALUES.items():
        command = command.replace(f'"{name}"', value).replace(name, value)
    argv = shlex.split(command)[1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`{command}` is not a valid sidecar command (exit {exc.code})")
    assert callable(args.handler)


def test_every_alert_links_to_a_runbook_section_that_cites_it() -> None:
    found = sections()
    for rule in alert_rules():
        page, _, anchor = rule["annotations"]["runbook_url"].rpartition("#")
        if not page.endswith("runbooks.md"):
            continue
        assert anchor in found, f"{rule['alert']}: no section #{anchor} in runbooks.md"
        assert f"`{rule['alert']}`" in found[anchor], f"section #{anchor} does not mention {rule['alert']}"


def test_alerts_and_panels_the_runbooks_cite_exist() -> None:
    alerts = {rule["alert"] for rule in alert_rules()}
    alert_like = r"`((?:Inference|Backend|Model|Routing|RateLimit|OrgBudget|LimitStore|Usage|ConfigReload|ConfigSource|Trace|Tls)[A-Za-z]+)`"
    cited_alerts = set(re.findall(alert_like, text()))
    assert cited_alerts and cited_alerts <= alerts, f"alerts cited but not defined: {sorted(cited_alerts - alerts)}"
    panels = {panel.get("title") for panel in dashboard_panels()}
    cited_panels = {" ".join(p.split()) for p in re.findall(r"\*([A-Z][^*]+)\*", text())} - {
        "Symptoms.", "Diagnose.", "Recover.", "Expected.", "Change."}
    assert cited_panels and cited_panels <= panels, f"panels cited but not on the dashboard: {cited_panels - panels}"


def test_metrics_the_runbooks_name_or_grep_for_are_declared() -> None:
    from prometheus_client import REGISTRY

    import sidecar.telemetry.metrics  # noqa: F401 - declares them

    declared = {name for names in REGISTRY._collector_to_names.values() for name in names}  # type: ignore[attr-defined]
    named = {n for n in re.findall(r"\b(api_router_[a-z_]+[a-z])\b", text()) if "(" not in n}
    named = {n for n in named if not re.search(rf"{re.escape(n)}\(", text())}  # heads of grep patterns
    assert named and named <= declared, f"metrics named but not exported: {sorted(named - declared)}"
    patterns = re.findall(r"grep -E '([^']+)'", text()) + re.findall(r"grep (api_router_[a-z_]+)", text())
    assert patterns
    for pattern in patterns:
        for alternative in top_level_alternatives(pattern):
            assert any(re.search(alternative, name) for name in declared), f"`grep {pattern}`: {alternative} " \
                "matches no metric"
