"""Building the appliance: Debian's cloud kernel and a busybox initramfs of our own."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinvisor.appliance import _cache, _debian, _initramfs, _kernel
from thinvisor.appliance._cache import Appliance
from thinvisor.appliance._modules import ModuleSelection, ModuleTree
from thinvisor.errors import ApplianceBuildError
from thinvisor.fs import fsync_dir

log = logging.getLogger(__name__)

FORMAT = _cache.FORMAT
# The last two options let the kernel (repacked, see _kernel) boot in 64 MiB of guest
# memory, where about 18 MiB are left once it is loaded: tracefs would give each of its
# thousands of trace event files an inode and a dentry (9 MiB), and accounting kernel
# memory to cgroups adds a 4 MiB array to the second percpu chunk.
CMDLINE = " ".join(
    (
        "console=ttyS0 quiet panic=-1",
        "initcall_blacklist=tracer_init_tracefs",
        "cgroup.memory=nokmem",
    )
)

# virtio for disks, NICs and SCSI CD-ROMs; IDE CD-ROM on pc; the ACPI power button.
REQUIRED_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "sd_mod", "sr_mod", "cdrom",
    "ata_piix", "button", "evdev",
)  # fmt: skip
# Loaded when the kernel has them as modules: AHCI (q35's CD-ROM), the virtio console,
# ISO 9660 for CD-ROMs, PCI hotplug (built in on Debian's cloud kernel), and the
# memory balloon.
OPTIONAL_MODULES = (
    "ahci", "virtio_console", "isofs", "pciehp", "acpiphp", "virtio_balloon",
    # A NoCloud seed may also be a FAT filesystem labelled cidata.
    "vfat", "nls_cp437", "nls_iso8859_1",
)  # fmt: skip
# Drivers that cannot be modules do not appear in modules.builtin; ask the config.
_CONFIG_SYMBOLS = {
    "pciehp": "CONFIG_HOTPLUG_PCI_PCIE",
    "acpiphp": "CONFIG_HOTPLUG_PCI_ACPI",
    "ahci": "CONFIG_SATA_AHCI",
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class _Fetched:
    version: str
    kernel: _debian.Package
    busybox: _debian.Package
    debs: dict[str, Path]


def build_appliance(
    cache_dir: Path, *, force: bool = False, progress: Progress | None = None
) -> Appliance:
    """Build the appliance into ``<cache_dir>/appliance/<version>/``, or reuse the build
    for the same package versions unless ``force``. Raises ApplianceBuildError."""

    def report(message: str) -> None:
        log.info("appliance: %s", message)
        if progress is not None:
            progress(message)

    root = _cache.appliance_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _cache.build_lock(root):
            return _build_locked(root, force, report)
    except OSError as exc:
        where = exc.filename or root
        raise ApplianceBuildError(f"appliance build in {where}: {exc.strerror or exc}") from exc


def find_appliance(cache_dir: Path) -> Appliance | None:
    """The last appliance built into ``cache_dir``, if it is still there. No network."""
    root = _cache.appliance_root(cache_dir)
    version = _cache.read_current(root)
    return None if version is None else _cache.load_build(root / version, verify=False)


def _build_locked(root: Path, force: bool, report: Progress) -> Appliance:
    scripts = _initramfs.script_sources()
    # Under the lock, any work directory left behind is from a build that crashed.
    for stale in root.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        try:
            fetched = _fetch(root, work, scripts, force, report)
        except ApplianceBuildError as exc:
            # Missing or stale package lists are the usual cause; refresh them once.
            _update_lists(exc, report)
            fetched = _fetch(root, work, scripts, force, report)
        if isinstance(fetched, Appliance):
            appliance = fetched
        else:
            appliance = _assemble(root, work, fetched, scripts, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _cache.write_current(root, appliance.version)
    return appliance


def _fetch(
    root: Path, work: Path, scripts: dict[str, bytes], force: bool, report: Progress
) -> Appliance | _Fetched:
    report("resolving packages")
    kernel, busybox = _debian.resolve_packages()
    version = _version(kernel, busybox, scripts)
    if not force:
        cached = _cache.load_build(root / version, verify=True)
        if cached is not None:
            report(f"reusing build {version}")
            return cached
    report(f"downloading {kernel.spec} {busybox.spec}")
    debs = work / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    return _Fetched(version, kernel, busybox, _debian.download([kernel, busybox], debs))


def _update_lists(cause: ApplianceBuildError, report: Progress) -> None:
    report(f"{cause}; running apt-get update")
    try:
        _debian.update_lists()
    except ApplianceBuildError as exc:
        raise ApplianceBuildError(f"{cause}; apt-get update failed too: {exc}") from exc


def _version(kernel: _debian.Package, busybox: _debian.Package, scripts: dict[str, bytes]) -> str:
    """The kernel's version plus a digest of everything else that goes into the build."""
    recipe = {
        "format": FORMAT,
        "cmdline": CMDLINE,
        "packages": [kernel.spec, busybox.spec],
        "modules": [REQUIRED_MODULES, OPTIONAL_MODULES],
        "initramfs": _initramfs.recipe(scripts),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9.+~_-]', '_', kernel.version)}+{digest[:8]}"


def _assemble(
    root: Path, work: Path, fetched: _Fetched, scripts: dict[str, bytes], report: Progress
) -> Appliance:
    report("unpacking packages")
    kroot = _debian.unpack(fetched.debs[fetched.kernel.name], work / "kernel")
    broot = _debian.unpack(fetched.debs[fetched.busybox.name], work / "busybox")
    moddir = _module_dir(kroot)
    release = moddir.name
    config = _kernel_config(_one_of(kroot, [f"boot/config-{release}"]))
    builtin = {name for name, symbol in _CONFIG_SYMBOLS.items() if config.get(symbol) == "y"}
    report(f"resolving kernel modules of {release}")
    selection = ModuleTree(moddir, builtin).select(REQUIRED_MODULES, OPTIONAL_MODULES)
    _log_selection(selection)
    report("writing initramfs")
    busybox = _one_of(broot, ["bin/busybox", "usr/bin/busybox"]).read_bytes()
    archive = _initramfs.build_archive(busybox, release, selection.modules, scripts)
    kernel, kernel_info = _repack_kernel(
        _one_of(kroot, [f"boot/vmlinuz-{release}"]).read_bytes(), report
    )
    staged = work / "out"
    staged.mkdir()
    _cache.write_file(staged / _cache.KERNEL_NAME, kernel)
    _cache.write_file(staged / _cache.INITRD_NAME, _initramfs.compress(archive))
    manifest = _manifest(fetched, release, selection, config, staged)
    manifest["kernel_image"] = kernel_info
    _cache.write_manifest(staged / _cache.MANIFEST_NAME, manifest)
    fsync_dir(staged)
    _cache.install_build(staged, root / fetched.version, work / "replaced")
    report(f"built {fetched.version}")
    return Appliance(
        version=fetched.version,
        kernel=root / fetched.version / _cache.KERNEL_NAME,
        initrd=root / fetched.version / _cache.INITRD_NAME,
        cmdline=CMDLINE,
    )


def _repack_kernel(stock: bytes, report: Progress) -> tuple[bytes, dict[str, Any]]:
    """The kernel repacked to boot in less memory; as packaged if that cannot be done."""
    report("repacking the kernel")
    try:
        repacked = _kernel.repack(stock)
    except _kernel.RepackError as exc:
        log.warning("appliance: kernel left as packaged, it needs more guest memory: %s", exc)
        report(f"kernel left as packaged: {exc}")
        return stock, {"repacked": False, "reason": str(exc)}
    mib = _kernel.MIB
    report(
        f"kernel repacked: it unpacks in {repacked.init_size / mib:.1f} MiB"
        f" instead of {repacked.stock_init_size / mib:.1f} MiB"
    )
    info = {
        "repacked": True,
        "compression": repacked.compression,
        "init_size": repacked.init_size,
        "stock_init_size": repacked.stock_init_size,
    }
    return repacked.image, info


def _manifest(
    fetched: _Fetched,
    release: str,
    selection: ModuleSelection,
    config: dict[str, str],
    staged: Path,
) -> dict[str, Any]:
    files = {}
    for name in (_cache.KERNEL_NAME, _cache.INITRD_NAME):
        path = staged / name
        files[name] = {"size": path.stat().st_size, "sha256": _cache.file_sha256(path)}
    return {
        "format": FORMAT,
        "version": fetched.version,
        "cmdline": CMDLINE,
        "packages": {p.name: p.version for p in (fetched.kernel, fetched.busybox)},
        "kernel_release": release,
        "modules": [m.name for m in selection.modules],
        "builtin": list(selection.builtin),
        "missing": list(selection.missing),
        "kernel_config": {s: config.get(s, "n") for s in sorted(_CONFIG_SYMBOLS.values())},
        "files": files,
    }


def _log_selection(selection: ModuleSelection) -> None:
    log.info("appliance: modules %s", ", ".join(m.name for m in selection.modules))
    if selection.builtin:
        log.info("appliance: built into the kernel: %s", ", ".join(selection.builtin))
    if selection.missing:
        log.info("appliance: not in this kernel: %s", ", ".join(selection.missing))


def _module_dir(kroot: Path) -> Path:
    for base in ("lib/modules", "usr/lib/modules"):
        found = sorted(p for p in (kroot / base).glob("*") if (p / "kernel").is_dir())
        if len(found) == 1:
            return found[0]
    raise ApplianceBuildError("the kernel package holds no single lib/modules/<release>")


def _one_of(base: Path, candidates: list[str]) -> Path:
    for candidate in candidates:
        if (base / candidate).is_file():
            return base / candidate
    raise ApplianceBuildError(f"the package holds no {' or '.join(candidates)}")


def _kernel_config(path: Path) -> dict[str, str]:
    config = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            config[key] = value
    return config
