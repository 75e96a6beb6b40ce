"""Where a VM's files are: its directory in a datastore and its run directory.

The VM directory (``<datastore>/<name>/``) holds what must survive a host reboot: the
configuration, disks, logs and a suspended VM's state. The run directory
(``<run_dir>/vms/<name>/``) holds what lives as long as the QEMU process: pidfile and
sockets. Unix socket paths are limited to 107 bytes, so the run directory must be short.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "vm.toml"
# The id of the host a VM belongs to, in its directory: on a datastore that several hosts
# share, each lists only its own VMs (a VM moves by this file being replaced).
OWNER_NAME = "owner"
SUSPEND_STATE_NAME = "suspend.state"


@dataclass(frozen=True)
class VmPaths:
    vm_dir: Path
    run_dir: Path

    @property
    def config(self) -> Path:
        return self.vm_dir / CONFIG_NAME

    @property
    def owner(self) -> Path:
        return self.vm_dir / OWNER_NAME

    @property
    def logs_dir(self) -> Path:
        return self.vm_dir / "logs"

    @property
    def qemu_log(self) -> Path:
        return self.logs_dir / "qemu.log"

    def serial_log(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    @property
    def parallel_log(self) -> Path:
        return self.logs_dir / "parallel0.log"

    @property
    def suspend_state(self) -> Path:
        return self.vm_dir / SUSPEND_STATE_NAME

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    def serial_socket(self, name: str) -> Path:
        return self.run_dir / f"{name}.sock"

    @property
    def vnc_socket(self) -> Path:
        return self.run_dir / "vnc.sock"

    @property
    def stop_record(self) -> Path:
        """Why thinvisor stopped the VM, written before it asks QEMU to go."""
        return self.run_dir / "stop.json"

    def resolve(self, path: str) -> Path:
        """A path from the spec: relative ones are relative to the VM directory."""
        p = Path(path)
        return p if p.is_absolute() else self.vm_dir / p
