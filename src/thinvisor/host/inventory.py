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
import time
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import Busy, InvalidArgument, InvalidConfig, NotFound
from thinvisor.fs import atomic_write
from thinvisor.host.engine.paths import CONFIG_NAME, VmPaths
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
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidConfig(f"{path.name}: {exc}") from exc
    try:
        return parse_spec(data)
    except InvalidArgument as exc:
        raise InvalidConfig(f"{path.name}: {exc}") from exc


def save_spec(paths: VmPaths, spec: VmSpec) -> None:
    atomic_write(paths.config, dump_spec(spec))


class Inventory:
    def __init__(self, config: HostConfig):
        self.config = config

    def paths(self, datastore: DatastoreConfig, name: str) -> VmPaths:
        return VmPaths(datastore.path / name, self.config.run_dir / "vms" / name)

    def _entry(self, datastore: DatastoreConfig, name: str) -> VmEntry:
        paths = self.paths(datastore, name)
        try:
            spec = load_spec(paths.config)
        except InvalidConfig as exc:
            return VmEntry(name, datastore.name, paths, None, str(exc))
        if spec.name != name:
            error = f"{CONFIG_NAME}: name {spec.name!r} does not match its directory {name!r}"
            return VmEntry(name, datastore.name, paths, None, error)
        return VmEntry(name, datastore.name, paths, spec, None)

    def entries(self) -> list[VmEntry]:
        found: list[VmEntry] = []
        for ds in self.config.all_datastores():
            try:
                names = sorted(p.name for p in ds.path.iterdir() if not p.name.startswith("."))
            except OSError:  # missing, or a share that does not answer: its VMs are not seen
                continue
            found += [self._entry(ds, n) for n in names if (ds.path / n / CONFIG_NAME).is_file()]
        return found

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
            if (ds.path / name / CONFIG_NAME).is_file():
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
