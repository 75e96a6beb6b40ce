"""Waiting for a QEMU process to end (any process will do here)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from thinvisor.host.engine import process
from thinvisor.host.engine.paths import VmPaths


def _sleeper(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_wait_gone_sees_the_exit(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "vm", tmp_path / "run")
    child = _sleeper(0.3)
    try:
        assert asyncio.run(process.wait_gone(paths, child.pid, 30))
    finally:
        child.wait()
    # Gone before the wait begins.
    assert asyncio.run(process.wait_gone(paths, child.pid, 1))


def test_wait_gone_times_out_while_it_runs(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "vm", tmp_path / "run")
    child = _sleeper(30)
    try:
        assert not asyncio.run(process.wait_gone(paths, child.pid, 0.2))
    finally:
        child.kill()
        child.wait()
