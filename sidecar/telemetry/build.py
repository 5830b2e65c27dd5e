"""What build is running: the version, the git commit and the build time.

An image build sets `SIDECAR_BUILD_COMMIT` and `SIDECAR_BUILD_TIME` (see deploy/); a run from
a git checkout finds the commit itself. What is not known says "unknown", never a guess.
Shown by `sidecar version`, in `/healthz` and in the `sidecar_build_info` metric.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from sidecar import __version__

UNKNOWN = "unknown"


@functools.cache
def build_info() -> dict[str, str]:
    return {"version": __version__,
            "commit": os.environ.get("SIDECAR_BUILD_COMMIT") or _git_commit() or UNKNOWN,
            "build_time": os.environ.get("SIDECAR_BUILD_TIME") or UNKNOWN}


def _git_commit() -> str:
    """HEAD of the checkout the package runs from (an editable install), if it is one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
