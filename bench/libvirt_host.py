"""libvirt as an operator runs it, started by hand for the benchmarks and stopped after.

``LibvirtHost`` starts ``virtlogd`` and ``libvirtd`` (daemonized, each with a pidfile of
ours), connects to ``qemu:///system`` and defines appliance domains. Closing it destroys
and undefines every domain it defined, ends both daemons by the pids they wrote, and
removes what they left behind: files and directories that appeared under libvirt's own
trees (``/etc/libvirt``, ``/var/lib/libvirt``, ``/run/libvirt`` ...) and cgroups that
appeared under ``/sys/fs/cgroup`` while it ran. Anything that was there before is kept.

Domains are ``type='qemu'`` (TCG; this machine's ``/dev/kvm`` cannot run a guest) and
carry ``<acpi/>`` so that the ACPI power button works. libvirt runs QEMU as its own
unprivileged user (Debian's ``libvirt-qemu``, which ``make bench`` creates), so the
domain files live in a directory that user can traverse; where that user cannot open
``/dev/kvm``, a ``qemu.conf`` of ours (removed afterwards) has QEMU run as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from bench.harness import wait_until
from bench.hosts import appliance, gone
from thinvisor.appliance import Appliance
from thinvisor.host.engine.argv import ROOT_PORTS

URI = "qemu:///system"
LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
# Where libvirt keeps its configuration, state, caches and logs.
LIBVIRT_TREES = (
    Path("/etc/libvirt"),
    Path("/var/lib/libvirt"),
    Path("/var/cache/libvirt"),
    Path("/var/log/libvirt"),
    Path("/run/libvirt"),
    Path("/run/lock/libvirt"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_USER = "libvirt-qemu"  # Debian's
KVM = Path("/dev/kvm")
QEMU_STATE = Path("/run/libvirt/qemu")
STOP_TIMEOUT_S = 30.0


class Unavailable(RuntimeError):
    """libvirt cannot run here (not installed, or another libvirtd is running)."""


@dataclass(frozen=True)
class LibvirtVm:
    """A domain this host defined, and where its serial console is logged."""

    name: str
    domain: Any  # libvirt.virDomain
    serial_log: Path


def daemon_pids(binary: str) -> list[int]:
    """The pids of running processes executing ``binary``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(proc / "exe") == binary:
                pids.append(int(proc.name))
    return pids


def kvm_usable_by(user: str) -> bool:
    """Whether ``user`` may open /dev/kvm for reading and writing (True without one)."""
    try:
        st = KVM.stat()
        entry = pwd.getpwnam(user)
    except (FileNotFoundError, KeyError):
        return True
    if entry.pw_uid == st.st_uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid in os.getgrouplist(user, entry.pw_gid):
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


def tree_paths(roots: tuple[Path, ...]) -> set[Path]:
    """Every file and directory under ``roots`` (the roots themselves included)."""
    found: set[Path] = set()
    for root in roots:
        if not root.exists():
            continue
        found.add(root)
        for parent, dirs, files in os.walk(root):
            found.update(Path(parent) / n for n in dirs + files)
    return found


def machine_cgroup(path: Path, root: Path = CGROUP_ROOT) -> bool:
    """Whether a cgroup is libvirt's: its machine partition or a domain's group below."""
    parts = path.relative_to(root).parts
    return any(p == "machine" or p.startswith(("machine.", "qemu-")) for p in parts)


def cgroup_dirs(root: Path = CGROUP_ROOT) -> set[Path]:
    """The cgroup directories libvirt makes, in every hierarchy mounted under ``root``
    (other cgroups come and go with other processes and are none of ours)."""
    found: set[Path] = set()
    for parent, dirs, _ in os.walk(root):
        found.update(p for n in dirs if machine_cgroup(p := Path(parent) / n, root))
    return found


def remove_new(paths: set[Path]) -> list[Path]:
    """Remove ``paths``, deepest first (cgroups and directories with ``rmdir``); the ones
    that could not be removed."""
    left = []
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            left.append(path)
    return left


def domain_xml(
    name: str,
    *,
    memory_mib: int,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    serial_log: Path,
    vcpus: int = 1,
    machine: str = "q35",
    domain_uuid: str | None = None,
) -> str:
    """An appliance domain: direct kernel boot, a serial console on a pty logged to
    ``serial_log``, no disk, NIC, graphics, USB or balloon, and on q35 as many PCIe root
    ports as thinvisor gives its VMs for hot-add: the same virtual hardware as
    thinvisor's headless appliance VM (the guest kernel sets up every port as it boots)."""
    if machine not in ("q35", "pc"):
        raise ValueError(f"machine {machine!r}: libvirt domains here are q35 or pc")
    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    ports = ROOT_PORTS if machine == "q35" else 0
    controllers = "".join(
        f"\n    <controller type='pci' index='{n}' model='pcie-root-port'/>"
        for n in range(1, ports + 1)
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{domain_uuid or uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine={quoteattr(machine)}>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    <serial type='pty'>
      <log file={quoteattr(str(serial_log))} append='on'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <controller type='usb' model='none'/>{controllers}
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtHost:
    """libvirtd and virtlogd started by hand, a connection, and the domains defined
    (booting ``image``, or the appliance from thinvisor's own cache)."""

    def __init__(self, image: Appliance | None = None) -> None:
        try:
            import libvirt
        except ImportError as exc:
            raise Unavailable(f"libvirt-python is not installed: {exc}") from exc
        self._libvirt = libvirt
        self.image = image
        for binary in (LIBVIRTD, VIRTLOGD):
            if not Path(binary).exists():
                raise Unavailable(f"{binary} is not installed")
            if running := daemon_pids(binary):
                raise Unavailable(f"{binary} already runs (pid {running[0]}); stop it first")
        self.root = Path(tempfile.mkdtemp(prefix="tvlv", dir="/tmp"))
        self.root.chmod(0o711)  # libvirt's QEMU user reads the domains' files in here
        self.vms: dict[str, LibvirtVm] = {}
        self.qemu_pids: dict[int, str] = {}
        self.libvirtd_pid: int | None = None
        self.virtlogd_pid: int | None = None
        self.conn: Any = None
        self._paths_before = tree_paths(LIBVIRT_TREES)
        self._cgroups_before = cgroup_dirs()

    def start(self) -> None:
        """Start virtlogd, then libvirtd, and connect."""
        libvirt = self._libvirt
        if not QEMU_CONF.exists() and not kvm_usable_by(QEMU_USER):
            # libvirt re-probes QEMU on every domain start when /dev/kvm exists but its
            # QEMU user cannot open it (Debian's udev rule and kvm group are not here);
            # QEMU runs as root instead, as thinvisor's and the hand-started one do.
            QEMU_CONF.write_text(
                "# For the benchmarks' libvirtd only; removed when it stops.\n"
                'user = "root"\ngroup = "root"\n'
            )
        # Their own logs go to our directory (Debian's service package would make
        # /var/log/libvirt for them).
        logd_conf = self.root / "virtlogd.conf"
        logd_conf.write_text(f'log_outputs = "3:file:{self.root / "virtlogd.log"}"\n')
        self.virtlogd_pid = self._daemon(VIRTLOGD, "virtlogd", "-f", str(logd_conf))
        conf = self.root / "libvirtd.conf"
        conf.write_text(
            'auth_unix_ro = "none"\n'
            'auth_unix_rw = "none"\n'
            f'log_outputs = "3:file:{self.root / "libvirtd.log"}"\n'
        )
        self.libvirtd_pid = self._daemon(LIBVIRTD, "libvirtd", "-f", str(conf))
        libvirt.registerErrorHandler(lambda *_: None, None)  # errors raise; none printed
        self.conn = wait_until(self._connect, 60, "libvirtd's socket", poll=0.1)

    def _daemon(self, binary: str, name: str, *args: str) -> int:
        """Start a libvirt daemon in the background; its pid, from the pidfile it wrote."""
        pidfile = self.root / f"{name}.pid"
        with (self.root / f"{name}.out").open("ab") as out:
            done = subprocess.run(
                [binary, "-d", "-p", str(pidfile), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                check=False,
                timeout=120,
            )
        if done.returncode != 0:
            detail = (self.root / f"{name}.out").read_text().strip()
            raise RuntimeError(f"{name} did not start: {detail[-2000:]}")
        text = wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, name)
        return int(text)

    def _connect(self) -> Any:
        try:
            return self._libvirt.open(URI)
        except self._libvirt.libvirtError:
            return None

    # Domains

    def define_appliance(
        self, name: str, *, memory_mib: int, vcpus: int = 1, machine: str = "q35"
    ) -> LibvirtVm:
        """Define (not start) a domain booting the appliance, its files in a directory of
        its own as thinvisor keeps them in the VM's directory."""
        image = self.image or appliance()
        vm_dir = self.root / name
        vm_dir.mkdir(mode=0o711)
        kernel, initrd = vm_dir / "vmlinuz", vm_dir / "initrd.img"
        shutil.copyfile(image.kernel, kernel)
        shutil.copyfile(image.initrd, initrd)
        xml = domain_xml(
            name,
            memory_mib=memory_mib,
            vcpus=vcpus,
            machine=machine,
            kernel=kernel,
            initrd=initrd,
            cmdline=image.cmdline,
            serial_log=vm_dir / "serial0.log",
        )
        domain = self.conn.defineXML(xml)
        vm = LibvirtVm(name, domain, vm_dir / "serial0.log")
        self.vms[name] = vm
        return vm

    def qemu_pid(self, name: str) -> int:
        """The pid of a running domain's QEMU (from libvirt's pidfile); remembered, so
        that ``close`` can end it even if libvirtd is gone."""
        text = (QEMU_STATE / f"{name}.pid").read_text().strip()
        pid = int(text)
        self.qemu_pids[pid] = name
        return pid

    def undefine(self, name: str) -> None:
        """Destroy (if running) and undefine one of this host's domains, with its
        snapshots' metadata and any managed save image."""
        libvirt = self._libvirt
        vm = self.vms.pop(name)
        with contextlib.suppress(libvirt.libvirtError):
            if vm.domain.isActive():
                vm.domain.destroy()
        vm.domain.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        )

    # Teardown

    def close(self) -> None:
        """Remove every domain, end both daemons, and remove what they left behind."""
        try:
            self._remove_domains()
        finally:
            self._stop_daemons()
            self._end_qemus()
            left = remove_new(tree_paths(LIBVIRT_TREES) - self._paths_before)
            left += remove_new(cgroup_dirs() - self._cgroups_before)
            shutil.rmtree(self.root, ignore_errors=True)
        if left:
            raise RuntimeError(f"libvirt left behind: {', '.join(map(str, left))}")

    def _remove_domains(self) -> None:
        for name in self.vms:  # in case libvirt cannot end them, ``_end_qemus`` will
            with contextlib.suppress(OSError, ValueError):
                self.qemu_pid(name)
        if self.conn is None:
            return
        for name in list(self.vms):
            with contextlib.suppress(self._libvirt.libvirtError):
                self.undefine(name)
        with contextlib.suppress(self._libvirt.libvirtError):
            self.conn.close()
        self.conn = None

    def _stop_daemons(self) -> None:
        for attr in ("libvirtd_pid", "virtlogd_pid"):  # libvirtd first: it uses virtlogd
            pid = getattr(self, attr)
            if pid is not None:
                stop_pid(pid)
                setattr(self, attr, None)

    def _end_qemus(self) -> None:
        """QEMU processes outlive libvirtd: end any of ours that is still there."""
        for pid, name in self.qemu_pids.items():
            if f"guest={name}," in _cmdline(pid):  # still that QEMU, not a reused pid
                stop_pid(pid, signal.SIGKILL)
        self.qemu_pids.clear()

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stop_pid(pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal a process we started and wait until it is gone (SIGKILL after a while)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not gone(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: gone(pid), 10, f"pid {pid} gone", poll=0.05)
            return
        time.sleep(0.02)
