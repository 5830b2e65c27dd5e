"""Regenerate the Python stubs of protos/ into the client package.

Run from anywhere: `python scripts/gen_protos.py` (or `make protos`). With `--check DIR` it
writes into DIR instead, so a test can compare a fresh generation with the committed files.

The generated modules keep their canonical proto file names (`inference/v1/inference.proto`),
so reflection and other tools see the contract's names; only their imports of each other are
rewritten to live under the `sidecar_client` package.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "sidecar_client"
OUT = ROOT / "clients" / "python" / "src" / PACKAGE
TOP_LEVEL = ("inference", "sidecar")  # top-level proto packages we generate


def _rewrite_imports(text: str) -> str:
    """`from inference.v1 import x` -> `from sidecar_client.inference.v1 import x` (and `import`)."""
    tops = "|".join(TOP_LEVEL)
    text = re.sub(rf"^from ({tops})(\.[\w.]+)? import", rf"from {PACKAGE}.\1\2 import", text, flags=re.MULTILINE)
    return re.sub(rf"^import ({tops})\.", rf"import {PACKAGE}.\1.", text, flags=re.MULTILINE)


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
        args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={raw}", f"--pyi_out={raw}",
                f"--grpc_python_out={raw}", f"--plugin=protoc-gen-mypy_grpc={plugin}",
                f"--mypy_grpc_out={raw}", *files]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {files}")
        written = []
        for src in sorted(raw.rglob("*")):
            if src.is_dir():
                continue
            rel = src.relative_to(raw)
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_rewrite_imports(src.read_text()))
            written.append(rel)
        # every directory becomes a package
        for d in {(out / r).parent for r in written}:
            while d != out.parent and d != out:
                (d / "__init__.py").touch()
                d = d.parent
        return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, help="generate into this directory instead")
    args = parser.parse_args()
    out = args.check or OUT
    if args.check is None:
        for top in TOP_LEVEL:
            shutil.rmtree(out / top, ignore_errors=True)
    for rel in generate(out):
        print(out / rel)


if __name__ == "__main__":
    main()
