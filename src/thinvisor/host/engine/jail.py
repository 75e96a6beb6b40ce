"""QEMU's jail: what runs between the agent's fork and QEMU's exec, as root, and then
never again. Standalone on purpose (the standard library only): it is run as a script,
``python -I -S jail.py ...``, so that starting a VM does not import thinvisor twice.

``launch SPEC -- QEMU ARGV...``
    1. a mount namespace of its own, private (nothing propagates back to the host);
    2. a new root, an empty tmpfs (``SPEC["root"]``), holding only the system's programs,
       libraries and firmware (``/usr``, ``/etc`` and the like, read-only), ``/dev``,
       ``/proc``, ``/sys``, an empty ``/tmp``, and the paths in ``expose`` bound at their
       own places (the VM's directory and run directory, its disks and their backing
       files, ISO, kernel); then ``pivot_root`` into it: other VMs' files, the
       datastores, thinvisor's state and configuration do not exist in here;
    3. privileges dropped for good: the capability bounding set emptied, the groups,
       gid and uid set to the unprivileged ones (which clears every capability), and
       ``PR_SET_NO_NEW_PRIVS`` set;
    4. exec of QEMU.

``expose PID PATH ro|rw``
    Bind ``PATH`` into the running QEMU ``PID``'s namespace at the same place (a disk
    added or moved while it runs): a detached copy of the mount is made here
    (``open_tree``), then attached there (``setns`` and ``move_mount``).

Failures print one line on stderr (QEMU's log) and exit with status 126.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
# x86_64 (and every architecture with the unified syscall table) numbers.
SYS_PIVOT_ROOT = 155
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MNT_DETACH = 0x2
FAILED = 126

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    src = source.encode() if source is not None else None
    fs = fstype.encode() if fstype is not None else None
    result = _libc.mount(src, target.encode(), fs, ctypes.c_ulong(flags), data.encode() or None)
    _check(result, f"mount {target}")


#: What QEMU needs of the system: programs, libraries, firmware, its configuration.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
#: Kernel interfaces, bound whole (with what is mounted below them).
KERNEL_DIRS = ("/dev", "/proc", "/sys")
#: Hidden even though under a system directory: thinvisor's configuration.
HIDDEN = ("/etc/thinvisor",)


def _mountpoint(path: str, is_dir: bool) -> None:
    """An empty directory or file at ``path`` on the tmpfs, to bind onto."""
    if is_dir:
        os.makedirs(path, mode=0o755, exist_ok=True)
        return
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _read_only(path: str) -> None:
    _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _bind(source: str, root: str, target: str, *, writable: bool, recursive: bool = False) -> None:
    """Bind ``source`` at ``target`` under the new ``root``."""
    inside = root + target
    _mountpoint(inside, os.path.isdir(source))
    _mount(source, inside, None, MS_BIND | (MS_REC if recursive else 0))
    if not writable:
        _read_only(inside)


def _build_root(root: str, expose: list[tuple[str, bool]]) -> None:
    """The new root: the system, the kernel's interfaces and ``expose``; then pivot."""
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    for path in SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind(path, root, path, writable=False, recursive=True)
    for path in KERNEL_DIRS:
        _bind(path, root, path, writable=path == "/dev", recursive=True)
    os.makedirs(root + "/tmp", mode=0o1777)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=16m")
    for path in HIDDEN:
        if os.path.isdir(root + path):
            _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    for path, writable in expose:
        _bind(path, root, path, writable=writable)
    old = root + "/.old-root"
    os.mkdir(old, 0o700)
    _check(_libc.syscall(SYS_PIVOT_ROOT, root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old-root", MNT_DETACH), "umount /.old-root")
    os.rmdir("/.old-root")


def _drop_privileges(uid: int, gid: int, groups: list[int]) -> None:
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # leaving uid 0 clears the permitted and effective sets
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


def launch(spec: dict[str, object], argv: list[str]) -> None:
    """Jail this process as ``spec`` says, then exec ``argv``."""
    if spec.get("root") is not None:
        _check(_libc.unshare(CLONE_NEWNS), "unshare")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        expose = [(str(p), bool(w)) for p, w in spec["expose"]]  # type: ignore[attr-defined]
        _build_root(str(spec["root"]), expose)
    if spec.get("uid") is not None:
        groups = [int(g) for g in spec.get("groups", [])]  # type: ignore[attr-defined]
        _drop_privileges(int(spec["uid"]), int(spec["gid"]), groups)  # type: ignore[call-overload]
    os.execvp(argv[0], argv)  # QEMU is found on PATH, as without the jail


def expose(pid: int, path: str, writable: bool) -> None:
    """Bind ``path`` into the mount namespace of process ``pid`` at the same place."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC
    tree = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), flags), "open_tree")
    is_dir = os.path.isdir(path)
    ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    _check(_libc.setns(ns, CLONE_NEWNS), "setns")
    if os.path.exists(path) and not _is_stub(path, is_dir):
        return  # already there (in the VM's own directory, or not hidden at all)
    _mountpoint(path, is_dir)
    moved = _libc.syscall(
        SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH
    )
    _check(moved, "move_mount")
    if not writable:
        _read_only(path)


def _is_stub(path: str, is_dir: bool) -> bool:
    """An empty mount point left by an earlier expose that failed half-way."""
    if is_dir:
        return os.path.isdir(path) and not os.listdir(path)
    return os.path.isfile(path) and os.path.getsize(path) == 0


def main(args: list[str]) -> int:
    try:
        if args[:1] == ["launch"] and len(args) > 3 and args[2] == "--":
            launch(json.loads(Path(args[1]).read_text()), args[3:])
        elif args[:1] == ["expose"] and len(args) == 4 and args[3] in ("ro", "rw"):
            expose(int(args[1]), args[2], args[3] == "rw")
        else:
            print("usage: jail.py launch SPEC -- ARGV... | expose PID PATH ro|rw", file=sys.stderr)
            return 2
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"thinvisor jail: {exc}", file=sys.stderr)
        return FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
