"""The datastores added at runtime: ``<state_dir>/datastores.toml``.

host.toml's datastores are fixed; these are added and removed while the host runs (as
ESXi's "New Datastore" and "Unmount"). Every change is checked against every datastore of
the host, host.toml's included, and written atomically under a lock file, so that the
agent and a local ``thinvisor datastore`` command never lose one another's change. The
registry records directories; it never creates or deletes a file in one. Whether a VM
still uses a datastore is the caller's check (``thinvisor.host.datastores``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import tomli_w

from thinvisor.config import DatastoreConfig, HostConfig, load_added_datastores
from thinvisor.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from thinvisor.fs import atomic_write
from thinvisor.model.vm import validate

LOCK_NAME = "datastores.lock"
LOCK_TIMEOUT_S = 30.0
PROBE_PREFIX = ".thinvisor-probe-"


def new_datastore(name: str, path: str | Path) -> DatastoreConfig:
    """A datastore as given: a VM-style name and an absolute path without '..'."""
    ds = validate(DatastoreConfig, {"name": name, "path": str(path)})
    if ".." in ds.path.parts:
        raise InvalidArgument("path", "must not contain '..'")
    return ds


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return path


def check_directory(path: Path) -> None:
    """Refuse a path that is not an existing directory the agent can write to; the
    check writes (and removes) a hidden file, as root squashing on NFS defeats access()."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidArgument("path", f"{path} does not exist") from None
    except (OSError, ValueError) as exc:  # too long, a NUL byte, a symlink loop...
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise InvalidArgument("path", f"{path} cannot be used: {reason}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument("path", f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidArgument("path", f"{path} is not writable by the agent")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
    except OSError as exc:
        raise InvalidArgument("path", f"{path} is not writable: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def check_no_overlap(config: HostConfig, new: DatastoreConfig) -> None:
    """Refuse a directory that is, lies in, or contains another datastore's, or the
    host's state or run directory."""
    real = _real(new.path)
    for ds in config.all_datastores():
        other = _real(ds.path)
        if real == other:
            raise InvalidArgument("path", f"{new.path} is the directory of datastore {ds.name!r}")
        if real.is_relative_to(other):
            raise InvalidArgument("path", f"{new.path} lies inside datastore {ds.name!r}")
        if other.is_relative_to(real):
            raise InvalidArgument("path", f"{new.path} contains datastore {ds.name!r}")
    for what, directory in (("state", config.state_dir), ("run", config.run_dir)):
        other = _real(directory)
        if real.is_relative_to(other) or other.is_relative_to(real):
            raise InvalidArgument("path", f"{new.path} overlaps the host's {what} directory")


class DatastoreRegistry:
    """Add and remove the datastores kept in ``<state_dir>/datastores.toml``."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.path = config.added_datastores_file
        self.lock_path = config.state_dir / LOCK_NAME

    def added(self) -> list[DatastoreConfig]:
        return self.config.added_datastores()

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the registry's lock file (blocking; across processes too)."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Busy("the datastores are being changed by another process") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def _save(self, datastores: list[DatastoreConfig]) -> None:
        data = {"datastores": [d.model_dump(mode="json") for d in datastores]}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, tomli_w.dumps(data))

    def check_new(self, new: DatastoreConfig) -> None:
        """Refuse ``new`` if it may not be added now; nothing is changed."""
        if any(ds.name == new.name for ds in self.config.all_datastores()):
            raise AlreadyExists(f"datastore {new.name!r} already exists")
        check_directory(new.path)
        check_no_overlap(self.config, new)

    def add(self, name: str, path: str | Path) -> DatastoreConfig:
        """Record a new datastore after checking it (blocking)."""
        new = new_datastore(name, path)
        with self.locked():
            self.check_new(new)
            stored = load_added_datastores(self.path)
            self._save([*stored, new])
        return new

    def check_removable(self, name: str) -> DatastoreConfig:
        """The added datastore ``name``; refused for host.toml's and for the last one."""
        if any(ds.name == name for ds in self.config.datastores):
            raise InvalidArgument(
                "name", f"datastore {name!r} is defined in host.toml; remove it there"
            )
        added = self.added()
        found = next((ds for ds in added if ds.name == name), None)
        if found is None:
            raise NotFound(f"datastore {name!r} does not exist")
        if len(self.config.datastores) + len(added) <= 1:
            raise InvalidArgument("name", "the host's last datastore cannot be removed")
        return found

    def remove(self, name: str) -> DatastoreConfig:
        """Forget an added datastore; its files stay where they are (blocking). Whether a
        VM uses it is the caller's check, made holding the inventory lock."""
        with self.locked():
            found = self.check_removable(name)
            stored = load_added_datastores(self.path)
            self._save([ds for ds in stored if ds.name != name])
        return found
