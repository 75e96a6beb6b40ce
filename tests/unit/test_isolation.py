"""The jail's path arithmetic and file grants (no namespaces, no QEMU)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from thinvisor.config import DatastoreConfig, HostConfig, IsolationConfig
from thinvisor.host.engine import jail
from thinvisor.host.isolation import Identity, Isolation, grant_file
from thinvisor.storage.disk import Images


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


def test_per_vm_uids_are_distinct_and_kept(tmp_path: Path) -> None:
    config = HostConfig(
        state_dir=tmp_path / "state",
        datastores=[DatastoreConfig(name="ds", path=tmp_path / "ds")],
        isolation=IsolationConfig(per_vm_users=True, uid_base=3_000_000),
    )
    isolation = Isolation(config, Images("qemu-img"))
    first = isolation._vm_uid("0b6c3b1e-6f57-4e59-8a4c-3e2f5c9d8a11")
    second = isolation._vm_uid("6a0f5c2d-98e1-4b7e-9c55-1d2e3f4a5b6c")
    assert first == 3_000_000 and second == 3_000_001
    # Kept across agent restarts: a new Isolation reads the same table.
    again = Isolation(config, Images("qemu-img"))
    assert again._vm_uid("6a0f5c2d-98e1-4b7e-9c55-1d2e3f4a5b6c") == second
