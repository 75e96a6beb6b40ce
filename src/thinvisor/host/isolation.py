"""Each VM's QEMU as a locked-down userworld: an unprivileged user, no capabilities, no
new privileges, and a mount namespace in which it sees only its own files.

The agent prepares everything as root before QEMU starts (TAPs and saved states are
passed as file descriptors already); the launcher (``engine/jail.py``) then hides
thinvisor's directories, binds back the VM's own paths and drops privileges for good.
File access is by ownership, as libvirt's DAC driver does it: the VM's writable images
and its logs belong to its QEMU user; backing files, ISOs and kernels it only reads get
that user's group and group read permission. ``vm.toml`` and the VM's directory itself
stay root's: QEMU cannot change its own configuration.

Files QEMU opens later (a snapshot's overlay, a hot-added or moved disk, an inserted
ISO) are granted the same way before QMP hands them over; one outside the VM's
directory is also bound into the running QEMU's namespace.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from thinvisor.config import HostConfig, IsolationConfig
from thinvisor.errors import BackendError, InvalidConfig
from thinvisor.fs import atomic_write, file_lock
from thinvisor.host.engine.paths import VmPaths
from thinvisor.host.engine.process import JAIL_SCRIPT, running_pid
from thinvisor.model.vm import KernelBoot, VmSpec
from thinvisor.storage.disk import Images

log = logging.getLogger(__name__)

UIDS_FILE = "qemu-uids.json"
JAIL_ROOT = "root"  # in the VM's run directory: where the launcher builds QEMU's root


@dataclass(frozen=True)
class Identity:
    """Who a VM's QEMU runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]


class Isolation:
    """The jail every VM's QEMU starts in, as host.toml's ``[isolation]`` says."""

    def __init__(self, config: HostConfig, images: Images) -> None:
        self.config = config
        self.settings: IsolationConfig = config.isolation
        self.images = images

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def identity(self, spec: VmSpec) -> Identity:
        """The unprivileged user of ``spec``'s QEMU (the host's, made when missing, or
        the VM's own uid with the host user's group)."""
        host = _ensure_user(self.settings.user)
        groups = tuple(g for g in (_group_id("kvm"),) if g is not None)
        if not self.settings.per_vm_users:
            return Identity(host.pw_uid, host.pw_gid, groups)
        uid = self._vm_uid(spec.uuid)
        return Identity(uid, host.pw_gid, groups)

    async def prepare(self, spec: VmSpec, paths: VmPaths) -> dict[str, object] | None:
        """Give QEMU's user what it needs of ``spec``'s files; the launcher's spec (None
        when isolation is off)."""
        if not self.enabled:
            return None
        who = await asyncio.to_thread(self.identity, spec)
        expose: dict[str, bool] = {str(paths.vm_dir): True, str(paths.run_dir): True}
        for disk in spec.disks:
            chain = await self.images.chain(paths.resolve(disk.path))
            for depth, image in enumerate(chain):
                writable = depth == 0 and not disk.readonly
                expose[os.path.normpath(image.filename)] = writable
        for extra in _read_only_files(spec, paths):
            expose.setdefault(str(extra), False)
        await asyncio.to_thread(self._own, paths, expose, who)
        inside = str(paths.vm_dir) + "/"
        listed = [
            [p, w] for p, w in expose.items() if p == str(paths.vm_dir) or not p.startswith(inside)
        ]
        return {
            "uid": who.uid,
            "gid": who.gid,
            "groups": list(who.groups),
            "root": str(paths.run_dir / JAIL_ROOT) if self.settings.mount_namespace else None,
            "expose": listed,
        }

    def _own(self, paths: VmPaths, files: dict[str, bool], who: Identity) -> None:
        # The VM's directory stays root's; QEMU's group may enter and list it.
        st = paths.vm_dir.stat()
        if st.st_gid != who.gid and not st.st_mode & stat.S_IXOTH:
            os.chown(paths.vm_dir, -1, who.gid)
        os.chmod(paths.vm_dir, stat.S_IMODE(st.st_mode) | stat.S_IRGRP | stat.S_IXGRP)
        paths.logs_dir.mkdir(parents=True, exist_ok=True)
        for log_file in [paths.logs_dir, *paths.logs_dir.iterdir()]:
            os.chown(log_file, who.uid, who.gid)
        for name, writable in files.items():
            path = Path(name)
            if path in (paths.vm_dir, paths.run_dir):
                continue
            grant_file(path, who, writable)

    async def grant(self, spec: VmSpec, paths: VmPaths, path: Path, *, writable: bool) -> None:
        """Let the running QEMU of ``spec`` open ``path`` (before QMP names it)."""
        if not self.enabled:
            return
        who = await asyncio.to_thread(self.identity, spec)
        await asyncio.to_thread(grant_file, path, who, writable)
        pid = running_pid(paths)
        inside = path.absolute().is_relative_to(paths.vm_dir)
        if pid is None or inside or not self.settings.mount_namespace:
            return
        argv = [sys.executable, "-I", "-S", str(JAIL_SCRIPT), "expose", str(pid), str(path)]
        argv.append("rw" if writable else "ro")
        result = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            detail = result.stderr.strip() or f"exit status {result.returncode}"
            raise BackendError(f"cannot show {path} to vm {spec.name!r}: {detail}")

    def _vm_uid(self, vm_uuid: str) -> int:
        """The VM's own uid: the lowest free one from ``uid_base``, kept in a state file."""
        path = self.config.state_dir / UIDS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_name(UIDS_FILE + ".lock")):
            try:
                table: dict[str, int] = json.loads(path.read_text())
            except FileNotFoundError:
                table = {}
            except (OSError, ValueError) as exc:
                raise InvalidConfig(f"isolation: {path} is unreadable: {exc}") from exc
            if vm_uuid not in table:
                taken = set(table.values())
                uid = self.settings.uid_base
                while uid in taken or _uid_exists(uid):
                    uid += 1
                table[vm_uuid] = uid
                atomic_write(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
            return table[vm_uuid]


def grant_file(path: Path, who: Identity, writable: bool) -> None:
    """Writable: owned by QEMU's user. Read-only: readable by its group (owner kept)."""
    st = path.stat()
    if writable:
        if (st.st_uid, st.st_gid) != (who.uid, who.gid):
            os.chown(path, who.uid, who.gid)
        if not st.st_mode & stat.S_IWUSR:
            os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRUSR | stat.S_IWUSR)
        return
    if st.st_uid == who.uid or st.st_mode & stat.S_IROTH:
        return
    if st.st_gid != who.gid:
        os.chown(path, -1, who.gid)
    if not st.st_mode & stat.S_IRGRP:
        os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRGRP)


def _read_only_files(spec: VmSpec, paths: VmPaths) -> Iterator[Path]:
    if isinstance(spec.boot, KernelBoot):
        yield paths.resolve(spec.boot.kernel)
        if spec.boot.initrd is not None:
            yield paths.resolve(spec.boot.initrd)
    if spec.cdrom is not None and spec.cdrom.path is not None:
        yield paths.resolve(spec.cdrom.path)


def _ensure_user(name: str) -> pwd.struct_passwd:
    """The system user QEMU runs as, made (with its own group) on first use."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    argv = ["useradd", "--system", "--user-group", "--no-create-home"]
    argv += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode not in (0, 9):  # 9: made meanwhile by another process
        raise BackendError(f"isolation.user: cannot create {name!r}: {result.stderr.strip()}")
    log.info("created the system user %r that VMs' QEMU processes run as", name)
    return pwd.getpwnam(name)


def _group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
