"""A perf guard that cannot flake: bench/run.py in the suite, judged by ratios within one run.

Not a timed test. The full-featured sidecar is compared with `reference+rid` (a bare grpc.aio hop
that forwards and echoes x-request-id, the least the contract allows) measured in the same run,
interleaved round by round, so a slow or busy machine moves both sides of each ratio. The bounds
are twice the targets: CPU per request 2 x 1.25 = 2.5, added p50 at concurrency 1 2 x 1.5 = 3.0.
Today's sidecar is about 1.55x and 1.4x, so only a real regression (a 3x one) fails, and a single
noisy round cannot: each ratio is the median of the per-round ratios.

The JSON is written to the test's tmp dir and copied to bench/results/perf-guard.json (gitignored),
the place to look after a failure. See "Perf guard in CI" in bench/README.md.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEPT = ROOT / "bench" / "results" / "perf-guard.json"
# ratio name in run.py's `ratios_vs_rid_reference` -> the bound (2 x the target)
BOUNDS = {"cpu_per_req": 2.5, "added_p50_c1": 3.0}
# ~50 s on 2 cores: 3 latency rounds of 200 calls at c=1 and c=16, 10 streams, 3 interleaved h2load
# runs of 4000 calls per target; pinned (the default): load generators on one CPU, the servers on the
# other. The same run is the suite's check that bench/run.py works (every target, streams, the table)
BENCH = ["--quick", "--features", "full", "--rounds", "3", "--calls", "200", "--requests", "4000",
         "--load-rounds", "3", "--stream-calls", "10", "--concurrency", "1,16"]


def guarded(entry: dict[str, Any]) -> float | None:
    """The median of the per-round ratios (the pooled ratio when there are none)."""
    rounds = [r for r in entry.get("per_round", []) if r is not None]
    return statistics.median(rounds) if rounds else entry["ratio"]


@pytest.mark.slow
def test_the_full_sidecar_costs_at_most_twice_its_targets_over_a_bare_hop(tmp_path: Path) -> None:
    out = tmp_path / "perf-guard.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *BENCH, "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    KEPT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out, KEPT)
    report = json.loads(out.read_text())
    # bench/run.py works: every target measured, every load request answered, the table printed
    assert set(report["latency"]) == {"direct", "reference", "reference+rid", "sidecar"}
    assert set(report["stream"]) == set(report["latency"])
    for target in report["throughput"].values():
        assert target["ok_share"] > 0.99 and target["cpu_us_per_req"] > 0
    assert "sidecar/reference" in result.stdout and "InferStream" in result.stdout
    # the verdict names issue 20's targets for the feature set, each judged
    verdict = next(line for line in result.stdout.splitlines() if line.startswith("issue 20's targets"))
    assert verdict.count(" met") == 3 and "cpu_per_req <= 1.25x:" in verdict and "p99_c16 <= 1.3x:" in verdict
    ratios = report["ratios_vs_rid_reference"]
    measured = {name: guarded(ratios[name]) for name in BOUNDS}
    over = {name: value for name, value in measured.items() if value is None or value > BOUNDS[name]}
    assert not over, (
        f"sidecar/reference+rid over twice the target: {over} (bounds {BOUNDS}); measured {measured}; "
        f"per round: { {n: ratios[n].get('per_round') for n in BOUNDS} }; JSON: {KEPT}\n{result.stdout[-2000:]}")
