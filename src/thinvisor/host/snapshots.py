"""Snapshots of a VM, stopped or running: take, revert, delete (``HostService`` calls these).

Taking a snapshot freezes each writable disk's active file under a new qcow2 overlay
(``<disk>-000001.qcow2``); on a running VM the overlays are switched in by one QMP
``transaction`` while the vCPUs are stopped, and the memory state is saved next to the
snapshot. Reverting powers the VM off, puts fresh overlays on the snapshot's frozen
files and, when the snapshot has memory, restores the running state. Deleting merges a
snapshot's frozen files into the files on top of them (``block-stream`` for those a
running QEMU holds, ``qemu-img rebase`` for the others), so every chain stays whole.

Crash safety: ``vm.toml`` is the commit point for the active files, and the tree
(``snapshots/tree.toml``) is written before it. ``repair`` runs before every operation
and settles what a crash left: a snapshot whose frozen file is still a disk's active
file was never committed and is dropped; files in the tree's trash are deleted once
nothing refers to them; overlays nothing refers to are removed while the VM is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinvisor.errors import Busy, QemuError, ThinvisorError
from thinvisor.fs import atomic_write, fsync_dir
from thinvisor.host.chains import real, users_of
from thinvisor.host.engine import blocks
from thinvisor.host.engine.paths import VmPaths
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.events import iso_time
from thinvisor.host.inventory import VmEntry, dump_spec, load_spec, save_spec
from thinvisor.host.state import Action, PowerState
from thinvisor.host.tasks import Progress
from thinvisor.model.vm import DiskSpec, VmSpec
from thinvisor.storage.snapshots import (
    MEMORY_NAME,
    OVERLAY_RE,
    SPEC_NAME,
    Snapshot,
    SnapshotCreate,
    SnapshotTree,
    load_tree,
    overlay_name,
    save_tree,
    snapshot_dir,
    snapshots_dir,
)

if TYPE_CHECKING:
    from thinvisor.host.service import HostService

log = logging.getLogger(__name__)

LIVE = (PowerState.RUNNING, PowerState.PAUSED)


# --- Files ----------------------------------------------------------------------------


def spec_path(paths: VmPaths, path: Path) -> str:
    """How the spec names ``path``: relative inside the VM directory, else absolute."""
    if path.parent == paths.vm_dir:
        return path.name
    return str(path)


def backing_ref(image: Path, backing: Path) -> str:
    """What an image's header names its backing file: a plain name in the same
    directory (so a VM directory can move), else the absolute path."""
    if backing.parent == image.parent:
        return backing.name
    return str(backing)


def _home_dir(paths: VmPaths, active: Path) -> Path:
    """Where a disk's overlays go: next to its active file when that lies in a directory
    of this VM (its home, or ``<datastore>/<vm>/`` after a move), else the home."""
    if active.parent.name == paths.vm_dir.name:
        return active.parent
    return paths.vm_dir


def new_overlay_path(tree: SnapshotTree, paths: VmPaths, disk: DiskSpec) -> Path:
    """A free overlay name for ``disk``, counted up in the tree (which the caller saves)."""
    directory = _home_dir(paths, paths.resolve(disk.path))
    while True:
        candidate = directory / overlay_name(disk.name, tree.next_file)
        tree.next_file += 1
        if not os.path.lexists(candidate):
            return candidate


def _referenced(paths: VmPaths, spec: VmSpec, tree: SnapshotTree) -> set[str]:
    files = {real(paths.resolve(d.path)) for d in spec.disks}
    return files | {real(paths.resolve(f)) for f in tree.frozen_files()}


def _vm_dirs(paths: VmPaths, spec: VmSpec, tree: SnapshotTree) -> set[Path]:
    dirs = {paths.vm_dir}
    for f in [d.path for d in spec.disks] + sorted(tree.frozen_files()):
        parent = paths.resolve(f).parent
        if parent.name == paths.vm_dir.name:
            dirs.add(parent)
    return dirs


def _delete(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)


# --- Repair ---------------------------------------------------------------------------


async def repair(
    service: HostService, entry: VmEntry, spec: VmSpec, state: PowerState
) -> SnapshotTree:
    """Settle what an interrupted snapshot operation left; return the tree."""
    paths = entry.paths
    tree = load_tree(paths.vm_dir)
    changed = _drop_uncommitted(paths, spec, tree)
    if tree.trash:
        _empty_trash(paths, spec, tree)
        changed = True
    changed |= await _find_current(service, paths, spec, tree)
    if changed:
        save_tree(paths.vm_dir, tree)
    if state is PowerState.STOPPED or state is PowerState.SUSPENDED:
        _remove_orphans(paths, spec, tree)
    return tree


def _drop_uncommitted(paths: VmPaths, spec: VmSpec, tree: SnapshotTree) -> bool:
    active = {real(paths.resolve(d.path)) for d in spec.disks}
    dropped = False
    for snap in list(tree.snapshots):
        if any(real(paths.resolve(f)) in active for f in snap.disks.values()):
            log.warning("vm %s: snapshot %d was never completed; dropped", spec.name, snap.id)
            tree.snapshots.remove(snap)
            if tree.current == snap.id:
                tree.current = snap.parent
            shutil.rmtree(snapshot_dir(paths.vm_dir, snap.id), ignore_errors=True)
            dropped = True
    return dropped


def _empty_trash(paths: VmPaths, spec: VmSpec, tree: SnapshotTree) -> None:
    keep = _referenced(paths, spec, tree)
    for name in tree.trash:
        path = paths.resolve(name)
        if real(path) not in keep:
            _delete(path)
    tree.trash = []


async def _find_current(
    service: HostService, paths: VmPaths, spec: VmSpec, tree: SnapshotTree
) -> bool:
    """Point ``current`` at the snapshot the active files sit on (a revert may have
    committed ``vm.toml`` and not yet the tree)."""
    if not tree.snapshots:
        return False
    frozen = {real(paths.resolve(f)): s.id for s in tree.snapshots for f in s.disks.values()}
    for disk in spec.disks:
        if disk.readonly:
            continue
        info = await service.images.info(paths.resolve(disk.path))
        backing = info.backing_path
        found = frozen.get(real(backing)) if backing is not None else None
        if found is not None:
            if tree.current != found:
                tree.current = found
                return True
            return False
    return False


def _remove_orphans(paths: VmPaths, spec: VmSpec, tree: SnapshotTree) -> None:
    keep = _referenced(paths, spec, tree)
    for directory in _vm_dirs(paths, spec, tree):
        with contextlib.suppress(FileNotFoundError):
            for f in directory.iterdir():
                if OVERLAY_RE.match(f.name) and real(f) not in keep:
                    log.info("vm %s: removing unused overlay %s", spec.name, f)
                    _delete(f)
    ids = {str(s.id) for s in tree.snapshots}
    with contextlib.suppress(FileNotFoundError):
        for d in snapshots_dir(paths.vm_dir).iterdir():
            if d.is_dir() and d.name not in ids:
                shutil.rmtree(d, ignore_errors=True)


async def repair_all(service: HostService) -> list[str]:
    """Repair every VM that has snapshots (the agent does this as it starts); return
    the names of the VMs whose repair failed, each reported in the log."""
    failed = []
    for entry in service.inventory.entries():
        if entry.spec is None or not snapshots_dir(entry.paths.vm_dir).is_dir():
            continue
        try:
            async with service.inventory.lock(entry.name):
                state, _, _ = await service.state_of(entry)
                await repair(service, entry, entry.spec, state)
        except ThinvisorError as exc:
            log.warning("vm %s: snapshot repair failed: %s", entry.name, exc)
            failed.append(entry.name)
    return failed


# --- Listing --------------------------------------------------------------------------


async def list_snapshots(service: HostService, name: str) -> SnapshotTree:
    entry, _ = service.inventory.get_valid(name)
    return load_tree(entry.paths.vm_dir)


def snapshot_spec(entry: VmEntry, snap: Snapshot) -> VmSpec:
    """The VM's configuration when ``snap`` was taken."""
    return load_spec(snapshot_dir(entry.paths.vm_dir, snap.id) / SPEC_NAME)


# --- Taking ---------------------------------------------------------------------------


@dataclass
class _Taking:
    """A snapshot being taken: what has been made so far, to undo it on failure."""

    entry: VmEntry
    spec: VmSpec
    tree: SnapshotTree
    snap: Snapshot
    overlays: dict[str, Path]
    live: bool
    was_running: bool
    committed: bool = False

    @property
    def directory(self) -> Path:
        return snapshot_dir(self.entry.paths.vm_dir, self.snap.id)

    def new_spec(self) -> VmSpec:
        disks = []
        for d in self.spec.disks:
            overlay = self.overlays.get(d.name)
            if overlay is None:
                disks.append(d)
            else:
                path = spec_path(self.entry.paths, overlay)
                disks.append(d.model_copy(update={"path": path, "format": "qcow2"}))
        return self.spec.model_copy(update={"disks": disks})


async def take_snapshot(
    service: HostService, name: str, req: SnapshotCreate, progress: Progress | None = None
) -> Snapshot:
    """Snapshot the VM's disks (and, running, its memory when ``req.memory``)."""
    async with service.inventory.lock(name):
        entry, spec, state = await service._locked_state(name, Action.SNAPSHOT)
        return await take_locked(service, entry, spec, state, req, progress)


async def take_locked(
    service: HostService,
    entry: VmEntry,
    spec: VmSpec,
    state: PowerState,
    req: SnapshotCreate,
    progress: Progress | None = None,
) -> Snapshot:
    """``take_snapshot`` for a caller that holds the VM's lock and checked its state."""
    name = entry.name
    tree = await repair(service, entry, spec, state)
    tree.check_name(req.name, tree.current)
    snap = Snapshot(
        id=tree.next_id,
        name=req.name,
        description=req.description,
        created=iso_time(time.time()),
        parent=tree.current,
        power_state=state.value,
        disks={d.name: d.path for d in spec.disks if not d.readonly},
    )
    taking = _Taking(entry, spec, tree, snap, {}, state in LIVE, state is PowerState.RUNNING)
    try:
        await _prepare(service, taking)
        if taking.live:
            await _switch_live(taking)
        taking.committed = True
    except BaseException:
        await _undo(taking)
        raise
    if taking.live:
        await _finish_live(taking, req.memory, progress)
    service.emit(
        "vm.snapshot_taken",
        name,
        f"snapshot {snap.name!r} taken" + (" with memory" if snap.memory else ""),
        snapshot=snap.id,
    )
    return snap


async def _prepare(service: HostService, t: _Taking) -> None:
    """Overlays, the snapshot's directory, the tree, then ``vm.toml`` (the commit)."""
    paths = t.entry.paths
    for disk in t.spec.disks:
        if disk.readonly:
            continue
        overlay = new_overlay_path(t.tree, paths, disk)
        active = paths.resolve(disk.path)
        await service.images.create_overlay(overlay, backing_ref(overlay, active), disk.format)
        t.overlays[disk.name] = overlay
        if t.live:
            await service.isolation.grant(t.spec, paths, overlay, writable=True)
    t.directory.mkdir(parents=True)
    atomic_write(t.directory / SPEC_NAME, dump_spec(t.spec))
    if t.live and t.was_running:
        # The vCPUs stop before the commit: from here on, what QEMU writes is either
        # still in the frozen files (crash before the switch) or in the overlays.
        async with Monitor(t.spec.name, paths.qmp_socket) as mon:
            await mon.stop()
    t.tree.snapshots.append(t.snap)
    t.tree.current = t.snap.id
    t.tree.next_id += 1
    save_tree(paths.vm_dir, t.tree)
    save_spec(paths, t.new_spec())


async def _switch_live(t: _Taking) -> None:
    """Put the overlays under the running disks, all in one QMP transaction."""
    if not t.overlays:
        return
    async with Monitor(t.spec.name, t.entry.paths.qmp_socket) as mon:
        actions, added = [], []
        try:
            for disk, overlay in t.overlays.items():
                node = f"{disk}-o{t.snap.id}"
                top = await blocks.top_node(mon, disk)
                await mon.blockdev_add(
                    {
                        "driver": "qcow2",
                        "node-name": node,
                        "file": {"driver": "file", "filename": str(overlay)},
                        "backing": None,
                        "discard": "unmap",
                    }
                )
                added.append(node)
                actions.append(
                    {"type": "blockdev-snapshot", "data": {"node": top, "overlay": node}}
                )
            await mon.command("transaction", actions=actions)
        except BaseException:
            for node in added:
                with contextlib.suppress(QemuError):
                    await mon.blockdev_del(node)
            raise


async def _undo(t: _Taking) -> None:
    """Put back what ``_prepare`` changed: nothing of the snapshot remains."""
    paths = t.entry.paths
    save_spec(paths, t.spec)
    if t.snap in t.tree.snapshots:
        t.tree.snapshots.remove(t.snap)
        t.tree.current = t.snap.parent
        save_tree(paths.vm_dir, t.tree)
    for overlay in t.overlays.values():
        _delete(overlay)
    shutil.rmtree(t.directory, ignore_errors=True)
    if t.live and t.was_running:
        with contextlib.suppress(QemuError):
            async with Monitor(t.spec.name, paths.qmp_socket) as mon:
                await mon.cont()


async def _finish_live(t: _Taking, memory: bool, progress: Progress | None) -> None:
    """Save the memory state (when asked) and let the vCPUs go again."""
    paths = t.entry.paths
    error: QemuError | None = None
    async with Monitor(t.spec.name, paths.qmp_socket) as mon:
        if memory:
            if progress is not None:
                progress.update(50, "saving the memory state")
            try:
                await _save_memory(mon, t.directory)
                t.snap.memory = True
                save_tree(paths.vm_dir, t.tree)
            except QemuError as exc:
                error = exc
        # After saving, QEMU's disks are handed over (inactive) until the VM runs again:
        # a paused VM runs for an instant to take them back, then stops.
        if t.was_running or memory:
            await mon.cont()
        if not t.was_running and memory:
            await mon.stop()
    if error is not None:
        raise QemuError(
            f"snapshot {t.snap.name!r} was taken without memory: saving it failed: {error}"
        )


async def _save_memory(mon: Monitor, directory: Path) -> None:
    final = directory / MEMORY_NAME
    partial = directory / (MEMORY_NAME + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await mon.migrate_to_fd(fd)
        await asyncio.to_thread(os.fsync, fd)  # the whole of the guest's memory
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    partial.rename(final)
    fsync_dir(directory)


# --- Reverting ------------------------------------------------------------------------


async def revert_snapshot(
    service: HostService, name: str, ref: str, progress: Progress | None = None
) -> Snapshot:
    """Go back to a snapshot: its disks and configuration, and its running state when
    it has memory; the VM's current state is discarded (its unsnapshotted changes)."""
    async with service.inventory.lock(name):
        entry, spec, state = await service._locked_state(name, Action.REVERT_SNAPSHOT)
        tree = await repair(service, entry, spec, state)
        snap = tree.find(name, ref)
        old = snapshot_spec(entry, snap)
        if state in LIVE:
            await service._force_off(entry, f"reverted to snapshot {snap.name!r}")
        elif state is PowerState.SUSPENDED:
            _delete(entry.paths.suspend_state)
        reverted = await _fresh_overlays(service, entry.paths, tree, snap, old)
        reverted = reverted.model_copy(
            update={"autostart": spec.autostart, "autostart_order": spec.autostart_order}
        )
        # The overlays of the current state go; a disk added since the snapshot keeps
        # its file (it is detached, as on ESXi), and frozen files stay with their snapshots.
        frozen = tree.frozen_files()
        tree.trash += [
            d.path
            for d in spec.disks
            if OVERLAY_RE.match(Path(d.path).name) and d.path not in frozen
        ]
        tree.current = snap.id
        save_tree(entry.paths.vm_dir, tree)
        save_spec(entry.paths, reverted)
        _empty_trash(entry.paths, reverted, tree)
        save_tree(entry.paths.vm_dir, tree)
        if snap.memory:
            if progress is not None:
                progress.update(50, "restoring the memory state")
            await _resume_from(service, entry, reverted, snap)
        service.emit(
            "vm.snapshot_reverted", name, f"reverted to snapshot {snap.name!r}", snapshot=snap.id
        )
        return snap


async def _fresh_overlays(
    service: HostService, paths: VmPaths, tree: SnapshotTree, snap: Snapshot, old: VmSpec
) -> VmSpec:
    """``old`` with a new overlay on each of ``snap``'s frozen files."""
    disks: list[DiskSpec] = []
    try:
        for disk in old.disks:
            frozen = snap.disks.get(disk.name)
            if frozen is None:
                disks.append(disk)
                continue
            overlay = new_overlay_path(tree, paths, disk.model_copy(update={"path": frozen}))
            ref = backing_ref(overlay, paths.resolve(frozen))
            await service.images.create_overlay(overlay, ref, disk.format)
            path = spec_path(paths, overlay)
            disks.append(disk.model_copy(update={"path": path, "format": "qcow2"}))
    except BaseException:
        for d in disks:
            if OVERLAY_RE.match(Path(d.path).name) and d.path not in tree.frozen_files():
                _delete(paths.resolve(d.path))
        raise
    return old.model_copy(update={"disks": disks})


async def _resume_from(service: HostService, entry: VmEntry, spec: VmSpec, snap: Snapshot) -> None:
    """Start QEMU on the snapshot's saved state (kept: it may be reverted to again)."""
    await service.load_state(
        entry,
        spec,
        snapshot_dir(entry.paths.vm_dir, snap.id) / MEMORY_NAME,
        keep=True,
        run=snap.power_state == "running",
        failure="restoring the snapshot's memory state failed",
    )


# --- Deleting -------------------------------------------------------------------------


async def delete_snapshot(
    service: HostService, name: str, ref: str, progress: Progress | None = None
) -> Snapshot:
    """Delete a snapshot, merging its frozen files into what sits on them."""
    async with service.inventory.lock(name):
        entry, spec, state = await service._locked_state(name, Action.DELETE_SNAPSHOT)
        tree = await repair(service, entry, spec, state)
        snap = tree.find(name, ref)
        frozen = {disk: entry.paths.resolve(f) for disk, f in snap.disks.items()}
        users = await users_of(service, {real(p) for p in frozen.values()}, exclude=name)
        if users:
            raise Busy(f"snapshot {snap.name!r} is the base of linked clone {users[0]!r}")
        merging = _Merging(service, entry, state in LIVE, progress, len(frozen))
        for disk, path in frozen.items():
            await merging.merge(disk, path, _referenced_except(entry.paths, spec, tree, snap))
        for child in tree.children(snap.id):
            child.parent = snap.parent
        if tree.current == snap.id:
            tree.current = snap.parent
        tree.snapshots.remove(snap)
        tree.trash += list(snap.disks.values())
        save_tree(entry.paths.vm_dir, tree)
        if merging.live:
            await merging.drop_nodes()
        _empty_trash(entry.paths, spec, tree)
        save_tree(entry.paths.vm_dir, tree)
        await asyncio.to_thread(
            shutil.rmtree, snapshot_dir(entry.paths.vm_dir, snap.id), ignore_errors=True
        )
        service.emit(
            "vm.snapshot_deleted", name, f"snapshot {snap.name!r} deleted", snapshot=snap.id
        )
        return snap


def _referenced_except(
    paths: VmPaths, spec: VmSpec, tree: SnapshotTree, snap: Snapshot
) -> list[Path]:
    files = {paths.resolve(d.path) for d in spec.disks}
    for s in tree.snapshots:
        if s.id != snap.id:
            files |= {paths.resolve(f) for f in s.disks.values()}
    return sorted(files)


@dataclass
class _Merging:
    service: HostService
    entry: VmEntry
    live: bool
    progress: Progress | None
    disks: int
    done: int = 0

    def __post_init__(self) -> None:
        self.stale: dict[str, list[str]] = {}  # disk -> thinvisor's nodes left unused

    async def merge(self, disk: str, frozen: Path, candidates: list[Path]) -> None:
        """Rebase every image whose backing file is ``frozen`` onto ``frozen``'s own."""
        images = self.service.images
        info = await images.info(frozen)
        base = info.backing_path
        for child in candidates:
            child_info = await images.info(child)
            if child_info.backing_path is None or real(child_info.backing_path) != real(frozen):
                continue
            ref = backing_ref(child, base) if base is not None else None
            if not (self.live and await self._stream(disk, child, frozen, base, ref)):
                await images.rebase(child, ref, info.backing_format)
        self.done += 1
        if self.progress is not None:
            self.progress.update(100 * self.done // max(1, self.disks), f"merged disk {disk}")

    async def _stream(
        self, disk: str, child: Path, frozen: Path, base: Path | None, ref: str | None
    ) -> bool:
        """Stream ``frozen`` into ``child`` inside QEMU when QEMU holds ``child``."""
        vm, sock = self.entry.name, self.entry.paths.qmp_socket
        async with Monitor(vm, sock) as mon:
            chain = await blocks.chain_nodes(mon, disk)
            node = blocks.node_of(chain, child)
            if node is None:
                return False
            frozen_node = blocks.node_of(chain, frozen)
            job_id = f"stream-{disk}-{int(time.monotonic() * 1000)}"
            args: dict[str, Any] = {"job-id": job_id, "device": node.name, "auto-dismiss": False}
            if base is not None:
                base_node = blocks.node_of(chain, base)
                if base_node is None:
                    raise QemuError(f"vm {vm!r}: {base} is not in disk {disk}'s chain")
                args |= {"base-node": base_node.name, "backing-file": ref}
            await mon.execute("block-stream", args)
        await blocks.run_job(vm, sock, job_id)
        if frozen_node is not None:
            self.stale.setdefault(disk, []).append(frozen_node.name)
        return True

    async def drop_nodes(self) -> None:
        if not self.stale:
            return
        async with Monitor(self.entry.name, self.entry.paths.qmp_socket) as mon:
            for disk, names in self.stale.items():
                await blocks.delete_own_nodes(mon, disk, names)
