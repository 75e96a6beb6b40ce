"""From a VM's resource controls (ESXi's terms) to what the kernel enforces (cgroups).

- CPU shares become the cgroup's weight; a CPU limit in MHz becomes a CFS quota of
  ``limit / core MHz`` cores. A CPU reservation has no kernel counterpart: admission
  control promises it, and the VM's shares defend it under contention.
- The memory reservation protects that much of QEMU's memory from reclaim. A memory limit
  is enforced twice: the balloon takes the guest down to the limit, and the cgroup caps
  QEMU at the limit plus QEMU's own overhead, as a backstop that never kills a VM whose
  guest is within its limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path

from thinvisor.errors import ThinvisorError
from thinvisor.host.engine.cgroups import (
    DEFAULT_PARENT,
    MIN_QUOTA_CORES,
    CgroupLayout,
    CgroupSettings,
    CgroupsUnavailable,
    CgroupUsage,
    VmCgroup,
    detect_layout,
    remove_stale,
)
from thinvisor.model.resources import cpu_shares
from thinvisor.model.vm import VmSpec

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: QEMU's own memory beyond the guest's (code, TCG's translation cache, I/O buffers).
QEMU_OVERHEAD_MIB = 256
#: QEMU's threads: vCPUs, I/O workers (up to 64 per pool), a few others; far from this.
PIDS_MAX = 2048


def cgroup_settings(spec: VmSpec, core_mhz: int) -> CgroupSettings:
    """What the VM's cgroup enforces for ``spec`` on a host whose cores run at ``core_mhz``."""
    r = spec.resources
    quota = None
    if r.cpu_limit_mhz is not None:
        quota = max(MIN_QUOTA_CORES, r.cpu_limit_mhz / core_mhz)
    memory_max = None
    if r.memory_limit_mib is not None:
        memory_max = (r.memory_limit_mib + QEMU_OVERHEAD_MIB) * MIB
    return CgroupSettings(
        cpu_shares=cpu_shares(r.cpu_shares, spec.vcpus),
        cpu_quota_cores=quota,
        memory_max_bytes=memory_max,
        memory_min_bytes=r.memory_reservation_mib * MIB,
        pids_max=PIDS_MAX,
    )


class ResourceControls:
    """The VMs' cgroups on this host: made and set before QEMU starts, changed while it
    runs, removed after. Without usable cgroups VMs still run, without controls; the
    reason is logged once and kept in ``unavailable``."""

    def __init__(self, core_mhz: Callable[[], int], parent: str = DEFAULT_PARENT) -> None:
        self._core_mhz = core_mhz
        self._parent = parent
        self._layout: CgroupLayout | None = None
        self.unavailable: str | None = None

    def layout(self) -> CgroupLayout | None:
        if self._layout is None and self.unavailable is None:
            try:
                self._layout = detect_layout()
            except CgroupsUnavailable as exc:
                self.unavailable = str(exc)
                log.warning("VMs run without resource controls: %s", exc)
        return self._layout

    def _cgroup(self, spec: VmSpec) -> VmCgroup | None:
        layout = self.layout()
        return VmCgroup(layout, spec.uuid, self._parent) if layout is not None else None

    def prepare(self, spec: VmSpec) -> list[Path]:
        """Make the VM's cgroups with its settings; the files QEMU's launcher enters."""
        cgroup = self._cgroup(spec)
        if cgroup is None:
            return []
        try:
            cgroup.create()
        except CgroupsUnavailable as exc:
            self.unavailable = str(exc)
            log.warning("vm %s runs without resource controls: %s", spec.name, exc)
            return []
        cgroup.apply(cgroup_settings(spec, self._core_mhz()))
        return cgroup.procs_files()

    def update(self, spec: VmSpec) -> None:
        """Apply ``spec``'s controls to the VM's running QEMU."""
        cgroup = self._cgroup(spec)
        if cgroup is not None and cgroup.exists():
            cgroup.apply(cgroup_settings(spec, self._core_mhz()))

    def usage(self, spec: VmSpec) -> CgroupUsage | None:
        cgroup = self._cgroup(spec)
        return cgroup.usage() if cgroup is not None and cgroup.exists() else None

    def release(self, spec: VmSpec) -> None:
        """Remove the VM's cgroups once its QEMU has gone (best effort)."""
        cgroup = self._cgroup(spec)
        if cgroup is None:
            return
        try:
            cgroup.remove()
        except ThinvisorError as exc:  # the next agent start removes it
            log.warning("vm %s: cannot remove its cgroups: %s", spec.name, exc)

    def sweep(self, running: Collection[str]) -> list[str]:
        """Remove the cgroups of VMs not in ``running`` (UUIDs); their UUIDs."""
        layout = self.layout()
        return remove_stale(layout, running, self._parent) if layout is not None else []
