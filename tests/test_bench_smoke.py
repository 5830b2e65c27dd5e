"""bench/ stays runnable: a quick run measures every target and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_bench_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["latency"]) == {"direct", "reference", "reference+rid", "sidecar"}
    for target in report["throughput"].values():
        assert target["ok_share"] > 0.99 and target["cpu_us_per_req"] > 0
    assert report["ratios"]["cpu_per_req"]["ratio"] > 0
    assert "sidecar/reference" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "expected"), [
    ("trace_cost.py", ["--variants", "on,dead"], ["on - off:", "dead - off:", "spans exported"]),
    ("usage_cost.py", ["--variants", "kafka-interval"], ["kafka-interval - none:", "acknowledged by Kafka"]),
    ("tls_cost.py", [], ["tls - plain:", "mtls - plain:"]),
])
def test_paired_cost_benches_run(script: str, args: list[str], expected: list[str]) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--rounds", "1", "--requests", "600",
                             "--calls", "20", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for text in expected:
        assert text in result.stdout


@pytest.mark.slow
def test_the_load_test_runs_every_scenario_and_judges_it(tmp_path: Path) -> None:
    report = tmp_path / "loadtest.md"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "loadtest.py"), "--duration", "4", "--rate", "100",
                             "--peak-rate", "250", "--output", str(report)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scenarios = json.loads(report.with_suffix(".json").read_text())["scenarios"]
    assert [(s["scenario"], s["passed"]) for s in scenarios] == [
        ("baseline", True), ("peak", True), ("burst", True), ("backend_failure", True), ("rate_limit", True),
        ("budget", True)]
    assert scenarios[0]["overhead_p50_ms"] is not None and scenarios[0]["calls"] >= 350
    assert scenarios[4]["codes"].get("RESOURCE_EXHAUSTED/RATE_LIMIT_EXCEEDED", 0) > 0
    assert scenarios[5]["codes"].get("RESOURCE_EXHAUSTED/BUDGET_EXCEEDED", 0) > 0
    assert "| baseline | pass |" in report.read_text()


def test_the_load_test_against_a_running_sidecar_skips_what_it_was_not_given(tmp_path: Path) -> None:
    from tests.harness.procs import ManagedProcess, free_port, wait_until
    from tests.harness.sidecar import SIDECAR, health_status

    listen, admin, ops = (f"127.0.0.1:{free_port()}" for _ in range(3))
    demo = ManagedProcess([*SIDECAR, "demo", "--listen", listen, "--admin-listen", admin, "--ops-listen", ops],
                          tmp_path / "demo.log", cwd=tmp_path)
    try:
        wait_until(lambda: health_status(listen) == "SERVING", 30, what="demo readiness", proc=demo)
        report = tmp_path / "remote.md"
        result = subprocess.run([sys.executable, str(ROOT / "bench" / "loadtest.py"), "--target", listen, "--ops", ops,
                                 "--api-key", "demo-key", "--duration", "2", "--rate", "50",
                                 "--scenarios", "baseline,backend_failure,rate_limit,budget", "--output", str(report)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    finally:
        demo.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scenarios = json.loads(report.with_suffix(".json").read_text())["scenarios"]
    assert [(s["scenario"], s["passed"]) for s in scenarios] == [
        ("baseline", True), ("backend_failure", None), ("rate_limit", None), ("budget", None)]
    assert scenarios[0]["codes"] == {"OK": scenarios[0]["calls"]} and scenarios[0]["calls"] >= 90
    assert "| rate_limit | skipped |" in report.read_text()


@pytest.mark.slow
def test_the_prefix_affinity_bench_measures_both_routings(tmp_path: Path) -> None:
    out = tmp_path / "prefix_affinity.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "prefix_affinity.py"), "--rounds", "1",
                             "--calls", "40", "--prefixes", "4", "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"prefix", "weighted_random"}
    for routing in results.values():
        assert routing["calls"] == 40 and sum(routing["calls_per_backend"].values()) == 40
        assert 0 < routing["ttft_p50_ms"] <= routing["ttft_p99_ms"] and 0 <= routing["cache_hit_share"] <= 1
    assert "| prefix | 40 |" in result.stdout and "| weighted_random | 40 |" in result.stdout
