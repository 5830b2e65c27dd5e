"""Traces to a collector over TLS (`https://` and `telemetry.otlp_tls`), end to end: the
project's OTLP receiver serving TLS (and mutual TLS), the sidecar and a demo backend as
processes, every handshake a real one.

A custom CA and the name to verify; a client certificate the receiver requires, rotated on
disk (an atomic symlink swap) from one it refuses to two it accepts in turn: the exports that
follow each swap carry the new certificate, without a restart. Trusting the wrong CA costs
spans, not calls: they are dropped, counted, and logged without any certificate content.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.harness.certs import Issued, Pki
from tests.harness.otlp import OtlpReceiver, ReceiverTls
from tests.harness.procs import wait_until
from tests.harness.sidecar import SidecarProc
from tests.harness.tls_checks import assert_nothing_leaked, swap
from tests.integration.test_tracing import API_KEY, COLLECTOR_KEY, call, span_tree, traced_config


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def serve() -> Iterator[Callable[[ReceiverTls], OtlpReceiver]]:
    """Starts TLS receivers for one test, and stops them after it."""
    started: list[OtlpReceiver] = []

    def start(tls: ReceiverTls) -> OtlpReceiver:
        started.append(OtlpReceiver(tls).start())
        return started[-1]
    try:
        yield start
    finally:
        for receiver in started:
            receiver.stop()


def tls_block(ca: Path, client: Path | None = None, server_name: str | None = None) -> str:
    fields = [f"ca_file: {ca}"]
    if client is not None:
        fields += [f"cert_file: {client}/client.pem", f"key_file: {client}/client.key"]
    if server_name:
        fields.append(f"server_name: {server_name}")
    return "  otlp_tls: {" + ", ".join(fields) + "}\n"


def traced(launch: Launcher, receiver: OtlpReceiver, tls: str) -> SidecarProc:
    backend = launch.backend()
    config = traced_config([("a", backend, 0)], receiver.endpoint)
    config = config.replace(f"  otlp_headers: {{x-collector-key: {COLLECTOR_KEY}}}\n",
                            f"  otlp_headers: {{x-collector-key: {COLLECTOR_KEY}}}\n{tls}")
    return launch.sidecar(config)


def traced_call(sidecar: SidecarProc) -> str:
    """One sampled call with its own trace id; returns the trace id."""
    trace_id = os.urandom(16).hex()
    assert call(sidecar, traceparent=f"00-{trace_id}-{os.urandom(8).hex()}-01") is None
    return trace_id




def issue_client(pki: Pki, directory: Path, name: str) -> Issued:
    """A client certificate whose common name is `name`, as `directory`/client.pem and .key."""
    issued = pki.issue(name, client=True, directory=directory)
    issued.cert.rename(directory / "client.pem")
    issued.key.rename(directory / "client.key")
    return Issued(directory / "client.pem", directory / "client.key")




def test_spans_arrive_over_tls_checked_against_a_custom_ca_and_name(
        launch: Launcher, pki: Pki, serve: Callable[[ReceiverTls], OtlpReceiver]) -> None:
    # the collector's certificate names only collector.internal: the endpoint's 127.0.0.1 would
    # not match, so `server_name` says which name to verify (and send as SNI)
    server = pki.issue("collector", names=("collector.internal",))
    receiver = serve(ReceiverTls(server))
    assert receiver.endpoint.startswith("https://")
    sidecar = traced(launch, receiver, tls_block(pki.ca, server_name="collector.internal"))
    server_span, children = span_tree(receiver, traced_call(sidecar), 5)
    assert server_span.resource["service.name"] == "inference-sidecar" and len(children) == 5
    assert receiver.metadata[-1]["x-collector-key"] == COLLECTOR_KEY
    assert metric(sidecar, "api_router_trace_spans_dropped_total", {"reason": "export_failed"}) == 0


def test_a_rotated_client_certificate_is_used_by_the_next_exports(
        launch: Launcher, pki: Pki, serve: Callable[[ReceiverTls], OtlpReceiver], tmp_path: Path) -> None:
    """The collector requires a client certificate from `pki`. The sidecar starts with one from
    another CA (spans dropped), then its files are swapped to `sidecar-1`, then to `sidecar-2`:
    after each swap the collector sees the new certificate. Then to a pair that does not match
    (a key that is not the certificate's): skipped, the running channel goes on."""
    receiver = serve(ReceiverTls(pki.issue("collector"), client_ca=pki.ca))
    untrusted = Pki(tmp_path / "untrusted", name="untrusted-ca")
    generations = {"refused": issue_client(untrusted, tmp_path / "gen-0", "refused"),
                   "sidecar-1": issue_client(pki, tmp_path / "gen-1", "sidecar-1"),
                   "sidecar-2": issue_client(pki, tmp_path / "gen-2", "sidecar-2")}
    live = tmp_path / "live"
    swap(live, tmp_path / "gen-0")
    sidecar = traced(launch, receiver, tls_block(pki.ca, live))

    traced_call(sidecar)
    wait_until(lambda: metric(sidecar, "api_router_trace_spans_dropped_total", {"reason": "export_failed"}) >= 6, 10,
               what="the spans refused with the untrusted client certificate dropped and counted")
    assert receiver.all_spans() == []

    for generation, directory in (("sidecar-1", "gen-1"), ("sidecar-2", "gen-2")):
        swap(live, tmp_path / directory)

        def exported_with(generation: str = generation) -> bool:
            traced_call(sidecar)
            return generation in receiver.client_names
        wait_until(exported_with, 15, what=f"exports with the {generation} certificate", interval=0.5)
    # the old channel is closed at the swap: no export with the old certificate after the new one
    names = receiver.client_names
    assert set(names) == {"sidecar-1", "sidecar-2"}
    assert names.index("sidecar-2") > len(names) - 1 - names[::-1].index("sidecar-1"), names
    logged = [line for line in sidecar.log_json() if line.get("msg", "").startswith("trace export: TLS files changed")]
    assert len(logged) == 2

    mismatched = issue_client(pki, tmp_path / "gen-3", "sidecar-3")
    mismatched.key.write_bytes(generations["sidecar-1"].key.read_bytes())
    swap(live, tmp_path / "gen-3")
    wait_until(lambda: [line for line in sidecar.log_json() if "do not load" in line.get("msg", "")], 10,
               what="the mismatched pair skipped")
    skipped = next(line for line in sidecar.log_json() if "do not load" in line.get("msg", ""))
    assert "telemetry.otlp_tls.key_file: not the key of cert_file" in skipped["error"], skipped
    trace_id = traced_call(sidecar)
    wait_until(lambda: receiver.trace(trace_id), 10, what="spans through the running channel")
    assert receiver.client_names[-1] == "sidecar-2"
    assert_nothing_leaked(sidecar, *(f for issued in generations.values() for f in (issued.cert, issued.key)),
                          secrets=(API_KEY, COLLECTOR_KEY))


def test_a_wrong_ca_drops_spans_counts_them_and_logs_why_without_certificate_content(
        launch: Launcher, pki: Pki, serve: Callable[[ReceiverTls], OtlpReceiver], tmp_path: Path) -> None:
    receiver = serve(ReceiverTls(pki.issue("collector")))
    other = Pki(tmp_path / "other", name="other-ca")
    sidecar = traced(launch, receiver, tls_block(other.ca))
    for _ in range(3):
        traced_call(sidecar)  # calls are served: only their spans are lost
    wait_until(lambda: metric(sidecar, "api_router_trace_spans_dropped_total", {"reason": "export_failed"}) >= 18,
               10, what="the spans dropped and counted")
    assert receiver.all_spans() == []
    failing = [line for line in sidecar.log_json() if line.get("msg", "").startswith("trace export failing")]
    assert len(failing) == 1 and "UNAVAILABLE" in failing[0]["error"], failing
    assert "certificate" in failing[0]["error"].lower() or "handshake" in failing[0]["error"].lower(), failing
    assert_nothing_leaked(sidecar, other.ca, pki.ca, secrets=(API_KEY, COLLECTOR_KEY))
