"""Each VM's QEMU as a locked-down userworld: an unprivileged user, no capabilities, no
new privileges, and a mount namespace in which another VM's disk does not exist."""

from __future__ import annotations

import pwd
import re
import subprocess
from pathlib import Path

import pytest

from .hostenv import TestHost

pytestmark = pytest.mark.functional


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _read_as_qemu(pid: int, path: Path) -> subprocess.CompletedProcess[bytes]:
    """Read ``path`` from inside QEMU ``pid``'s mount namespace, as QEMU's user."""
    st = _status(pid)
    uid, gid = st["Uid"].split()[0], st["Gid"].split()[0]
    argv = ["nsenter", "-t", str(pid), "-m", "-S", uid, "-G", gid, "--", "head", "-c", "512"]
    return subprocess.run([*argv, str(path)], capture_output=True, check=False)


def test_qemu_is_unprivileged_and_sees_only_its_own_files(host: TestHost) -> None:
    a = host.create("a", disk_mib=16)
    b = host.create("b", disk_mib=16)
    host.wait_ready("a")
    assert a.spec is not None and b.spec is not None and a.pid is not None
    user = pwd.getpwnam(host.config.isolation.user)
    st = _status(a.pid)
    assert st["Uid"].split() == [str(user.pw_uid)] * 4
    assert st["Gid"].split() == [str(user.pw_gid)] * 4
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[caps], 16) == 0, caps
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # QEMU's own -sandbox filter
    own = a.paths.resolve(a.spec.disks[0].path)
    other = b.paths.resolve(b.spec.disks[0].path)
    assert _read_as_qemu(a.pid, own).returncode == 0
    refused = _read_as_qemu(a.pid, other)
    assert refused.returncode != 0
    assert re.search(b"No such file|Permission denied", refused.stderr), refused.stderr
    # Nor the agent's own state (users, tokens, TLS key), which is hidden the same way.
    assert _read_as_qemu(a.pid, host.config.state_dir).returncode != 0
    # The host still sees everything, and the VM its own disk: it reads it in the guest.
    assert other.is_file()
    assert host.sh("a", "head -c 4096 /dev/vda | wc -c").strip() == "4096"
