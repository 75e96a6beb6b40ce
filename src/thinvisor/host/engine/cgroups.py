"""A VM's cgroups: its QEMU's share of the host's CPU, memory and process table.

Each VM's QEMU runs in the cgroup ``<parent>/<vm uuid>`` (parent ``thinvisor``) of every
hierarchy used here, entered before QEMU is exec'd, so QEMU never runs outside it. Two
layouts are supported, found in ``/proc/self/mountinfo``:

- cgroup v2: one unified tree, used when it offers the cpu and memory controllers (pids
  and io too when present). The controllers are enabled in the ``cgroup.subtree_control``
  of the VM cgroup's ancestors, which therefore hold no processes themselves (v2's
  no-internal-process rule).
- cgroup v1: one tree per controller, for cpu, cpuacct and memory (pids and blkio when
  present), as on hosts whose unified tree has no controllers (a hybrid layout).

ESXi's controls map onto the kernel's: shares to ``cpu.weight`` (1000 shares, ESXi's
normal per vCPU, is v2's default weight 100) or ``cpu.shares``, a limit to a CFS quota
per 100 ms, the memory limit to ``memory.max`` / ``memory.limit_in_bytes`` and the
memory reservation to ``memory.min`` / ``memory.soft_limit_in_bytes``.

The files here are the kernel's pseudo-files: reading and writing them is quick but
blocking; ``VmCgroup.remove`` may wait up to a second for exiting processes to leave.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from thinvisor.errors import BackendError, InvalidArgument, ThinvisorError

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
DEFAULT_PARENT = "thinvisor"
CPU_PERIOD_US = 100_000
#: The kernel refuses a CFS quota below 1 ms: 0.01 of a core per 100 ms period.
MIN_QUOTA_CORES = 0.01
V1_SHARES_MIN, V1_SHARES_MAX = 2, 262_144
V2_WEIGHT_MIN, V2_WEIGHT_MAX = 1, 10_000

_V2_CONTROLLERS = ("cpu", "memory", "pids", "io")
_V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio")
_REQUIRED = {1: ("cpu", "cpuacct", "memory"), 2: ("cpu", "memory")}
_RMDIR_WAIT_S = 1.0
_ESCAPE_RE = re.compile(r"\\([0-7]{3})")


class CgroupsUnavailable(BackendError):
    """The host offers no cgroups thinvisor can use: VMs run without resource controls."""


@dataclass(frozen=True)
class CgroupSettings:
    """What the kernel enforces for one VM; None is unlimited."""

    cpu_shares: int = 1000
    cpu_quota_cores: float | None = None
    memory_max_bytes: int | None = None
    memory_min_bytes: int = 0
    pids_max: int | None = None

    def __post_init__(self) -> None:
        _check_int("cpu_shares", self.cpu_shares, 1)
        _check_int("memory_min_bytes", self.memory_min_bytes, 0)
        if self.memory_max_bytes is not None:
            _check_int("memory_max_bytes", self.memory_max_bytes, 1)
            if self.memory_min_bytes > self.memory_max_bytes:
                raise InvalidArgument("memory_min_bytes", "must not exceed memory_max_bytes")
        if self.pids_max is not None:
            _check_int("pids_max", self.pids_max, 1)
        quota = self.cpu_quota_cores
        if quota is not None and not (
            isinstance(quota, int | float)
            and not isinstance(quota, bool)
            and math.isfinite(quota)
            and quota >= MIN_QUOTA_CORES
        ):
            raise InvalidArgument("cpu_quota_cores", f"must be a number >= {MIN_QUOTA_CORES}")


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(field, f"must be an integer >= {minimum}, not {value!r}")


@dataclass(frozen=True)
class CgroupUsage:
    """What a VM's cgroup has used: CPU since it was created, memory now."""

    cpu_ns: int
    throttled_ns: int
    throttled_count: int  # CFS periods in which the quota stopped the VM
    memory_bytes: int


@dataclass(frozen=True)
class CgroupLayout:
    """The cgroup hierarchies in use: ``mounts`` maps each controller to its tree's root."""

    version: Literal[1, 2]
    mounts: Mapping[str, Path]

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(self.mounts)

    def hierarchies(self) -> tuple[Path, ...]:
        """Each tree once (v1 may mount several controllers together)."""
        return tuple(dict.fromkeys(self.mounts.values()))

    def __str__(self) -> str:
        if self.version == 2:
            names = ", ".join(sorted(self.mounts))
            return f"cgroup v2 at {self.hierarchies()[0]} ({names})"
        return "cgroup v1 (" + ", ".join(f"{c} at {p}" for c, p in self.mounts.items()) + ")"


@dataclass(frozen=True)
class _Mount:
    fstype: str
    point: Path
    options: frozenset[str]


def detect_layout(mountinfo: Path = MOUNTINFO, root: Path = Path("/")) -> CgroupLayout:
    """The cgroups to use: v2 when it has the cpu and memory controllers, else v1.

    Mount points in ``mountinfo`` are looked up below ``root``. Raises
    ``CgroupsUnavailable`` saying what is missing.
    """
    try:
        text = mountinfo.read_text()
    except OSError as exc:
        raise CgroupsUnavailable(f"cannot read {mountinfo}: {exc.strerror}") from exc
    mounts = _cgroup_mounts(text, root)
    unified = [(m.point, _v2_controllers(m.point)) for m in mounts if m.fstype == "cgroup2"]
    for point, available in unified:
        if set(_REQUIRED[2]) <= available:
            return CgroupLayout(2, {c: point for c in _V2_CONTROLLERS if c in available})
    v1: dict[str, Path] = {}
    for m in mounts:
        if m.fstype == "cgroup":
            for controller in m.options.intersection(_V1_CONTROLLERS):
                v1.setdefault(controller, m.point)
    if set(_REQUIRED[1]) <= set(v1):
        return CgroupLayout(1, {c: v1[c] for c in _V1_CONTROLLERS if c in v1})
    raise CgroupsUnavailable(_unavailable_reason(unified, v1))


def _cgroup_mounts(mountinfo: str, root: Path) -> list[_Mount]:
    mounts = []
    for line in mountinfo.splitlines():
        fields_ = line.split()
        if "-" not in fields_:
            continue
        sep = fields_.index("-")
        fstype = fields_[sep + 1]
        if fstype in ("cgroup", "cgroup2") and len(fields_) > sep + 3:
            point = _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), fields_[4])
            options = frozenset(fields_[sep + 3].split(","))
            mounts.append(_Mount(fstype, root / point.lstrip("/"), options))
    return mounts


def _v2_controllers(point: Path) -> set[str]:
    try:
        return set((point / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _unavailable_reason(unified: list[tuple[Path, set[str]]], v1: Mapping[str, Path]) -> str:
    if unified:
        v2 = "; ".join(
            f"cgroup v2 at {p} offers {' '.join(sorted(c)) or 'no controllers'}" for p, c in unified
        )
    else:
        v2 = "no cgroup v2 mounted"
    missing = ", ".join(c for c in _REQUIRED[1] if c not in v1)
    return (
        f"no usable cgroups: {v2} (cpu and memory needed); "
        f"cgroup v1 lacks the {missing} hierarchies"
    )


@dataclass(frozen=True)
class _Write:
    controller: str
    file: str
    value: str
    field: str


def _quota_us(cores: float | None) -> str | None:
    return None if cores is None else str(round(cores * CPU_PERIOD_US))


def _or(value: int | None, unlimited: str) -> str:
    return unlimited if value is None else str(value)


def cpu_weight(shares: int) -> int:
    """v2's ``cpu.weight`` for ESXi-style shares: 1000 shares is the default weight 100."""
    return min(max(round(shares / 10), V2_WEIGHT_MIN), V2_WEIGHT_MAX)


def _v2_writes(s: CgroupSettings) -> list[_Write]:
    quota = _quota_us(s.cpu_quota_cores) or "max"
    return [
        _Write("cpu", "cpu.weight", str(cpu_weight(s.cpu_shares)), "cpu_shares"),
        _Write("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}", "cpu_quota_cores"),
        _Write("memory", "memory.max", _or(s.memory_max_bytes, "max"), "memory_max_bytes"),
        _Write("memory", "memory.min", str(s.memory_min_bytes), "memory_min_bytes"),
        _Write("pids", "pids.max", _or(s.pids_max, "max"), "pids_max"),
    ]


def _v1_writes(s: CgroupSettings) -> list[_Write]:
    shares = min(max(s.cpu_shares, V1_SHARES_MIN), V1_SHARES_MAX)
    limit = _or(s.memory_max_bytes, "-1")
    return [
        _Write("cpu", "cpu.shares", str(shares), "cpu_shares"),
        # The period first: the kernel checks the quota against the period it has.
        _Write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US), "cpu_quota_cores"),
        _Write("cpu", "cpu.cfs_quota_us", _quota_us(s.cpu_quota_cores) or "-1", "cpu_quota_cores"),
        _Write("memory", "memory.limit_in_bytes", limit, "memory_max_bytes"),
        # Under memory pressure the kernel reclaims first from cgroups above this.
        _Write("memory", "memory.soft_limit_in_bytes", str(s.memory_min_bytes), "memory_min_bytes"),
        # v1's pids.max takes "max", like v2's, and refuses -1.
        _Write("pids", "pids.max", _or(s.pids_max, "max"), "pids_max"),
    ]


class VmCgroup:
    """The cgroup ``<parent>/<vm_id>`` of one VM, in every hierarchy of ``layout``."""

    def __init__(self, layout: CgroupLayout, vm_id: str, parent: str = DEFAULT_PARENT) -> None:
        self.layout = layout
        self.vm_id = _checked_vm_id(vm_id)
        self.parent = _checked_parent(parent)

    def __repr__(self) -> str:
        return f"VmCgroup({self.parent}/{self.vm_id}, {self.layout})"

    def path(self, controller: str) -> Path:
        """The VM's cgroup directory in ``controller``'s hierarchy."""
        mount = self.layout.mounts.get(controller)
        if mount is None:
            raise BackendError(f"no {controller} controller in {self.layout}")
        return mount / self.parent / self.vm_id

    def dirs(self) -> tuple[Path, ...]:
        return tuple(h / self.parent / self.vm_id for h in self.layout.hierarchies())

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs())

    def create(self) -> None:
        """Create the VM's cgroups (and the parent's); nothing happens if they exist."""
        if self.layout.version == 2:
            self._enable_controllers()
        for d in self.dirs():
            _mkdir(d)

    def _enable_controllers(self) -> None:
        # Each ancestor of the VM's cgroup must pass the controllers down to its children.
        root = self.layout.hierarchies()[0]
        parts = PurePosixPath(self.parent).parts
        wanted = sorted(self.layout.controllers)
        for depth in range(len(parts) + 1):
            level = root.joinpath(*parts[:depth])
            _mkdir(level)
            control = level / "cgroup.subtree_control"
            missing = [c for c in wanted if c not in _read(control).split()]
            if missing:
                _write(control, " ".join(f"+{c}" for c in missing))

    def apply(self, settings: CgroupSettings) -> None:
        """Set the VM's controls; on a running VM too, taking effect at once."""
        writes = _v2_writes(settings) if self.layout.version == 2 else _v1_writes(settings)
        for w in writes:
            if w.controller not in self.layout.controllers:
                if getattr(settings, w.field) is not None:
                    log.warning("%s: no %s controller, %s not applied", self, w.controller, w.field)
                continue
            _write(self.path(w.controller) / w.file, w.value, w.field)

    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its pid to, to enter the cgroups."""
        return [d / "cgroup.procs" for d in self.dirs()]

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the VM's cgroups."""
        for procs in self.procs_files():
            _write(procs, str(pid))

    def pids(self) -> set[int]:
        """The processes in the VM's cgroups."""
        found: set[int] = set()
        for procs in self.procs_files():
            try:
                found.update(int(p) for p in _read(procs).split())
            except _Missing:
                continue
        return found

    def usage(self) -> CgroupUsage:
        """CPU time used (and throttled) since the cgroup was created; memory in use."""
        stat = _read_stat(self.path("cpu") / "cpu.stat")
        if self.layout.version == 2:
            return CgroupUsage(
                cpu_ns=stat.get("usage_usec", 0) * 1000,
                throttled_ns=stat.get("throttled_usec", 0) * 1000,
                throttled_count=stat.get("nr_throttled", 0),
                memory_bytes=_read_int(self.path("memory") / "memory.current"),
            )
        return CgroupUsage(
            cpu_ns=_read_int(self.path("cpuacct") / "cpuacct.usage"),
            throttled_ns=stat.get("throttled_time", 0),
            throttled_count=stat.get("nr_throttled", 0),
            memory_bytes=_read_int(self.path("memory") / "memory.usage_in_bytes"),
        )

    def remove(self) -> None:
        """Remove the VM's cgroups, which must hold no processes; missing ones are fine."""
        if pids := self.pids():
            listed = " ".join(str(p) for p in sorted(pids))
            raise BackendError(f"cgroup {self.parent}/{self.vm_id} still holds pids {listed}")
        for d in self.dirs():
            _rmdir(d)


def remove_stale(
    layout: CgroupLayout, running: Collection[str], parent: str = DEFAULT_PARENT
) -> list[str]:
    """Remove the empty cgroups of VMs not in ``running``; return their VM ids, sorted.

    For the agent's start. A cgroup that still holds processes is kept, with a warning.
    """
    parent = _checked_parent(parent)
    found: set[str] = set()
    for h in layout.hierarchies():
        with_parent = h / parent
        if with_parent.is_dir():
            found.update(d.name for d in with_parent.iterdir() if d.is_dir() and _is_uuid(d.name))
    removed = []
    for vm_id in sorted(found - set(running)):
        try:
            VmCgroup(layout, vm_id, parent).remove()
        except BackendError as exc:
            log.warning("stale cgroup kept: %s", exc)
            continue
        removed.append(vm_id)
    return removed


def _is_uuid(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def _checked_vm_id(vm_id: str) -> str:
    if not _is_uuid(vm_id):
        raise InvalidArgument("vm_id", f"must be a UUID in canonical form, not {vm_id!r}")
    return vm_id


def _checked_parent(parent: str) -> str:
    path = PurePosixPath(parent)
    if not parent or path.is_absolute() or any(p in (".", "..") for p in parent.split("/")):
        raise InvalidArgument("parent", f"must be a relative cgroup path, not {parent!r}")
    return str(path)


class _Missing(BackendError):
    """A cgroup file that is not there (the cgroup, or the kernel's setting)."""


def _error(action: str, path: Path, exc: OSError, field: str | None = None) -> ThinvisorError:
    """One line naming the file; a value the kernel refuses is the caller's field's fault."""
    message = f"cannot {action} {path}: {exc.strerror or exc}"
    if field is not None and exc.errno in (errno.EINVAL, errno.EBUSY, errno.ERANGE):
        return InvalidArgument(field, message)
    if exc.errno == errno.ENOENT:
        return _Missing(message)
    return BackendError(message)


def _write(path: Path, value: str, field: str | None = None) -> None:
    # One write(2) of the whole value, as the kernel parses each write on its own; no
    # O_CREAT: a missing file is a missing cgroup or setting, never one to make.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise _error(f"write {value!r} to", path, exc, field) from exc


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise _error("read", path, exc) from exc


def _read_int(path: Path) -> int:
    text = _read(path).strip()
    try:
        return int(text)
    except ValueError as exc:
        raise BackendError(f"unexpected content in {path}: {text[:40]!r}") from exc


def _read_stat(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file: ``name value`` lines."""
    stat = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            stat[key] = int(value)
    return stat


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CgroupsUnavailable(f"cannot create cgroup {path}: {exc.strerror}") from exc
        raise _error("create cgroup", path, exc) from exc


def _rmdir(path: Path) -> None:
    # A process that just exited may stay counted in its cgroup for a moment.
    deadline = time.monotonic() + _RMDIR_WAIT_S
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _error("remove cgroup", path, exc) from exc
        time.sleep(0.01)
