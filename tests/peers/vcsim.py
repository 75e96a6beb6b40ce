"""govmomi's vSphere simulator (a vCenter with a datacenter, a cluster, hosts and VMs) for tests.

Debian ships the simulator as a Go library; ``vcsim/main.go`` beside this file serves it.
``binary()`` builds that program offline with Debian's Go (GOPATH mode, no modules) into
``build/vcsim/``, once per version of the source: the file name carries the source's hash.
``make test`` builds it first (``python -m tests.peers.vcsim``); a test run without it
builds it on first use (about 20 s).

``Vcsim.start()`` runs one simulator on a loopback port the server picks itself, with a
fresh self-signed certificate whose fingerprint it reports, and datastores in a temporary
directory; ``stop()`` ends it by pid and removes the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().parent / "vcsim"
BUILD_DIR = ROOT / "build" / "vcsim"
DEBIAN_GOPATH = Path("/usr/share/gocode")
BUILD_TIMEOUT_S = 600
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10


def binary() -> Path:
    """The simulator program for the current source, built first where missing."""
    digest = hashlib.sha256((SOURCE / "main.go").read_bytes()).hexdigest()[:16]
    target = BUILD_DIR / f"vcsim-{digest}"
    if target.exists():
        return target
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with (BUILD_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions building at once make one binary
        if not target.exists():
            _build(target)
    return target


def _build(target: Path) -> None:
    if shutil.which("go") is None or not (DEBIAN_GOPATH / "src/github.com/vmware").is_dir():
        raise RuntimeError(
            "the vSphere simulator needs golang-go and golang-github-vmware-govmomi-dev"
        )
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{BUILD_DIR / 'gopath'}:{DEBIAN_GOPATH}",
        "GOCACHE": str(BUILD_DIR / "gocache"),
        "GOFLAGS": "",
    }
    partial = target.with_suffix(".partial")
    done = subprocess.run(
        ["go", "build", "-o", str(partial), "."],
        check=False,
        cwd=SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the vSphere simulator failed:\n{done.stderr}")
    partial.replace(target)
    for old in BUILD_DIR.glob("vcsim-*"):
        if old != target:
            old.unlink(missing_ok=True)


@dataclass
class Vcsim:
    """A running simulator: its ``address`` (``https://127.0.0.1:PORT``) and certificate."""

    process: subprocess.Popen[bytes]
    address: str
    fingerprint: str
    tmpdir: Path

    @classmethod
    def start(
        cls, username: str, password: str, machines: int = 2, *, namespace: str | None = None
    ) -> Vcsim:
        """A new simulator accepting only ``username`` with ``password``, with ``machines``
        VMs on its standalone host and as many in its cluster; on the loopback of the
        network namespace ``namespace`` if given (``ip netns exec`` execs it: same pid)."""
        tmpdir = Path(tempfile.mkdtemp(prefix="thinvisor-vcsim-"))
        inside = ["ip", "netns", "exec", namespace] if namespace else []
        argv = [*inside, str(binary()), "-listen", "127.0.0.1:0", "-machines", str(machines),
                "-username", username, "-password", password]  # fmt: skip
        log = (tmpdir / "vcsim.log").open("wb")
        # TMPDIR: the simulator makes its datastores' directories there.
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=log, env={**os.environ, "TMPDIR": str(tmpdir)}
        )
        log.close()
        try:
            ready = _ready_line(process, tmpdir)
        except BaseException:
            _end(process)
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        address = ready["url"].removesuffix("/sdk")
        return cls(process, address, ready["fingerprint"], tmpdir)

    def stop(self) -> None:
        """End the simulator (by pid) and remove its directory; safe to call twice."""
        _end(self.process)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _ready_line(process: subprocess.Popen[bytes], tmpdir: Path) -> dict[str, str]:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
    line = process.stdout.readline() if readable else b""
    if not line:
        log = (tmpdir / "vcsim.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the vSphere simulator did not start:\n{log}")
    ready: dict[str, str] = json.loads(line)
    return ready


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def running(username: str, password: str, machines: int = 2) -> Iterator[Vcsim]:
    """A simulator for the ``with`` block."""
    sim = Vcsim.start(username, password, machines)
    try:
        yield sim
    finally:
        sim.stop()


if __name__ == "__main__":
    print(binary())
