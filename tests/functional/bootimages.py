"""Bootable media for firmware-boot tests, built from the appliance without root.

``make_boot_iso`` writes an El Torito CD image booting the appliance with ISOLINUX;
``make_boot_disk`` writes a raw disk image (a FAT superfloppy with SYSLINUX) doing the
same. Nothing is mounted and no loop device is used: xorriso, mkfs.vfat, syslinux (its
mtools installer) and mcopy all work on image files. Debian packages: xorriso, isolinux,
syslinux, syslinux-common, mtools, dosfstools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from thinvisor.appliance import Appliance

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
SYSLINUX_MODULES = Path("/usr/lib/syslinux/modules/bios")
_MIB = 1 << 20
_TOOLS = ("xorriso", "mkfs.vfat", "syslinux", "mcopy")
# mtools refuses images whose size is no multiple of its idea of a track; ours need not be.
_MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def missing_tools() -> list[str]:
    """The image-building commands and files this machine lacks (empty when all are here)."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    files = (ISOLINUX_BIN, SYSLINUX_MODULES / "ldlinux.c32")
    return missing + [str(f) for f in files if not f.exists()]


def syslinux_config(cmdline: str) -> str:
    """A (ISO|SYS)LINUX configuration that boots the appliance at once, with no menu."""
    return (
        "SERIAL 0 115200\n"
        "DEFAULT appliance\n"
        "PROMPT 0\n"
        "LABEL appliance\n"
        "  KERNEL /vmlinuz\n"
        "  INITRD /initrd.img\n"
        f"  APPEND {cmdline}\n"
    )


def _run(*argv: str | Path) -> None:
    proc = subprocess.run(
        [str(a) for a in argv], env=_MTOOLS_ENV, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        command = " ".join(str(a) for a in argv)
        raise RuntimeError(f"{command} failed ({proc.returncode}): {proc.stderr.strip()}")


def make_boot_iso(
    directory: Path, appliance: Appliance, *, cmdline: str | None = None, name: str = "boot.iso"
) -> Path:
    """An ISOLINUX CD image in ``directory`` booting the appliance with ``cmdline``
    (the appliance's own by default); returns its path."""
    tree = directory / f"{name}.tree"
    (tree / "isolinux").mkdir(parents=True)
    shutil.copyfile(ISOLINUX_BIN, tree / "isolinux" / "isolinux.bin")
    shutil.copyfile(SYSLINUX_MODULES / "ldlinux.c32", tree / "isolinux" / "ldlinux.c32")
    config = syslinux_config(appliance.cmdline if cmdline is None else cmdline)
    (tree / "isolinux" / "isolinux.cfg").write_text(config)
    shutil.copyfile(appliance.kernel, tree / "vmlinuz")
    shutil.copyfile(appliance.initrd, tree / "initrd.img")
    iso = directory / name
    _run(
        *("xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-V", "TVBOOT", "-o", iso),
        *("-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat"),
        *("-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", tree),
    )
    shutil.rmtree(tree)
    return iso


def _disk_kib(appliance: Appliance) -> int:
    """Room for the kernel and initramfs plus 8 MiB of slack, in whole MiB, as KiB."""
    payload = appliance.kernel.stat().st_size + appliance.initrd.stat().st_size
    return (payload // _MIB + 8) * 1024


def make_boot_disk(
    directory: Path, appliance: Appliance, *, cmdline: str | None = None, name: str = "boot.img"
) -> Path:
    """A raw disk image in ``directory`` booting the appliance with ``cmdline`` (the
    appliance's own by default): a FAT "superfloppy" (no partition table; SeaBIOS runs its
    boot sector as it would an MBR) holding SYSLINUX, the kernel and the initramfs."""
    image = directory / name
    _run("mkfs.vfat", "-C", "-n", "TVBOOT", image, str(_disk_kib(appliance)))
    _run("syslinux", "--install", image)
    config = directory / f"{name}.syslinux.cfg"
    config.write_text(syslinux_config(appliance.cmdline if cmdline is None else cmdline))
    _run("mcopy", "-i", image, appliance.kernel, "::vmlinuz")
    _run("mcopy", "-i", image, appliance.initrd, "::initrd.img")
    _run("mcopy", "-i", image, config, "::syslinux.cfg")
    config.unlink()
    return image
