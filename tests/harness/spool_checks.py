"""Checks of a running sidecar's usage spool from the outside: what it reports in `/readyz`
against the segment files on disk.

Once the sidecar is idle (nothing queued, nothing being written or deleted), the bytes the spool
accounts for must equal the sizes of its segment files, and it must know every file: a segment
it forgot stays on disk for ever (and is replayed at the next start), and one it counts that is
not on disk means its accounting has drifted. The spool is idle only eventually (the writer
deletes settled segments on its next batch), so tests call `wait_spool_accounted`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.harness.procs import wait_until
from tests.harness.sidecar import readyz

SEGMENT_SUFFIX = ".seg"


def segment_files(spool_dir: Path) -> dict[str, int]:
    """name -> size of the spool's segment files (named by their first sequence)."""
    return {path.name: path.stat().st_size for path in sorted(spool_dir.glob(f"*{SEGMENT_SUFFIX}"))
            if path.stem.isdigit()}


def assert_spool_accounted(spool_dir: Path, usage_component: dict[str, Any]) -> None:
    """The spool's accounted bytes and segments (`/readyz` `components.usage.spool`, or the spool
    component itself) match the segment files in `spool_dir`."""
    spool: dict[str, Any] = usage_component.get("spool", usage_component)
    files = segment_files(spool_dir)
    assert spool["bytes"] == sum(files.values()), (
        f"the spool accounts for {spool['bytes']} bytes, its segment files hold {sum(files.values())}: {files}")
    assert spool["segments"] == len(files), f"the spool knows {spool['segments']} segments, on disk: {files}"


def usage_component(ops_url: str) -> dict[str, Any]:
    """`components.usage` of `/readyz` (whether the sidecar is ready or not)."""
    component: dict[str, Any] = readyz(ops_url)[1]["components"]["usage"]
    return component


def wait_spool_accounted(spool_dir: Path, ops_url: str, timeout: float = 30.0) -> None:
    """Waits (up to `timeout`) until the sidecar at `ops_url` is idle and its spool accounted
    (`assert_spool_accounted`); raises with the last mismatch otherwise."""

    def accounted() -> bool:
        component = usage_component(ops_url)
        if component.get("queued"):
            return False
        assert_spool_accounted(spool_dir, component)
        return True

    wait_until(accounted, timeout, what=f"the spool in {spool_dir} to match its accounting", interval=0.2)
