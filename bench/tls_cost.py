"""What TLS to the backend costs: the same sidecar calling a plaintext backend, a TLS backend
(`tls.backends: {ca_file}`) and a mutual-TLS backend (and a client certificate), measured as
paired rounds (`pairs.py`).

    .venv/bin/python bench/tls_cost.py                   # ~6 min on 2 cores
    .venv/bin/python bench/tls_cost.py --rounds 16 --variants mtls

Makes a CA, a server and a client certificate (the test suite's `tests/harness/certs.py`, EC
P-256), starts three demo backends (plaintext, TLS, mutual TLS: `--tls-cert --tls-key
[--client-ca]`), then for each variant a pair of sidecars of the work tree (`bench/run.py`'s
config: one model, an API key, memory limits): `plain` against the variant, nothing else alive.
h2load calls the sidecars in plaintext; only the sidecar -> backend hop differs. Printed: the
medians over rounds and the median of the per-round differences variant - plain: the sidecar's
CPU per request and the p50/p99 latency at concurrency 1 that TLS on that hop adds (the
backend's own TLS work is in the latency, not in the CPU column). Connections are long-lived,
so this is the per-call cost (record encryption); a handshake happens once per connection.
Needs h2load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
from latency import request_bytes
from load import grpc_frame
from pairs import Results, add_arguments, measure_pair, metric_total, run_main
from procs import Proc, loopback, start, wait_serving
from run import MODEL

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("tls", "mtls")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"which variants to run, comma-separated ({','.join(VARIANTS)}); plain is always run")
    return p.parse_args()


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> dict[str, Results]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests.harness.certs: the certificates the tests use
    from tests.harness.certs import Pki

    pki = Pki(tmp / "pki")
    server, client = pki.issue("backend"), pki.issue("sidecar", client=True)
    tls_args = {"plain": [], "tls": ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]}
    tls_args["mtls"] = [*tls_args["tls"], "--client-ca", str(pki.ca)]
    settings = {"plain": None, "tls": {"ca_file": str(pki.ca)},
                "mtls": {"ca_file": str(pki.ca), "cert_file": str(client.cert), "key_file": str(client.key)}}
    addresses: dict[str, str] = {}
    for name in ("plain", *(v for v in VARIANTS if v in args.variants.split(","))):
        addresses[name] = loopback()
        backend = start(f"backend-{name}", [sys.executable, "-m", "sidecar", "demo-backend", "--listen",
                                            addresses[name], *tls_args[name]], tmp)
        procs.append(backend)
        await wait_serving(backend, addresses[name], credentials=None if name == "plain" else
                           runner_credentials(pki.ca, client if name == "mtls" else None))
    body = tmp / "request.grpc"
    body.write_bytes(grpc_frame(request_bytes(MODEL, 16)))

    def sections(name: str) -> dict[str, Any]:
        """The sidecar's model pointed at this variant's backend, with its TLS settings."""
        model = {"timeout_ms": 30000, "backends": [{"name": "a", "address": addresses[name], "weight": 1}]}
        return {"models": {MODEL: model}, **({"tls": {"backends": settings[name]}} if settings[name] else {})}

    async def check_no_tls_errors(name: str, ops: str) -> None:
        errors = metric_total(ops, "api_router_backend_tls_errors_total")
        if errors:
            raise RuntimeError(f"{name}: {errors:.0f} TLS handshakes with the backend failed")

    pairs = {}
    for variant in (v for v in VARIANTS if v in addresses):
        pairs[variant] = await measure_pair(args, tmp, procs, addresses["plain"], body,
                                            {"plain": sections("plain"), variant: sections(variant)},
                                            check_no_tls_errors)
    return pairs


def runner_credentials(ca: Path, client: Any) -> grpc.ChannelCredentials:
    """The runner's own, to see a TLS backend serve (its health check); `client`: an `Issued`."""
    return grpc.ssl_channel_credentials(ca.read_bytes(), client.key.read_bytes() if client else None,
                                        client.cert.read_bytes() if client else None)


def main() -> int:
    return run_main("tls_cost.py", parse_args(), measure, "plain")


if __name__ == "__main__":
    sys.exit(main())
