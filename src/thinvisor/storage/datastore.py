"""Datastores as clients see them: capacity, directory listings, uploads, deletes.

Every path a client gives is relative to a datastore's root and goes through
``safe_path`` first, which refuses anything that could reach outside the datastore. A
VM's own directory (``<datastore>/<vm>/``, holding its ``vm.toml``) is managed by the VM
actions: it may be listed and read, never written to or deleted from here. Names starting
with '.' are reserved (uploads in progress, VMs being created or deleted): they are not
listed and cannot be named.

Uploads stream into a hidden temporary file next to the target and are renamed into
place once whole and fsynced, so the target is either absent, the old file, or the
complete new one. File I/O runs in worker threads, never on the event loop.

A datastore may be a mounted shared filesystem (NFS, CIFS, ...): ``mount_of`` finds the
mount that holds its directory in ``/proc/self/mountinfo``, and ``datastore_space`` says
its filesystem type and whether that is a network filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, Field

from thinvisor.errors import (
    CIM_ERR_FAILED,
    AlreadyExists,
    InsufficientResources,
    InvalidArgument,
    NotFound,
    ThinvisorError,
)
from thinvisor.fs import fsync_dir
from thinvisor.host.engine.paths import CONFIG_NAME

UPLOAD_INFIX = ".upload-"
# Chunks are gathered up to this size before one write in a worker thread.
WRITE_BATCH = 1 << 20
FILE_MODE = 0o644
# Linux's limits, less room for an upload's temporary name ('.' + name + infix + 8).
NAME_MAX = 255 - 1 - len(UPLOAD_INFIX) - 8
PATH_MAX = 4096 - 32

FileKind = Literal["file", "dir", "link"]
DatastoreOrigin = Literal["host.toml", "added"]

MOUNTINFO = Path("/proc/self/mountinfo")
# Filesystems whose files other hosts can reach too: a datastore on one is shared.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs",
        "ocfs2", "gfs2", "afs", "beegfs", "davfs", "fuse.sshfs", "fuse.glusterfs",
        "fuse.ceph", "fuse.cephfs", "fuse.davfs2", "fuse.s3fs", "fuse.rclone",
    }
)  # fmt: skip


class TooLarge(ThinvisorError):
    """More bytes were sent than the limit allows."""

    http_status = 413
    cim_status = CIM_ERR_FAILED


class DatastoreVm(BaseModel):
    """A VM with files in a datastore, and the space they take there."""

    name: str
    provisioned_bytes: int = Field(
        description="the virtual sizes of the VM's disks whose files lie in the datastore"
    )
    used_bytes: int = Field(
        description="bytes allocated to the VM's files in the datastore: its directory, "
        "and its disks kept elsewhere in the datastore"
    )


class Datastore(BaseModel):
    """A datastore and its space; the numbers are None when its directory is missing."""

    name: str
    path: str
    accessible: bool
    capacity_bytes: int | None
    free_bytes: int | None
    # Space the VM directories' files occupy on disk (allocated blocks, not sizes).
    vm_used_bytes: int | None
    origin: DatastoreOrigin = Field(
        default="host.toml",
        description="defined in host.toml, or added at runtime (only those can be removed)",
    )
    filesystem: str | None = Field(
        default=None, description="the type of the filesystem holding it (ext4, nfs4, cifs...)"
    )
    mount_source: str | None = Field(
        default=None, description="what is mounted there: a device, or server:/export"
    )
    shared: bool = Field(default=False, description="whether it is on a network filesystem")
    provisioned_bytes: int | None = Field(
        default=None,
        description="the virtual sizes of the VM disks whose files lie in it, each file once",
    )
    vms: list[DatastoreVm] = Field(default_factory=list)


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where, what type, and what is mounted."""

    mount_point: Path
    fstype: str
    source: str

    @property
    def shared(self) -> bool:
        return self.fstype in NETWORK_FILESYSTEMS


_ESCAPE_RE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``mountinfo`` file, in its order (a later one may cover an earlier)."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        # ID, parent, dev, root, mount point, options, optional fields..., "-", type, source
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3:
            continue
        point, fstype, source = fields[4], fields[sep + 1], fields[sep + 2]
        mounts.append(Mount(Path(_unescape(point)), _unescape(fstype), _unescape(source)))
    return mounts


def mount_of(path: Path, mountinfo: Path = MOUNTINFO) -> Mount | None:
    """The mount that holds ``path`` (symbolic links followed); None when unknown."""
    try:
        text = mountinfo.read_text()
        real = path.resolve()
    except (OSError, RuntimeError):
        return None
    found: Mount | None = None
    for mount in parse_mountinfo(text):
        deeper = found is None or len(mount.mount_point.parts) >= len(found.mount_point.parts)
        if real.is_relative_to(mount.mount_point) and deeper:
            found = mount
    return found


class FileEntry(BaseModel):
    """A file, directory or symbolic link in a datastore."""

    name: str
    path: str  # relative to the datastore's root, '/'-separated
    kind: FileKind
    size: int | None  # bytes, for files; None for directories and links
    modified: str  # ISO 8601 UTC


def safe_path(root: Path, relpath: str) -> Path:
    """The path inside the datastore at ``root`` that a client's ``relpath`` names.

    Refused with ``InvalidArgument("path", ...)``: absolute paths, NUL bytes, '..' and
    other names starting with '.', and anything whose resolved path (symbolic links
    followed) lies outside the datastore. '' names the root. The path returned is
    ``root`` joined with ``relpath``, not resolved: a link stays a link.
    """
    if "\0" in relpath:
        raise InvalidArgument("path", "must not contain NUL bytes")
    if relpath.startswith("/"):
        raise InvalidArgument("path", "must be relative to the datastore")
    parts = [p for p in relpath.split("/") if p]
    if ".." in parts:
        raise InvalidArgument("path", "must not contain '..'")
    if any(p.startswith(".") for p in parts):
        raise InvalidArgument("path", "names starting with '.' are reserved")
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise InvalidArgument("path", f"names must be at most {NAME_MAX} bytes long")
    path = root.joinpath(*parts)
    if len(os.fsencode(path)) >= PATH_MAX:
        raise InvalidArgument("path", "is too long")
    try:
        real = path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before 3.13)
        raise InvalidArgument("path", f"cannot be resolved: {exc}") from None
    if not real.is_relative_to(root.resolve()):
        raise InvalidArgument("path", "leads outside the datastore")
    return path


def relative(root: Path, path: Path) -> str:
    """``path`` (from ``safe_path``) as the client names it: '/'-separated, '' for root."""
    rel = path.relative_to(root)
    return "" if rel == Path() else PurePosixPath(rel).as_posix()


def vm_directory(root: Path, path: Path) -> str | None:
    """The name of the VM whose directory holds ``path`` (or is it), after resolving."""
    real_root = root.resolve()
    parts = path.resolve().relative_to(real_root).parts
    if parts and (real_root / parts[0] / CONFIG_NAME).is_file():
        return parts[0]
    return None


def check_writable(root: Path, path: Path) -> None:
    """Refuse changes inside VM directories, and a ``vm.toml`` that would register one."""
    if path == root:
        raise InvalidArgument("path", "the datastore's root cannot be changed")
    vm = vm_directory(root, path)
    if vm is not None:
        raise InvalidArgument("path", f"lies in the directory of vm {vm!r}; use VM actions")
    rel = path.resolve().relative_to(root.resolve())
    if len(rel.parts) == 2 and rel.name == CONFIG_NAME:
        raise InvalidArgument("path", f"{CONFIG_NAME} is written by VM actions")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entry(root: Path, path: Path, st: os.stat_result) -> FileEntry:
    kind: FileKind = "file"
    if stat.S_ISLNK(st.st_mode):
        kind = "link"
    elif stat.S_ISDIR(st.st_mode):
        kind = "dir"
    size = st.st_size if kind == "file" else None
    return FileEntry(
        name=path.name, path=relative(root, path), kind=kind, size=size, modified=_iso(st.st_mtime)
    )


def file_entry(root: Path, path: Path) -> FileEntry:
    """The entry for ``path`` (from ``safe_path``); NotFound when there is none."""
    try:
        return _entry(root, path, path.lstat())
    except FileNotFoundError:
        raise NotFound(f"{relative(root, path) or '/'} does not exist") from None


def list_dir(root: Path, relpath: str) -> list[FileEntry]:
    """The entries of a directory, sorted by name, hidden ones left out."""
    path = safe_path(root, relpath)
    if not path.exists():
        raise NotFound(f"{relpath or '/'} does not exist")
    if not path.is_dir():
        raise InvalidArgument("path", f"{relpath} is not a directory")
    entries: list[FileEntry] = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        with contextlib.suppress(FileNotFoundError):  # deleted while we looked
            entries.append(_entry(root, child, child.lstat()))
    return entries


def _allocated(directory: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def allocated_bytes(path: Path) -> int:
    """Bytes allocated on disk to a file, or to every file under a directory (blocking);
    0 for what does not exist."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    return _allocated(path) if stat.S_ISDIR(st.st_mode) else st.st_blocks * 512


def vm_usage(root: Path) -> int:
    """Bytes allocated to the files of the VM directories in the datastore (blocking)."""
    try:
        tops = [p for p in root.iterdir() if not p.name.startswith(".")]
    except FileNotFoundError:
        return 0
    return sum(_allocated(p) for p in tops if (p / CONFIG_NAME).is_file())


def datastore_space(name: str, root: Path, origin: DatastoreOrigin = "host.toml") -> Datastore:
    """Capacity, free space and filesystem of a datastore, without walking its files
    (``vm_used_bytes`` is left None). Blocking."""
    try:
        fs = os.statvfs(root)
    except OSError:  # missing, or a share that does not answer (ESTALE, EIO, EACCES)
        return Datastore(
            name=name,
            path=str(root),
            accessible=False,
            capacity_bytes=None,
            free_bytes=None,
            vm_used_bytes=None,
            origin=origin,
        )
    mount = mount_of(root)
    return Datastore(
        name=name,
        path=str(root),
        accessible=True,
        capacity_bytes=fs.f_blocks * fs.f_frsize,
        free_bytes=fs.f_bavail * fs.f_frsize,
        vm_used_bytes=None,
        origin=origin,
        filesystem=mount.fstype if mount else None,
        mount_source=mount.source if mount else None,
        shared=mount.shared if mount else False,
    )


def datastore_info(name: str, root: Path, origin: DatastoreOrigin = "host.toml") -> Datastore:
    """Capacity and free space of a datastore (blocking: it walks the VM directories)."""
    info = datastore_space(name, root, origin)
    if not info.accessible:
        return info
    return info.model_copy(update={"vm_used_bytes": vm_usage(root)})


def free_bytes(root: Path) -> int | None:
    try:
        fs = os.statvfs(root)
    except FileNotFoundError:
        return None
    return fs.f_bavail * fs.f_frsize


def _space_error(exc: OSError) -> ThinvisorError | None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientResources("the datastore is full")
    return None


class _TempFile:
    """The hidden file an upload is written to, next to its target.

    Its operations run in worker threads; a lock orders them against ``discard``, which
    the event loop calls on failure or cancellation while a write may still be running:
    the descriptor is never closed under a write (and so never reused by another file).
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        fd, name = tempfile.mkstemp(prefix=f".{target.name}{UPLOAD_INFIX}", dir=target.parent)
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                n = self.file.write(view)
                view = view[n or 0 :]

    def commit(self, overwrite: bool) -> None:
        """fsync, then move into place (without replacing unless ``overwrite``)."""
        with self._lock:
            os.fchmod(self.file.fileno(), FILE_MODE)
            os.fsync(self.file.fileno())
            self.file.close()
            if overwrite:
                check_target(self.target, overwrite)
                os.replace(self.path, self.target)
            else:
                try:
                    os.link(self.path, self.target)  # fails if the target appeared meanwhile
                except FileExistsError:
                    raise AlreadyExists(f"{self.target.name} already exists") from None
                self.path.unlink()
            fsync_dir(self.target.parent)

    def discard(self) -> None:
        """Close and remove the file, unless it was committed; blocks for a running write."""
        with self._lock:
            self.file.close()
            self.path.unlink(missing_ok=True)


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse to write over a directory, or over anything unless ``overwrite``."""
    if target.is_dir():
        raise InvalidArgument("path", f"{target.name} is a directory")
    if not overwrite and os.path.lexists(target):
        raise AlreadyExists(f"{target.name} already exists")


async def write_stream(
    target: Path,
    chunks: AsyncIterator[bytes],
    *,
    max_bytes: int,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> int:
    """Write ``chunks`` to ``target`` atomically; return the number of bytes written.

    ``TooLarge`` as soon as more than ``max_bytes`` arrive; ``AlreadyExists`` when
    ``target`` exists and not ``overwrite``; ``progress`` is called with the bytes
    received so far. On any failure or cancellation nothing is left behind.
    """
    check_target(target, overwrite)
    tmp = await asyncio.to_thread(_TempFile, target)
    try:
        total = await _copy(chunks, tmp, max_bytes, progress)
        await asyncio.to_thread(tmp.commit, overwrite)
    except OSError as exc:
        error = _space_error(exc)
        if error is None:
            raise
        raise error from exc
    finally:
        tmp.discard()
    return total


async def _copy(
    chunks: AsyncIterator[bytes],
    tmp: _TempFile,
    max_bytes: int,
    progress: Callable[[int], None] | None,
) -> int:
    total = 0
    batch = bytearray()
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"the upload exceeds the limit of {max_bytes} bytes")
        batch += chunk
        if len(batch) >= WRITE_BATCH:
            await asyncio.to_thread(tmp.write, bytes(batch))
            batch.clear()
        if progress is not None:
            progress(total)
    if batch:
        await asyncio.to_thread(tmp.write, bytes(batch))
    return total


def _make_parents(root: Path, target: Path) -> list[Path]:
    """Create ``target``'s missing parent directories; return them, deepest first."""
    root.mkdir(parents=True, exist_ok=True)
    missing = [p for p in target.parents if p.is_relative_to(root) and p != root]
    missing = [p for p in missing if not os.path.lexists(p)]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InvalidArgument("path", "a parent is not a directory") from None
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return  # used meanwhile (another upload): keep it and its parents


def upload_target(root: Path, relpath: str, *, overwrite: bool = False) -> Path:
    """Where an upload to ``relpath`` goes, if it may go there; nothing is changed."""
    target = safe_path(root, relpath)
    check_writable(root, target)
    check_target(target, overwrite)
    return target


async def upload(
    root: Path,
    relpath: str,
    chunks: AsyncIterator[bytes],
    *,
    max_bytes: int,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> FileEntry:
    """Store an uploaded file at ``relpath``, creating its parent directories.

    On failure, the directories it created are removed again (if still empty).
    """
    target = await asyncio.to_thread(upload_target, root, relpath, overwrite=overwrite)
    created = await asyncio.to_thread(_make_parents, root, target)
    try:
        await write_stream(
            target, chunks, max_bytes=max_bytes, progress=progress, overwrite=overwrite
        )
    except BaseException:
        _remove_empty(created)
        raise
    return await asyncio.to_thread(file_entry, root, target)


def make_dir(root: Path, relpath: str) -> FileEntry:
    """Create a directory and its missing parents; AlreadyExists if it exists."""
    path = safe_path(root, relpath)
    check_writable(root, path)
    if os.path.lexists(path):
        raise AlreadyExists(f"{relpath} already exists")
    _make_parents(root, path)
    try:
        path.mkdir()
    except FileExistsError:
        raise AlreadyExists(f"{relpath} already exists") from None
    return file_entry(root, path)


def delete(root: Path, relpath: str) -> FileEntry:
    """Delete a file, link or empty directory outside VM directories; return what it was."""
    path = safe_path(root, relpath)
    check_writable(root, path)
    entry = file_entry(root, path)
    try:
        if entry.kind == "dir":
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        raise NotFound(f"{relpath} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        raise InvalidArgument("path", f"directory {relpath} is not empty") from None
    fsync_dir(path.parent)
    return entry


def open_file(root: Path, relpath: str) -> tuple[Path, os.stat_result]:
    """A regular file to download, and its status; NotFound or InvalidArgument."""
    path = safe_path(root, relpath)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotFound(f"{relpath or '/'} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument("path", f"{relpath} is not a regular file")
    return path, st
