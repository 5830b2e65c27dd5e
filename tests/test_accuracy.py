"""Shared limits stay accurate across sidecars: bench/accuracy.py at CI size, judged on its targets.

Two sidecars share one Valkey, or a 3-master Redis Cluster (`--cluster`, `redis+cluster://`);
16 callers in separate processes hammer them. The harness exits 0 only when every target is met;
the JSON numbers are checked here again, against the same targets and with no extra slack, so
that a harness bug in the verdict cannot hide a miss.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGET_WORD = "accountability"  # as bench/accuracy.py


@pytest.mark.slow
@pytest.mark.parametrize(("options", "external", "started"), [
    ([], "REDIS_URL", "valkey (started)"),
    (["--cluster"], "REDIS_CLUSTER_URL", "cluster (started, 3 masters)"),
], ids=["valkey", "cluster"])
def test_rate_limits_and_budgets_hold_across_sidecars(tmp_path: Path, options: list[str], external: str,
                                                      started: str) -> None:
    out = tmp_path / "accuracy.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy.py"), "--sidecars", "2",
                             "--callers", "16", "--seconds", "3", *options, "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    report = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    summary = json.loads(out.read_text())
    settings, rate, budget = summary["settings"], summary["rate"], summary["budget"]
    # the store that ran: the harness's own (a cluster: 3 masters), or the one the environment names
    assert settings["redis"] == ("external" if os.environ.get(external) else started), report
    if settings["cluster"]:  # the master each org's keys live on ({org} hash tag: one slot per org)
        assert set(settings["org_nodes"]) == set(settings["orgs"].values()), report
    assert summary["passed"] and all(c["ok"] for c in summary["checks"]), report

    # rate: demand exceeded the limit, and admitted = allowed within 1 % either way
    assert rate["errors"] == {} and rate["denied"] > 0, report
    allowed = settings["burst"] + settings["rpm"] / 60 * rate["window_s"]
    assert rate["allowed"] == pytest.approx(allowed, abs=0.01)
    assert rate["admitted"] <= 1.01 * allowed, report
    assert rate["admitted"] >= 0.99 * allowed, report

    # budget: the reservation as the sidecar computes it (UTF-8 bytes / 4, rounded up, + max_output_tokens)
    text = " ".join([BUDGET_WORD] * settings["budget_words"])
    reservation = math.ceil(len(text.encode()) / 4) + settings["max_output_tokens"]
    assert budget["reservation"] == reservation
    assert budget["errors"] == {} and budget["gave_up"] == 0 and budget["denied"] > 0, report
    assert budget["consumed"] - settings["budget"] <= reservation, report   # overshoot
    assert settings["budget"] - budget["consumed"] <= reservation, report   # left unused once exhausted
    # the store never holds less than what was really used (an unsettled reservation holds more)
    assert budget["store_counter"] is not None and budget["store_counter"] >= budget["consumed"], report
