"""cgroups against a fake cgroupfs: plain files in tmp_path, for the v1 and v2 layouts."""

from __future__ import annotations

import errno
import logging
import os
import uuid
from pathlib import Path

import pytest

from thinvisor.errors import BackendError, InvalidArgument, ThinvisorError
from thinvisor.host.engine import cgroups
from thinvisor.host.engine.cgroups import (
    CgroupLayout,
    CgroupSettings,
    CgroupsUnavailable,
    CgroupUsage,
    VmCgroup,
    cpu_weight,
    detect_layout,
    remove_stale,
)

VM = "0b6c1c52-8d1f-4c1e-9a57-3c7f0e4a2b11"

# This development machine's layout: v1 hierarchies, a unified tree without controllers.
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# systemd's v1 layout: cpu and cpuacct mounted together.
COMOUNTED = """\
25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
26 24 0:23 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
"""
PURE_V2 = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
V2_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc"

V1_FILES = {
    "cpu": ["cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.stat"],
    "cpuacct": ["cpuacct.usage"],
    "memory": ["memory.limit_in_bytes", "memory.soft_limit_in_bytes", "memory.usage_in_bytes"],
    "pids": ["pids.max"],
    "blkio": [],
}
V2_FILES = ["cpu.weight", "cpu.max", "cpu.stat", "memory.max", "memory.min", "memory.current"]
V2_FILES += ["pids.max", "cgroup.subtree_control"]


class FakeCgroupfs:
    """A cgroupfs as plain files: ``mkcg`` makes a cgroup with the kernel's files."""

    def __init__(self, root: Path, mountinfo: str, v2_controllers: str | None = None) -> None:
        """``v2_controllers``: /sys/fs/cgroup is a pure v2 tree offering these."""
        self.root = root
        self.mountinfo = root / "mountinfo"
        self.mountinfo.write_text(mountinfo)
        base = root / "sys/fs/cgroup"
        for name in ("cpu", "cpuacct", "cpu,cpuacct", "memory", "pids", "blkio", "unified"):
            (base / name).mkdir(parents=True)
        (base / "unified/cgroup.controllers").write_text("hugetlb\n")
        if v2_controllers is not None:
            (base / "cgroup.controllers").write_text(v2_controllers + "\n")
            (base / "cgroup.subtree_control").write_text("")

    def layout(self) -> CgroupLayout:
        return detect_layout(self.mountinfo, root=self.root)

    def mkcg(self, layout: CgroupLayout, relative: str) -> None:
        if layout.version == 2:
            self._files(layout.hierarchies()[0] / relative, V2_FILES)
            return
        for controller, mount in layout.mounts.items():
            self._files(mount / relative, V1_FILES[controller])

    @staticmethod
    def _files(directory: Path, names: list[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in [*names, "cgroup.procs"]:
            (directory / name).touch()


@pytest.fixture
def v1(tmp_path: Path) -> FakeCgroupfs:
    return FakeCgroupfs(tmp_path, HYBRID)


@pytest.fixture
def v2(tmp_path: Path) -> FakeCgroupfs:
    return FakeCgroupfs(tmp_path, PURE_V2, V2_CONTROLLERS)


def _ready(fs: FakeCgroupfs) -> VmCgroup:
    """A VM cgroup as the kernel would show it after ``create``."""
    layout = fs.layout()
    fs.mkcg(layout, "thinvisor")
    cg = VmCgroup(layout, VM)
    cg.create()
    fs.mkcg(layout, f"thinvisor/{VM}")
    return cg


def _files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in directory.iterdir() if p.is_file()}


# Layout detection


def test_hybrid_uses_v1_since_the_unified_tree_has_no_controllers(v1: FakeCgroupfs) -> None:
    layout = v1.layout()
    base = v1.root / "sys/fs/cgroup"
    assert layout.version == 1
    assert dict(layout.mounts) == {
        c: base / c for c in ("cpu", "cpuacct", "memory", "pids", "blkio")
    }
    assert "cpuset" not in layout.controllers
    assert str(layout).startswith("cgroup v1 (cpu at ")


def test_comounted_v1_hierarchies_are_one_tree(tmp_path: Path) -> None:
    layout = FakeCgroupfs(tmp_path, COMOUNTED).layout()
    both = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    assert layout.mounts["cpu"] == layout.mounts["cpuacct"] == both
    assert layout.hierarchies() == (both, tmp_path / "sys/fs/cgroup/memory")
    assert layout.controllers == {"cpu", "cpuacct", "memory"}


def test_pure_v2(v2: FakeCgroupfs) -> None:
    layout = v2.layout()
    assert layout.version == 2
    assert layout.controllers == {"cpu", "memory", "pids", "io"}
    assert layout.hierarchies() == (v2.root / "sys/fs/cgroup",)
    assert str(layout) == f"cgroup v2 at {v2.root}/sys/fs/cgroup (cpu, io, memory, pids)"


def test_v2_without_memory_and_no_v1_is_unavailable(tmp_path: Path) -> None:
    fs = FakeCgroupfs(tmp_path, PURE_V2, "cpu io pids")
    with pytest.raises(CgroupsUnavailable) as caught:
        fs.layout()
    message = str(caught.value)
    assert "offers cpu io pids" in message
    assert "cgroup v1 lacks the cpu, cpuacct, memory hierarchies" in message


def test_no_mountinfo_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(CgroupsUnavailable, match=r"cannot read .*nowhere"):
        detect_layout(tmp_path / "nowhere")


def test_mount_points_are_unescaped(tmp_path: Path) -> None:
    (tmp_path / "my cg").mkdir()
    (tmp_path / "my cg/cgroup.controllers").write_text("cpu memory\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("30 22 0:26 / /my\\040cg rw - cgroup2 cgroup2 rw\n")
    layout = detect_layout(mountinfo, root=tmp_path)
    assert layout.hierarchies() == (tmp_path / "my cg",)


# Settings


@pytest.mark.parametrize(
    ("shares", "weight"),
    [(1000, 100), (500, 50), (2000, 200), (1, 1), (4, 1), (15, 2), (1_000_000, 10_000)],
)
def test_cpu_weight_of_shares(shares: int, weight: int) -> None:
    assert cpu_weight(shares) == weight


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cpu_shares": 0}, "cpu_shares"),
        ({"cpu_shares": True}, "cpu_shares"),
        ({"cpu_quota_cores": 0.0}, "cpu_quota_cores"),
        ({"cpu_quota_cores": 0.005}, "cpu_quota_cores"),
        ({"cpu_quota_cores": float("inf")}, "cpu_quota_cores"),
        ({"cpu_quota_cores": float("nan")}, "cpu_quota_cores"),
        ({"memory_max_bytes": 0}, "memory_max_bytes"),
        ({"memory_min_bytes": -1}, "memory_min_bytes"),
        ({"memory_min_bytes": 2 << 20, "memory_max_bytes": 1 << 20}, "memory_min_bytes"),
        ({"pids_max": 0}, "pids_max"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        CgroupSettings(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_v2_create_enables_the_controllers_in_the_ancestors(v2: FakeCgroupfs) -> None:
    layout = v2.layout()
    root = layout.hierarchies()[0]
    (root / "cgroup.subtree_control").write_text("cpu memory\n")
    parent = "pool/thinvisor"
    v2.mkcg(layout, "pool")
    v2.mkcg(layout, parent)
    (root / "pool/cgroup.subtree_control").write_text("cpu io memory pids\n")
    VmCgroup(layout, VM, parent=parent).create()
    # Only what is missing is asked for; a level that has them all is left alone.
    assert (root / "cgroup.subtree_control").read_text() == "+io +pids"
    assert (root / "pool/cgroup.subtree_control").read_text() == "cpu io memory pids\n"
    assert (root / parent / "cgroup.subtree_control").read_text() == "+cpu +io +memory +pids"
    assert (root / parent / VM).is_dir()


def test_v1_create_makes_the_cgroup_in_every_hierarchy(v1: FakeCgroupfs) -> None:
    layout = v1.layout()
    cg = VmCgroup(layout, VM)
    assert not cg.exists()
    cg.create()
    cg.create()  # again: nothing happens
    assert cg.exists()
    assert all((m / "thinvisor" / VM).is_dir() for m in layout.mounts.values())
    assert not (v1.root / "sys/fs/cgroup/unified/thinvisor").exists()


def test_v2_apply(v2: FakeCgroupfs) -> None:
    cg = _ready(v2)
    cg.apply(
        CgroupSettings(
            cpu_shares=2000,
            cpu_quota_cores=1.5,
            memory_max_bytes=512 << 20,
            memory_min_bytes=256 << 20,
            pids_max=128,
        )
    )
    written = _files(cg.path("cpu"))
    assert written["cpu.weight"] == "200"
    assert written["cpu.max"] == "150000 100000"
    assert written["memory.max"] == str(512 << 20)
    assert written["memory.min"] == str(256 << 20)
    assert written["pids.max"] == "128"


def test_v2_apply_unlimited(v2: FakeCgroupfs) -> None:
    cg = _ready(v2)
    cg.apply(CgroupSettings())
    written = _files(cg.path("cpu"))
    assert written["cpu.weight"] == "100"
    assert written["cpu.max"] == "max 100000"
    assert (written["memory.max"], written["memory.min"], written["pids.max"]) == (
        "max",
        "0",
        "max",
    )


def test_v1_apply(v1: FakeCgroupfs) -> None:
    cg = _ready(v1)
    cg.apply(
        CgroupSettings(
            cpu_shares=500,
            cpu_quota_cores=0.25,
            memory_max_bytes=1 << 30,
            memory_min_bytes=1 << 29,
            pids_max=64,
        )
    )
    cpu = _files(cg.path("cpu"))
    assert (cpu["cpu.shares"], cpu["cpu.cfs_period_us"], cpu["cpu.cfs_quota_us"]) == (
        "500",
        "100000",
        "25000",
    )
    memory = _files(cg.path("memory"))
    assert memory["memory.limit_in_bytes"] == str(1 << 30)
    assert memory["memory.soft_limit_in_bytes"] == str(1 << 29)
    assert _files(cg.path("pids"))["pids.max"] == "64"


def test_v1_apply_unlimited_and_clamped_shares(v1: FakeCgroupfs) -> None:
    cg = _ready(v1)
    cg.apply(CgroupSettings(cpu_shares=1_000_000))
    cpu = _files(cg.path("cpu"))
    assert (cpu["cpu.shares"], cpu["cpu.cfs_quota_us"]) == ("262144", "-1")
    memory = _files(cg.path("memory"))
    assert (memory["memory.limit_in_bytes"], memory["memory.soft_limit_in_bytes"]) == ("-1", "0")
    assert _files(cg.path("pids"))["pids.max"] == "max"  # v1 refuses -1 here
    cg.apply(CgroupSettings(cpu_shares=1))
    assert _files(cg.path("cpu"))["cpu.shares"] == "2"


def test_apply_skips_a_missing_pids_controller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs = FakeCgroupfs(tmp_path, PURE_V2, "cpu memory")
    cg = _ready(fs)
    with caplog.at_level(logging.WARNING, logger=cgroups.__name__):
        cg.apply(CgroupSettings())
        assert not caplog.records
        cg.apply(CgroupSettings(pids_max=10))
    assert "no pids controller, pids_max not applied" in caplog.text
    assert _files(cg.path("cpu"))["pids.max"] == ""


def test_apply_to_a_missing_cgroup_names_the_file(v2: FakeCgroupfs) -> None:
    cg = VmCgroup(v2.layout(), VM)
    with pytest.raises(BackendError, match=f"cannot write '100' to .*/thinvisor/{VM}/cpu.weight"):
        cg.apply(CgroupSettings())


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.EINVAL, InvalidArgument),
        (errno.EBUSY, InvalidArgument),
        (errno.ENOENT, BackendError),
        (errno.EACCES, BackendError),
    ],
)
def test_write_errors_become_thinvisor_errors(code: int, kind: type[ThinvisorError]) -> None:
    path = Path("/sys/fs/cgroup/memory/thinvisor/x/memory.limit_in_bytes")
    exc = OSError(code, os.strerror(code))
    error = cgroups._error("write '1' to", path, exc, "memory_max_bytes")
    assert isinstance(error, kind)
    assert str(error).endswith(f"cannot write '1' to {path}: {os.strerror(code)}")
    if isinstance(error, InvalidArgument):
        assert error.field == "memory_max_bytes"
    # Without a field (cgroup.procs, subtree_control) it is the backend's failure.
    assert isinstance(cgroups._error("write '1' to", path, exc), BackendError)


# Processes, usage, removal


@pytest.mark.parametrize(("mountinfo", "count"), [(HYBRID, 5), (PURE_V2, 1)])
def test_procs_files_and_attach(tmp_path: Path, mountinfo: str, count: int) -> None:
    cg = _ready(FakeCgroupfs(tmp_path, mountinfo, V2_CONTROLLERS))
    files = cg.procs_files()
    assert len(files) == count
    assert all(f.name == "cgroup.procs" and f.parent.name == VM for f in files)
    cg.attach(4242)
    assert [f.read_text() for f in files] == ["4242"] * count
    assert cg.pids() == {4242}


def test_usage_v2(v2: FakeCgroupfs) -> None:
    cg = _ready(v2)
    stat = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 40\n"
    (cg.path("cpu") / "cpu.stat").write_text(stat + "nr_throttled 7\nthrottled_usec 2500\n")
    (cg.path("memory") / "memory.current").write_text("4096\n")
    assert cg.usage() == CgroupUsage(1_500_000, 2_500_000, 7, 4096)


def test_usage_v2_without_throttling_figures(v2: FakeCgroupfs) -> None:
    cg = _ready(v2)
    (cg.path("cpu") / "cpu.stat").write_text("usage_usec 3\nuser_usec 2\nsystem_usec 1\n")
    (cg.path("memory") / "memory.current").write_text("0\n")
    assert cg.usage() == CgroupUsage(3000, 0, 0, 0)


def test_usage_v1(v1: FakeCgroupfs) -> None:
    cg = _ready(v1)
    stat = "nr_periods 10\nnr_throttled 3\nthrottled_time 123456\n"
    (cg.path("cpu") / "cpu.stat").write_text(stat)
    (cg.path("cpuacct") / "cpuacct.usage").write_text("987654321\n")
    (cg.path("memory") / "memory.usage_in_bytes").write_text("8192\n")
    assert cg.usage() == CgroupUsage(987_654_321, 123_456, 3, 8192)


def test_usage_of_garbage_is_a_backend_error(v1: FakeCgroupfs) -> None:
    cg = _ready(v1)
    (cg.path("cpuacct") / "cpuacct.usage").write_text("lots\n")
    with pytest.raises(BackendError, match=r"unexpected content in .*cpuacct\.usage"):
        cg.usage()


def test_remove(v1: FakeCgroupfs) -> None:
    layout = v1.layout()
    cg = VmCgroup(layout, VM)
    cg.remove()  # nothing there: fine
    cg.create()
    cg.path("pids").rmdir()  # one already gone: fine
    cg.remove()
    assert not cg.exists()
    assert all((m / "thinvisor").is_dir() for m in layout.mounts.values())


def test_remove_refuses_while_processes_are_inside(v2: FakeCgroupfs) -> None:
    cg = _ready(v2)
    (cg.path("cpu") / "cgroup.procs").write_text("17\n23\n")
    with pytest.raises(BackendError, match=f"thinvisor/{VM} still holds pids 17 23"):
        cg.remove()
    assert cg.exists()


def test_remove_stale(v1: FakeCgroupfs) -> None:
    layout = v1.layout()
    running, gone, busy = (str(uuid.UUID(int=n)) for n in (1, 2, 3))
    for vm_id in (running, gone, busy):
        VmCgroup(layout, vm_id).create()
    (layout.mounts["memory"] / "thinvisor" / busy / "cgroup.procs").write_text("99\n")
    (layout.mounts["cpu"] / "thinvisor" / "not-a-vm").mkdir()
    assert remove_stale(layout, running={running}) == [gone]
    assert VmCgroup(layout, running).exists()
    assert not VmCgroup(layout, gone).exists()
    assert VmCgroup(layout, busy).exists()
    assert (layout.mounts["cpu"] / "thinvisor" / "not-a-vm").is_dir()


def test_remove_stale_without_a_parent(v2: FakeCgroupfs) -> None:
    assert remove_stale(v2.layout(), running=()) == []


@pytest.mark.parametrize("vm_id", ["", "vm1", "../x", VM.upper(), f"{VM}/x"])
def test_vm_id_must_be_a_uuid(v2: FakeCgroupfs, vm_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        VmCgroup(v2.layout(), vm_id)
    assert caught.value.field == "vm_id"


@pytest.mark.parametrize("parent", ["", "/thinvisor", "../x", "a/../b", "a/./b"])
def test_parent_must_be_a_relative_path(v2: FakeCgroupfs, parent: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        VmCgroup(v2.layout(), VM, parent=parent)
    assert caught.value.field == "parent"
