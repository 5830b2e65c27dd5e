"""bench/ stays runnable: the paired cost benches, the load test, the prefix-affinity bench, the floor and the
seed load scenarios run end to end, and the seeds' "which resource ran out" is checked on synthetic
numbers. bench/run.py itself runs in tests/test_perf_guard.py."""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
def test_the_seed_scenarios_run_end_to_end(tmp_path: Path) -> None:
    if shutil.which("h2load") is None:
        pytest.fail("the seed scenarios need h2load: Debian package nghttp2-client (scripts/system_tools.sh)")
    report = tmp_path / "seeds.md"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "loadtest.py"), "--seeds",
                             "--seed-sustained-seconds", "1", "--seed-burst-seconds", "1", "--seed-baseline-rate", "50",
                             "--seed-peak-rate", "50", "--seed-burst-rate", "50", "--seed-idle-seconds", "0.5",
                             "--output", str(report)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    # 1 = an SLO was missed: a verdict about this machine at that moment, not a broken bench
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(report.with_suffix(".json").read_text())
    assert [s["name"] for s in data["scenarios"]] == ["baseline", "peak", "burst"]
    for scenario in data["scenarios"]:
        assert list(scenario["runs"]) == ["direct", "reference+rid", "sidecar"]
        for run in scenario["runs"].values():
            assert (run["calls"], run["answered"], run["errors"]) == (50, 50, 0), run
            assert run["latency_ms"]["p99"] > 0 and run["resources"] and "h2load" in run["process_cpu"]
        assert scenario["runs"]["sidecar"]["error_sources"]["sidecar_handled"] == {"OK": 50}
        assert scenario["runs"]["sidecar"]["overhead_histogram_ms"]["p50"] is not None
        assert scenario["added_ms"]["sidecar"]["p50"] is not None
        assert set(scenario["ratios"]) == {"reference+rid"} and scenario["passed"] is not None
    text = report.read_text()
    assert "## burst: 50 calls/s for 1 s" in text and "| reference+rid |" in text
    assert "sidecar-added / reference+rid-added" in text


# --- the seed scenarios' "which resource ran out", on synthetic measurements ---------------------

@pytest.fixture(scope="module")
def seeds() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import their siblings by name
    try:
        return importlib.import_module("seeds")
    finally:
        sys.path.remove(str(ROOT / "bench"))


PINNED = {"backend": "1", "sidecar": "1", "reference+rid": "1", "h2load": "0", "runner": "0", "otlp-sink": "0"}


def flow(seeds: ModuleType, **changes: Any) -> Any:
    values = {"rate": 1000.0, "achieved": 1001.0, "sent": 1002.0, "error_rate": 0.0, "first_p50_ms": 1.5,
              "last_p50_ms": 1.6, "max_in_flight": 12, "in_flight_cap": 256, **changes}
    return seeds.Flow(**values)


def test_a_held_run_says_so_with_each_cpus_share(seeds: ModuleType) -> None:
    usage = seeds.Usage({"0": 0.12, "1": 0.41}, {"sidecar": 0.3, "backend": 0.1, "h2load": 0.08, "runner": 0.02},
                        PINNED)
    verdict = seeds.diagnose(flow(seeds), usage, 0.001)
    assert verdict.held and verdict.problems == [] and verdict.exhausted == [] and verdict.cause == ""
    assert verdict.sentence == ("held: 1001 of 1000 calls/s, error rate 0.0000; load generator CPU 0 12% busy: "
                                "h2load used 8%, this runner 2% of it; server CPU 1 41% busy: the sidecar used "
                                "30%, the backend 10% of it")


def test_a_saturated_server_cpu_is_named_with_what_each_process_took(seeds: ModuleType) -> None:
    usage = seeds.Usage({"0": 0.3, "1": 0.99}, {"sidecar": 0.71, "backend": 0.26, "h2load": 0.2, "runner": 0.05},
                        PINNED)
    verdict = seeds.diagnose(flow(seeds, rate=2000.0, achieved=870.0, sent=880.0, max_in_flight=256,
                                  first_p50_ms=2.0, last_p50_ms=290.0), usage, 0.001)
    assert not verdict.held and verdict.exhausted == ["server CPU 1"]
    assert verdict.problems[0] == ("achieved 870 of 2000 calls/s (44%), h2load could start only 880/s with all "
                                   "256 calls it may have in flight taken")
    assert verdict.problems[1].startswith("latency grew: p50 2.0 ms in the first fifth")
    assert verdict.cause == "server CPU 1 saturated (99% busy): the sidecar used 71%, the backend 26% of CPU 1"
    assert verdict.sentence.startswith("not held (achieved 870") and verdict.sentence.endswith(verdict.cause)


def test_other_processes_on_the_saturated_cpu_are_counted_too(seeds: ModuleType) -> None:
    usage = seeds.Usage({"0": 0.2, "1": 0.98}, {"sidecar": 0.4, "backend": 0.18, "h2load": 0.1}, PINNED)
    verdict = seeds.diagnose(flow(seeds, achieved=700.0), usage, 0.001)
    assert "the sidecar used 40%, other processes 40%, the backend 18% of CPU 1" in verdict.sentence


def test_a_saturated_load_generator_is_blamed_not_the_target(seeds: ModuleType) -> None:
    usage = seeds.Usage({"0": 0.97, "1": 0.5}, {"sidecar": 0.35, "backend": 0.14, "h2load": 0.9, "runner": 0.05},
                        PINNED)
    verdict = seeds.diagnose(flow(seeds, achieved=800.0, sent=805.0), usage, 0.001)
    assert verdict.exhausted == ["load generator CPU 0"]
    assert "h2load used 90%" in verdict.sentence and "the load generator, not the target" in verdict.sentence


def test_a_full_in_flight_cap_without_busy_cpus_is_a_wait(seeds: ModuleType) -> None:
    usage = seeds.Usage({"0": 0.2, "1": 0.45}, {"sidecar": 0.3, "backend": 0.1, "h2load": 0.1}, PINNED)
    verdict = seeds.diagnose(flow(seeds, achieved=600.0, sent=610.0, max_in_flight=256), usage, 0.001)
    assert verdict.exhausted == ["h2load's in-flight cap"]
    assert "no CPU ran out (CPU 0 20%, CPU 1 45% busy), but all 256 calls" in verdict.sentence


def test_errors_alone_fail_a_run_without_blaming_a_resource(seeds: ModuleType) -> None:
    usage = seeds.Usage({"0": 0.1, "1": 0.3}, {"sidecar": 0.2, "backend": 0.08}, PINNED)
    verdict = seeds.diagnose(flow(seeds, error_rate=0.02), usage, 0.001)
    assert not verdict.held and verdict.problems == ["error rate 0.0200 > 0.001"] and verdict.exhausted == []
    assert "no measured resource ran out (CPU 0 10%, CPU 1 30% busy, at most 12 of 256" in verdict.sentence


def test_unpinned_saturation_is_reported_for_the_machine(seeds: ModuleType) -> None:
    usage = seeds.Usage({"0": 0.96, "1": 0.94}, {"sidecar": 1.1, "backend": 0.45, "h2load": 0.3})
    verdict = seeds.diagnose(flow(seeds, achieved=900.0), usage, 0.001)
    assert verdict.exhausted == ["all CPUs"]
    assert "all 2 CPUs saturated (95% busy on average): the sidecar used 110%, the backend 45%, h2load 30% " \
           "of one CPU" in verdict.sentence


def test_the_h2load_log_gives_rates_percentiles_and_in_flight(seeds: ModuleType, tmp_path: Path) -> None:
    t0 = 1_796_000_000_000_000
    # 10 calls 100 ms apart, 2 ms each, except the last (a failed stream) and one of 250 ms that is
    # still in flight when each of the next two starts
    lines = [f"{t0 + i * 100_000}\t200\t{250_000 if i == 3 else 2_000}" for i in range(9)]
    lines.append(f"{t0 + 900_000}\t-1\t1000")
    log = tmp_path / "h2load.log"
    log.write_text("\n".join(reversed(lines)) + "\n")  # the log is not in start order
    view = seeds.caller_view(seeds.read_log(log), 10.0)
    assert (view.calls, view.answered, view.max_in_flight, view.clumped) == (10, 9, 2, 0.0)
    assert view.latency_ms == {"p50": 2.0, "p95": 250.0, "p99": 250.0}
    assert view.sent == pytest.approx(10.0) and view.achieved == pytest.approx(9 / 0.901)
    assert view.first_p50_ms == 2.0 and view.last_p50_ms == 2.0
    assert [s["started"] for s in view.per_second] == [10]


def test_the_open_loop_is_spread_over_staggered_single_connection_generators(seeds: ModuleType) -> None:
    burst = seeds.generators(2000, 30, 100, 256)
    assert (len(burst.calls), sum(burst.calls), burst.rate_each, burst.streams) == (20, 60_000, 100, 13)
    assert burst.stagger == 0.0005 and burst.in_flight_cap == 260
    small = seeds.generators(50, 2, 100, 256)
    assert (small.calls, small.rate_each, small.streams) == ([100], 50, 256)
    odd = seeds.generators(150, 1, 100, 256)
    assert (odd.calls, odd.rate_each, odd.stagger) == ([75, 75], 75, 1 / 150)
    assert seeds.generators(300, 0.001, 100, 256).calls == [1, 1, 1]  # h2load wants -n >= -c


def test_a_scenario_fails_on_the_sidecars_run_and_compares_hops_only_while_both_keep_up(seeds: ModuleType) -> None:
    def run(p50: float, held: bool = True, histogram: dict[str, float] | None = None) -> dict[str, Any]:
        return {"latency_ms": {"p50": p50, "p95": p50 * 2, "p99": p50 * 3}, "held": held, "error_rate": 0.0,
                "problems": [] if held else ["achieved 800 of 1000 calls/s (80%)"],
                "overhead_histogram_ms": histogram}

    args = argparse.Namespace(slo_error_rate=0.001, slo_overhead_p50_ms=2.0, slo_overhead_p95_ms=10.0,
                              slo_overhead_p99_ms=20.0)
    scenario = seeds.Scenario("peak", 1000.0, 60.0)
    own = {"p50": 0.2, "p95": 0.4, "p99": 0.6}
    held = seeds.judge(scenario, {"direct": run(0.5), "reference+rid": run(1.5), "sidecar": run(1.9, True, own)},
                       args)
    assert held["passed"] and held["misses"] == []
    assert held["added_ms"]["sidecar"] == {"p50": 1.4, "p95": 2.8, "p99": 4.2}
    assert held["ratios"] == {"reference+rid": {"p50": 1.4, "p95": 1.4, "p99": 1.4}}
    lost = seeds.judge(scenario, {"direct": run(0.5), "reference+rid": run(1.5),
                                  "sidecar": run(300.0, False, own)}, args)
    assert lost["passed"] is False and lost["ratios"] == {"reference+rid": None}
    assert lost["misses"][:2] == ["achieved 800 of 1000 calls/s (80%)", "added p50 299.5 ms > 2.0 (caller side)"]


@pytest.mark.slow
def test_the_floor_bench_prices_the_sidecar_against_the_least_work_of_its_features(tmp_path: Path) -> None:
    output = tmp_path / "floor.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "floor.py"), "--rounds", "1", "--requests", "400",
                             "--output", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    targets = json.loads(output.read_text())["targets"]
    assert list(targets) == ["reference+rid", "floor-min", "floor-full", "sidecar-min", "sidecar-full"]
    assert all(entry["cpu_us"] > 0 and len(entry["rounds_us"]) == 1 for entry in targets.values())
    assert targets["reference+rid"]["ratio"] == 1.0
    assert "sidecar-min above floor-min:" in result.stdout
    assert "sidecar-full above floor-full:" in result.stdout
