"""Finished appliance builds on disk: ``<cache_dir>/appliance/<version>/``.

A build is assembled in a private work directory and renamed into place whole, so a
version directory that exists is complete. ``current`` names the last build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinvisor.fs import atomic_write, fsync_dir

# The build recipe's version: bump when it changes in a way the package versions and the
# recipe digest do not capture. Builds of another format are not found.
FORMAT = 2
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initramfs.img"
MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "current"
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]*")


@dataclass(frozen=True)
class Appliance:
    """A built appliance: boot ``kernel`` with ``initrd`` and ``cmdline``."""

    version: str
    kernel: Path
    initrd: Path
    cmdline: str


def appliance_root(cache_dir: Path) -> Path:
    return cache_dir / "appliance"


def load_build(directory: Path, *, verify: bool) -> Appliance | None:
    """The build in ``directory`` if it is complete, of this format (and intact, with
    ``verify``)."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        if manifest["format"] != FORMAT:
            return None
        files = manifest["files"]
        for name in (KERNEL_NAME, INITRD_NAME):
            path = directory / name
            if path.stat().st_size != files[name]["size"]:
                return None
            if verify and file_sha256(path) != files[name]["sha256"]:
                return None
        return Appliance(
            version=str(manifest["version"]),
            kernel=directory / KERNEL_NAME,
            initrd=directory / INITRD_NAME,
            cmdline=str(manifest["cmdline"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_current(root: Path) -> str | None:
    try:
        version = (root / CURRENT_NAME).read_text().strip()
    except OSError:
        return None
    return version if VERSION_PATTERN.fullmatch(version) else None


def write_current(root: Path, version: str) -> None:
    atomic_write(root / CURRENT_NAME, f"{version}\n")


def install_build(staged: Path, target: Path, trash: Path) -> None:
    """Rename the finished ``staged`` directory to ``target``, moving an old one to ``trash``."""
    if target.exists():
        os.rename(target, trash)
    os.rename(staged, target)
    fsync_dir(target.parent)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync; the caller makes it visible by a rename."""
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_file(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """One build at a time per cache directory, across processes."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
