"""The appliance's initramfs: busybox, its applets, kernel modules, and the init scripts.

Pure assembly from bytes already in hand, so that it is testable without a network and
gives the same archive for the same inputs.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

from thinvisor.appliance._cpio import CpioArchive
from thinvisor.appliance._modules import KernelModule

# Applets the init scripts use, then the ones that make the shell useful for tests.
APPLETS = (
    # init, the power button handler, the DHCP hook
    "sh", "mount", "umount", "mkdir", "insmod", "hostname", "ip", "udhcpc", "acpid",
    "setsid", "cttyhack", "sleep", "sync", "poweroff", "cut", "sed", "grep",
    # init reading a NoCloud seed (with awk, cat, chmod, cp, head, printf, tr, uniq below)
    "findfs",
    # the interactive shell
    "[", "[[", "awk", "basename", "blockdev", "cat", "chmod", "chown", "cmp", "cp", "date",
    "dd", "df", "dirname", "dmesg", "du", "echo", "env", "expr", "false", "fdisk", "find",
    "free", "fsfreeze", "fstrim", "getty", "gunzip", "gzip", "halt", "head", "hexdump",
    "id", "ifconfig", "kill", "less", "ln", "losetup", "ls", "lsmod", "lsscsi", "md5sum",
    "mdev", "mkdosfs", "mke2fs", "mkfifo", "mknod", "mkswap", "mktemp", "modinfo", "more",
    "mv", "nc", "netstat", "nproc", "nslookup", "od", "partprobe", "pidof", "ping", "printf",
    "ps", "pwd", "readlink", "realpath", "reboot", "rm", "rmdir", "rmmod", "route",
    "sha256sum", "sort", "stat", "stty", "swapoff", "swapon", "sysctl", "tail", "tar", "tee",
    "test", "timeout", "top", "touch", "tr", "true", "truncate", "tty", "uname", "uniq",
    "uptime", "vi", "watch", "wc", "wget", "which", "xargs", "xxd", "yes", "zcat", "seq",
)  # fmt: skip

# Package data files: (name in files/, path in the initramfs, permissions)
SCRIPTS = (
    ("init", "init", 0o755),
    ("poweroff", "etc/acpi/PWRF/00000080", 0o755),
    ("udhcpc.script", "etc/appliance/udhcpc.script", 0o755),
)

_ETC = {
    "etc/hostname": "appliance\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tappliance\n",
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/profile": "export PS1='\\h:\\w# '\n",
}


def script_sources() -> dict[str, bytes]:
    """The package's data files, by name."""
    base = resources.files("thinvisor.appliance").joinpath("files")
    return {name: base.joinpath(name).read_bytes() for name, _, _ in SCRIPTS}


def recipe(scripts: dict[str, bytes]) -> dict[str, object]:
    """What, besides the packages, decides the archive's content: part of the version."""
    return {
        "applets": list(APPLETS),
        "scripts": {path: hashlib.sha256(scripts[name]).hexdigest() for name, path, _ in SCRIPTS},
        "etc": _ETC,
    }


def build_archive(
    busybox: bytes, release: str, modules: tuple[KernelModule, ...], scripts: dict[str, bytes]
) -> CpioArchive:
    archive = CpioArchive()
    for directory in ("dev", "proc", "sys", "run", "root", "var/log", "mnt", "etc/appliance"):
        archive.add_dir(directory)
    archive.add_dir("tmp", 0o1777)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    archive.add_char_device("dev/console", 5, 1)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    archive.add_file("bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        archive.add_symlink(f"bin/{applet}", "busybox")
    archive.add_symlink("sbin", "bin")
    archive.add_symlink("usr/bin", "../bin")
    archive.add_symlink("usr/sbin", "../bin")
    archive.add_symlink("var/run", "../run")
    for name, path, perm in SCRIPTS:
        archive.add_file(path, scripts[name], perm)
    for path, text in _ETC.items():
        archive.add_file(path, text.encode())
    moddir = f"lib/modules/{release}"
    for module in modules:
        archive.add_file(f"{moddir}/{module.relpath}", module.data)
    order = "".join(f"/{moddir}/{module.relpath}\n" for module in modules)
    archive.add_file("etc/appliance/modules", order.encode())
    return archive


def compress(archive: CpioArchive) -> bytes:
    """gzip without a timestamp or file name: the same archive gives the same bytes."""
    return gzip.compress(archive.to_bytes(), compresslevel=9, mtime=0)
