"""The jail's path arithmetic and file grants (no namespaces, no QEMU)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from thinvisor.host.engine import jail
from thinvisor.host.isolation import Identity, grant_file


def test_usage_errors_exit_2() -> None:
    assert jail.main(["bogus"]) == 2
    assert jail.main(["expose", "1", "/x", "maybe"]) == 2


def test_grants(tmp_path: Path) -> None:
    who = Identity(uid=4242, gid=4343, groups=())
    disk = tmp_path / "disk0.qcow2"
    disk.write_bytes(b"x")
    os.chmod(disk, 0o400)
    grant_file(disk, who, writable=True)
    st = disk.stat()
    assert (st.st_uid, st.st_gid) == (4242, 4343)
    assert stat.S_IMODE(st.st_mode) == 0o600
    # Read-only files keep their owner and get the group's read permission.
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"x")
    os.chmod(base, 0o600)
    grant_file(base, who, writable=False)
    st = base.stat()
    assert (st.st_uid, st.st_gid) == (0, 4343)
    assert stat.S_IMODE(st.st_mode) == 0o640
    # A file anyone may read is left as it is.
    iso = tmp_path / "os.iso"
    iso.write_bytes(b"x")
    os.chmod(iso, 0o644)
    grant_file(iso, who, writable=False)
    assert iso.stat().st_gid == 0
