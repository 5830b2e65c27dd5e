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
])
def test_paired_cost_benches_run(script: str, args: list[str], expected: list[str]) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--rounds", "1", "--requests", "600",
                             "--calls", "20", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for text in expected:
        assert text in result.stdout
