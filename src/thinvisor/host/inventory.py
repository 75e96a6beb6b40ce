"""The host's inventory: the set of VM directories in its datastores (host.toml's and the
added ones alike).

A directory ``<datastore>/<name>/`` holding a ``vm.toml`` is a registered VM. Hidden
directories (a VM being created, or being deleted) are not. A ``vm.toml`` that cannot
be read makes the VM *invalid*: it is listed with the parse error, and the others work.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import threading
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import Busy, InvalidArgument, InvalidConfig, NotFound
from thinvisor.fs import atomic_write, fsync_dir
from thinvisor.host.engine.paths import CONFIG_NAME, OWNER_NAME, VmPaths
from thinvisor.model.vm import VmSpec, parse_spec

# A VM directory being built or torn down is hidden under one of these names; a crash
# leaves it hidden, and ``Inventory.sweep`` removes it later.
CREATING = ".creating-"
DELETING = ".deleting-"


@dataclass(frozen=True)
class VmEntry:
    """A VM directory and what its ``vm.toml`` says (or why it cannot be read)."""

    name: str
    datastore: str
    paths: VmPaths
    spec: VmSpec | None
    error: str | None


def dump_spec(spec: VmSpec) -> str:
    return tomli_w.dumps(spec.model_dump(mode="json", exclude_none=True))


def load_spec(path: Path) -> VmSpec:
    """Read a ``vm.toml``; raise ``InvalidConfig`` naming the file and the problem."""
    return _spec_of(path, _read_toml(path))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidConfig(f"{path.name}: {exc}") from exc


def _spec_of(path: Path, data: dict[str, Any]) -> VmSpec:
    try:
        return parse_spec(data)
    except InvalidArgument as exc:
        raise InvalidConfig(f"{path.name}: {exc}") from exc


class _TomlCache:
    """``vm.toml`` documents already read, kept while the file is unchanged.

    Reading and decoding the TOML is most of the cost of a look at a VM, and the agent
    looks at all of them often (listings, the watcher, MAC checks). Every write
    replaces the file (a new inode); inode, size, mtime and ctime tell a changed file.
    Callers get a fresh ``VmSpec`` each time and may change it freely.
    """

    def __init__(self) -> None:
        self._docs: dict[str, tuple[tuple[int, int, int, int], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def load(self, path: Path) -> VmSpec:
        try:
            st = path.stat()
        except OSError as exc:
            raise InvalidConfig(f"{path.name}: {exc}") from exc
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            cached = self._docs.get(str(path))
        if cached is not None and cached[0] == key:
            data = cached[1]
        else:
            data = _read_toml(path)
            with self._lock:
                self._docs[str(path)] = (key, data)
        return _spec_of(path, data)

    def keep_only(self, paths: set[str]) -> None:
        """Forget the documents of every file not in ``paths`` (VMs gone)."""
        with self._lock:
            for stale in self._docs.keys() - paths:
                del self._docs[stale]


def save_spec(paths: VmPaths, spec: VmSpec) -> None:
    atomic_write(paths.config, dump_spec(spec))


HOST_ID_NAME = "host-id"


def host_id(state_dir: Path) -> str:
    """This host's id (made once, kept in the state directory): what a VM's ``owner``
    file names on a datastore that several hosts share."""
    path = state_dir / HOST_ID_NAME
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Written aside, then linked into place: of two processes making it at once, one wins
    # and both read the winner's.
    draft = state_dir / f".{HOST_ID_NAME}.{uuid.uuid4().hex}"
    atomic_write(draft, uuid.uuid4().hex + "\n")
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    fsync_dir(state_dir)
    return path.read_text().strip()


def owner_of(vm_dir: Path) -> str | None:
    """The id of the host a VM directory belongs to; None for one without an owner
    file (made before hosts shared datastores: it belongs to whoever sees it)."""
    try:
        return (vm_dir / OWNER_NAME).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError:  # unreadable: not ours to run
        return ""


def set_owner(vm_dir: Path, owner: str) -> None:
    """Give the VM directory to the host ``owner`` (atomically: the one step that moves a
    VM between hosts that share its datastore)."""
    atomic_write(vm_dir / OWNER_NAME, owner + "\n")


class Inventory:
    def __init__(self, config: HostConfig):
        self.config = config
        self._toml = _TomlCache()
        self._host_id: str | None = None

    @property
    def host_id(self) -> str:
        if self._host_id is None:
            self._host_id = host_id(self.config.state_dir)
        return self._host_id

    def owns(self, vm_dir: Path) -> bool:
        """Whether the VM directory is this host's (another host's on a shared datastore)."""
        owner = owner_of(vm_dir)
        return owner is None or owner == self.host_id

    def paths(self, datastore: DatastoreConfig, name: str) -> VmPaths:
        return VmPaths(datastore.path / name, self.config.run_dir / "vms" / name)

    def _entry(self, datastore: DatastoreConfig, name: str) -> VmEntry:
        paths = self.paths(datastore, name)
        try:
            spec = self._toml.load(paths.config)
        except InvalidConfig as exc:
            return VmEntry(name, datastore.name, paths, None, str(exc))
        if spec.name != name:
            error = f"{CONFIG_NAME}: name {spec.name!r} does not match its directory {name!r}"
            return VmEntry(name, datastore.name, paths, None, error)
        return VmEntry(name, datastore.name, paths, spec, None)

    def entries(self) -> list[VmEntry]:
        found = [self._entry(ds, name) for ds, name in self._registered()]
        self._toml.keep_only({str(e.paths.config) for e in found})
        return found

    def registered(self) -> list[tuple[str, VmPaths]]:
        """Name and paths of every registered VM, without reading their ``vm.toml``."""
        return [(name, self.paths(ds, name)) for ds, name in self._registered()]

    def _registered(self) -> list[tuple[DatastoreConfig, str]]:
        found: list[tuple[DatastoreConfig, str]] = []
        for ds in self.config.all_datastores():
            try:
                names = sorted(p.name for p in ds.path.iterdir() if not p.name.startswith("."))
            except OSError:  # missing, or a share that does not answer: its VMs are not seen
                continue
            found += [(ds, n) for n in names if self._is_vm(ds.path / n)]
        return found

    def _is_vm(self, vm_dir: Path) -> bool:
        return (vm_dir / CONFIG_NAME).is_file() and self.owns(vm_dir)

    def sweep(self) -> list[Path]:
        """Remove half-created and half-deleted VM directories; call it holding the
        inventory lock, so that no create is under way."""
        removed = []
        for ds in self.config.all_datastores():
            if not ds.path.is_dir():
                continue
            for leftover in ds.path.iterdir():
                hidden = leftover.name.startswith(".")
                if hidden and (CREATING in leftover.name or DELETING in leftover.name):
                    shutil.rmtree(leftover, ignore_errors=True)
                    removed.append(leftover)
        return removed

    def find(self, name: str) -> VmEntry | None:
        for ds in self.config.all_datastores():
            if self._is_vm(ds.path / name):
                return self._entry(ds, name)
        return None

    def get(self, name: str) -> VmEntry:
        entry = self.find(name)
        if entry is None:
            raise NotFound(f"vm {name!r} does not exist")
        return entry

    def get_valid(self, name: str) -> tuple[VmEntry, VmSpec]:
        entry = self.get(name)
        if entry.spec is None:
            raise InvalidConfig(f"vm {name!r} is invalid: {entry.error}")
        return entry, entry.spec

    def datastore_of(self, path: Path) -> DatastoreConfig | None:
        """The datastore a path lies in, after resolving symlinks and '..'."""
        real = path.resolve()
        for ds in self.config.all_datastores():
            if real.is_relative_to(ds.path.resolve()):
                return ds
        return None

    @asynccontextmanager
    async def lock(self, name: str, timeout: float = 300.0) -> AsyncIterator[None]:
        """One operation at a time per VM, across thinvisor processes too."""
        locks = self.config.run_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Busy(f"vm {name!r} is busy with another operation") from None
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)
