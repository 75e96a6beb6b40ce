"""Which files a VM's disks are made of, and who else reads them.

A disk is a chain of images: the active file the VM writes and the backing files below
it (frozen by snapshots, or a linked clone's base in another VM). Deleting a snapshot,
a VM or a template must not pull a file from under another VM's chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from thinvisor.errors import ImageError
from thinvisor.host.inventory import VmEntry
from thinvisor.model.vm import VmSpec
from thinvisor.storage.snapshots import load_tree

if TYPE_CHECKING:
    from thinvisor.host.service import HostService


def real(path: Path | str) -> str:
    return os.path.realpath(path)


def own_files(entry: VmEntry, spec: VmSpec) -> list[Path]:
    """The images a VM refers to itself: its disks' active files and its snapshots'
    frozen files (not the backing files of other VMs its chains reach)."""
    files = [entry.paths.resolve(d.path) for d in spec.disks]
    try:
        tree = load_tree(entry.paths.vm_dir)
    except Exception:  # an unreadable tree protects nothing; the VM is reported invalid
        return files
    return files + [entry.paths.resolve(f) for f in sorted(tree.frozen_files())]


async def chain_files(service: HostService, path: Path) -> list[str]:
    """The real paths of an image and its backing files; [] when it cannot be read."""
    try:
        return [real(i.filename) for i in await service.images.chain(path)]
    except ImageError:
        return []


async def users_of(service: HostService, paths: set[str], exclude: str) -> list[str]:
    """The VMs other than ``exclude`` whose disks or snapshots read any of ``paths``
    (real paths), as 'vm/disk' names."""
    users: list[str] = []
    for entry in service.inventory.entries():
        if entry.name == exclude or entry.spec is None:
            continue
        for file in own_files(entry, entry.spec):
            if paths.intersection(await chain_files(service, file)):
                users.append(entry.name)
                break
    return users
