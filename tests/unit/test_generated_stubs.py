"""The committed client stubs are exactly what `scripts/gen_protos.py` makes from protos/."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "clients" / "python" / "src" / "sidecar_client"


def test_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    generated = [p for p in fresh if p.suffix in (".py", ".pyi") and p.name != "__init__.py"]
    assert len(generated) == 16  # 4 protos x (_pb2, _pb2_grpc) x (.py, .pyi)
    stale = [str(rel) for rel, content in fresh.items()
             if not (COMMITTED / rel).exists() or (COMMITTED / rel).read_bytes() != content]
    assert not stale, f"stubs are stale, run `make protos`: {stale}"
    committed = {p.relative_to(COMMITTED) for d in ("inference", "sidecar")
                 for p in (COMMITTED / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert committed == set(fresh), f"files without a proto: {sorted(map(str, committed - set(fresh)))}"


def test_stubs_register_the_contract_services() -> None:
    from sidecar_client.inference.v1 import inference_pb2
    from sidecar_client.sidecar.admin.v1 import admin_pb2

    assert inference_pb2.DESCRIPTOR.name == "inference/v1/inference.proto"
    assert set(inference_pb2.DESCRIPTOR.services_by_name) == {"Inference"}
    assert set(admin_pb2.DESCRIPTOR.services_by_name) == {"RoutingAdmin", "Audit"}
