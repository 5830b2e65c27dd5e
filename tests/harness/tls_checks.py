"""What TLS tests of the sidecar's clients share: rotating files the way Kubernetes does, and
checking that no certificate, key or secret leaked into what an operator sees."""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from tests.harness.sidecar import SidecarProc

PEM_MARKERS = ("-----BEGIN", "PRIVATE KEY", "CERTIFICATE-----")


def swap(link: Path, target: Path) -> None:
    """Points `link` at `target` in one rename, as the kubelet updates a mounted Secret (its
    files are symlinks through a `..data` link that is swapped like this)."""
    new = link.with_name(link.name + ".new")
    new.unlink(missing_ok=True)
    new.symlink_to(target)
    os.replace(new, link)


def assert_nothing_leaked(sidecar: SidecarProc, *files: Path, secrets: tuple[str, ...] = ()) -> None:
    """No PEM content (of `files`, or any) and none of `secrets` in `/readyz`, `/healthz` or the
    sidecar's log: only paths and the TLS library's reasons."""
    bodies = [str(sidecar.readyz()[1]), sidecar.proc.log_text()]
    with urllib.request.urlopen(f"{sidecar.ops_url}/healthz", timeout=5) as response:
        bodies.append(response.read().decode())
    contents = [line for file in files for line in file.read_text().splitlines() if "-----" not in line]
    for body in bodies:
        assert not any(marker in body for marker in PEM_MARKERS)
        assert not any(line in body for line in contents)
        assert not any(secret in body for secret in secrets)
