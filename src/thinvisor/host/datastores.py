"""The host's datastores as actions: list them with their space, add and remove them,
browse them, copy files in and out (``HostService.datastores``).

A datastore added at runtime may be removed again while no VM uses it: no VM directory
lies in it, and no VM's disk (nor any file of a disk's backing chain), CD-ROM ISO, kernel
or initrd. Removing forgets the datastore; its files stay where they are. The check and
the removal happen holding the inventory lock, so that no VM is created in the datastore
meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinvisor.config import DatastoreConfig
from thinvisor.errors import Busy, ImageError, InsufficientResources, InvalidArgument
from thinvisor.host.inventory import VmEntry
from thinvisor.host.storage_usage import VmStorage, all_vm_files, vm_storage, with_vm_usage
from thinvisor.model.vm import KernelBoot
from thinvisor.storage import datastore as storage
from thinvisor.storage.datastore import Datastore, FileEntry
from thinvisor.storage.disk import Images
from thinvisor.storage.registry import DatastoreRegistry

if TYPE_CHECKING:
    from thinvisor.host.service import HostService

Emit = Callable[..., None]
CHUNK = 1 << 20
MAX_CHAIN = 64  # backing files followed by hand when qemu-img cannot read a chain


async def file_chunks(path: Path, size: int = CHUNK) -> AsyncIterator[bytes]:
    """A local file's content in chunks, read in a worker thread."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, size):
            yield chunk
    finally:
        f.close()


def local_source(path: Path) -> int:
    """The size of a local file to upload; InvalidArgument unless it is a regular file
    that can be read."""
    if not path.exists():
        raise InvalidArgument("local", f"{path} does not exist")
    if not path.is_file():
        raise InvalidArgument("local", f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise InvalidArgument("local", f"{path} cannot be read")
    return path.stat().st_size


def download_target(local: Path, name: str) -> Path:
    """Where a download goes: into ``local`` when it is a directory, else ``local``,
    whose directory must exist and be writable."""
    target = local / name if local.is_dir() else local
    if not target.parent.is_dir():
        raise InvalidArgument("local", f"{target.parent} is not a directory")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise InvalidArgument("local", f"{target.parent} is not writable")
    return target


async def chain_paths(images: Images, path: Path) -> list[Path]:
    """The files of a disk's backing chain, top first. When qemu-img cannot read the
    whole chain (a backing file is missing), as far as it can be followed, the first
    unreadable file included."""
    try:
        return [Path(i.filename) if i.filename else path for i in await images.chain(path)]
    except ImageError:
        pass
    found = [path]
    for _ in range(MAX_CHAIN):
        try:
            backing = (await images.info(found[-1])).backing_path
        except ImageError:
            break
        if backing is None:
            break
        found.append(backing)
    return found


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return path.absolute().is_relative_to(root)


def _file_uses(entry: VmEntry) -> list[tuple[str, Path]]:
    """The files a VM's configuration names, but its disks: (what, path)."""
    spec = entry.spec
    if spec is None:
        return []
    uses: list[tuple[str, Path]] = []
    if spec.cdrom is not None and spec.cdrom.path:
        uses.append(("its CD-ROM ISO", entry.paths.resolve(spec.cdrom.path)))
    if isinstance(spec.boot, KernelBoot):
        uses.append(("its kernel", entry.paths.resolve(spec.boot.kernel)))
        if spec.boot.initrd:
            uses.append(("its initrd", entry.paths.resolve(spec.boot.initrd)))
    return uses


def _direct_use(entry: VmEntry, root: Path) -> str | None:
    if _inside(entry.paths.vm_dir, root):
        return "its directory is there"
    for what, path in _file_uses(entry):
        if _inside(path, root):
            return f"{what} {path} is there"
    return None


async def vm_use_of(images: Images, entry: VmEntry, root: Path) -> str | None:
    """How the VM ``entry`` uses the datastore at ``root`` (resolved), or None."""
    direct = await asyncio.to_thread(_direct_use, entry, root)
    if direct is not None:
        return direct
    for disk in entry.spec.disks if entry.spec else []:
        chain = await chain_paths(images, entry.paths.resolve(disk.path))
        for i, path in enumerate(chain):
            if await asyncio.to_thread(_inside, path, root):
                what = f"disk {disk.name}" if i == 0 else f"a backing file of disk {disk.name}"
                return f"{what} ({path}) is there"
    return None


class DatastoreService:
    """The datastores of a host: both host.toml's and the added ones."""

    def __init__(self, service: HostService, emit: Emit | None = None) -> None:
        self._service = service
        self.config = service.config
        self.registry = DatastoreRegistry(service.config)
        self._emit = emit

    def emit(self, kind: str, name: str, message: str, **data: Any) -> None:
        if self._emit is not None:
            self._emit(kind, f"datastore/{name}", message, **data)

    def _origin_of(self, ds: DatastoreConfig) -> storage.DatastoreOrigin:
        defined = any(d.name == ds.name for d in self.config.datastores)
        return "host.toml" if defined else "added"

    async def _infos(self, configs: list[DatastoreConfig]) -> list[Datastore]:
        vms = await all_vm_files(self._service)
        found = []
        for ds in configs:
            space = await asyncio.to_thread(
                storage.datastore_space, ds.name, ds.path, self._origin_of(ds)
            )
            found.append(with_vm_usage(space, ds.path, vms))
        return found

    # Reading

    async def list_datastores(self) -> list[Datastore]:
        """Every datastore with its space, filesystem, and the VMs in it."""
        configs = await asyncio.to_thread(self.config.all_datastores)
        return await self._infos(configs)

    async def get_datastore(self, name: str) -> Datastore:
        config = await asyncio.to_thread(self.config.datastore, name)
        [info] = await self._infos([config])
        return info

    async def vm_storage(self, name: str) -> VmStorage:
        """A VM's space per disk and in total (``thinvisor.host.storage_usage``)."""
        return await vm_storage(self._service, name)

    async def users(self, ds: DatastoreConfig) -> dict[str, str]:
        """The VMs that use the datastore ``ds``, each with how it does."""
        root = await asyncio.to_thread(ds.path.resolve)
        entries = await asyncio.to_thread(self._service.inventory.entries)
        found: dict[str, str] = {}
        for entry in entries:
            use = await vm_use_of(self._service.images, entry, root)
            if use is not None:
                found[entry.name] = use
        return found

    # Adding and removing

    async def add_datastore(self, name: str, path: str | Path) -> Datastore:
        """Add an existing directory (a mounted NFS or CIFS share too) as a datastore."""
        ds = await asyncio.to_thread(self.registry.add, name, path)
        info = await self.get_datastore(ds.name)
        kind = f" ({info.filesystem}{', shared' if info.shared else ''})" if info.filesystem else ""
        self.emit(
            "datastore.added", ds.name, f"datastore added: {ds.path}{kind}", path=str(ds.path)
        )
        return info

    async def remove_datastore(self, name: str) -> None:
        """Forget an added datastore that no VM uses; no file is deleted."""
        ds = await asyncio.to_thread(self.registry.check_removable, name)
        async with self._service.inventory.lock(".inventory"):
            users = await self.users(ds)
            if users:
                vms = "; ".join(f"vm {vm!r}: {use}" for vm, use in users.items())
                raise Busy(f"datastore {name!r} is in use ({vms})")
            await asyncio.to_thread(self.registry.remove, name)
        self.emit("datastore.removed", name, f"datastore removed; its files stay in {ds.path}")

    # Files

    async def _root(self, ds: str) -> Path:
        return (await asyncio.to_thread(self.config.datastore, ds)).path

    async def list_dir(self, ds: str, path: str = "") -> list[FileEntry]:
        """A directory's entries; for a file, its own entry."""
        root = await self._root(ds)
        target = await asyncio.to_thread(storage.safe_path, root, path)
        if await asyncio.to_thread(target.is_dir):
            return await asyncio.to_thread(storage.list_dir, root, path)
        return [await asyncio.to_thread(storage.file_entry, root, target)]

    async def make_dir(self, ds: str, path: str) -> FileEntry:
        return await asyncio.to_thread(storage.make_dir, await self._root(ds), path)

    async def delete(self, ds: str, path: str) -> FileEntry:
        """Delete a file, a link or an empty directory (not inside a VM's directory)."""
        return await asyncio.to_thread(storage.delete, await self._root(ds), path)

    async def upload(
        self, ds: str, path: str, local: Path, *, overwrite: bool = False
    ) -> FileEntry:
        """Copy the local file ``local`` to ``path`` in the datastore, atomically."""
        root = await self._root(ds)
        size = await asyncio.to_thread(local_source, local)
        await asyncio.to_thread(storage.upload_target, root, path, overwrite=overwrite)
        free = await asyncio.to_thread(storage.free_bytes, root)
        if free is not None and size > free:
            raise InsufficientResources(f"the datastore has only {free} bytes free")
        return await storage.upload(
            root, path, file_chunks(local), max_bytes=sys.maxsize, overwrite=overwrite
        )

    async def download(self, ds: str, path: str, local: Path, *, overwrite: bool = False) -> Path:
        """Copy a file of the datastore to ``local`` (a file, or a directory to put it in),
        atomically; an existing file is replaced only with ``overwrite``. The file written."""
        root = await self._root(ds)
        source, _ = await asyncio.to_thread(storage.open_file, root, path)
        target = await asyncio.to_thread(download_target, local, source.name)
        await storage.write_stream(
            target, file_chunks(source), max_bytes=sys.maxsize, overwrite=overwrite
        )
        return target
