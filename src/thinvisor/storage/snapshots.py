"""A VM's snapshot tree: what ``<vm>/snapshots/tree.toml`` holds, and its pure rules.

Snapshots are external, as ESXi's delta disks: taking one freezes each disk's current
file, which from then on only ever is read, and puts a new qcow2 overlay on top of it
for the VM to write to. A snapshot records, per disk, the file it froze; its parent is
the snapshot the VM's state descended from when it was taken, so the frozen files form
a tree through their backing files. Each snapshot keeps the VM's configuration of its
time (``snapshots/<id>/vm.toml``) and, when taken with memory, QEMU's saved state
(``snapshots/<id>/memory.state``).

The VM's ``vm.toml`` is the commit point of every change to the active files; the tree
is written around it so that ``repair`` can tell, after a crash at any point, what was
done and what was not (see ``thinvisor.host.snapshots``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import Field, ValidationError, field_validator

from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidConfig, NotFound
from thinvisor.fs import atomic_write
from thinvisor.model.base import StrictModel
from thinvisor.model.vm import invalid_argument

SNAPSHOTS_DIR = "snapshots"
TREE_NAME = "tree.toml"
SPEC_NAME = "vm.toml"
MEMORY_NAME = "memory.state"
NAME_MAX = 80
DESCRIPTION_MAX = 4096
# Images thinvisor makes for a disk (overlays, moved or rewritten copies) are named as
# ESXi names its delta disks: <disk>-000001.qcow2.
OVERLAY_RE = re.compile(r"^[a-z][a-z0-9]{0,15}-\d{6}\.(qcow2|raw)$")

SnapshotPowerState = Literal["stopped", "running", "paused"]


def _check_text(value: str, limit: int, *, multiline: bool) -> str:
    if len(value) > limit:
        raise ValueError(f"must be at most {limit} characters")
    allowed = "\n\t" if multiline else ""
    if any(ord(c) < 32 and c not in allowed for c in value):
        raise ValueError("must not contain control characters")
    return value


class SnapshotCreate(StrictModel):
    """A request to take a snapshot."""

    name: str = Field(description="unique among the snapshots with the same parent")
    description: str = ""
    memory: bool = Field(
        default=True,
        description="include the memory state of a running VM, so that reverting resumes it",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return _check_text(value, NAME_MAX, multiline=False)

    @field_validator("description")
    @classmethod
    def _description(cls, value: str) -> str:
        return _check_text(value, DESCRIPTION_MAX, multiline=True)


class Snapshot(StrictModel):
    id: int = Field(ge=1)
    name: str
    description: str = ""
    created: str = Field(description="ISO 8601 UTC")
    parent: int | None = None
    memory: bool = False
    power_state: SnapshotPowerState = "stopped"
    # Disk name -> the file the snapshot froze (as the spec names it: relative to the VM
    # directory, or absolute). Read-only disks are not snapshotted.
    disks: dict[str, str] = Field(default_factory=dict)


class SnapshotTree(StrictModel):
    snapshots: list[Snapshot] = Field(default_factory=list)
    # The snapshot the VM's current state descends from ("you are here").
    current: int | None = None
    next_id: int = Field(default=1, ge=1)
    next_file: int = Field(default=1, ge=1)
    # Files no longer needed, deleted once nothing refers to them (crash-safe deletes).
    trash: list[str] = Field(default_factory=list)

    def get(self, snap_id: int) -> Snapshot:
        for snap in self.snapshots:
            if snap.id == snap_id:
                return snap
        raise NotFound(f"snapshot {snap_id} does not exist")

    def find(self, vm: str, ref: str) -> Snapshot:
        """A snapshot by id, or by name when that name is unique in the VM's tree."""
        if ref.isdigit():
            for snap in self.snapshots:
                if snap.id == int(ref):
                    return snap
        named = [s for s in self.snapshots if s.name == ref]
        if len(named) > 1:
            ids = ", ".join(str(s.id) for s in named)
            raise InvalidArgument("snapshot", f"{ref!r} names several snapshots ({ids}); use an id")
        if not named:
            raise NotFound(f"vm {vm!r} has no snapshot {ref!r}")
        return named[0]

    def children(self, snap_id: int | None) -> list[Snapshot]:
        return [s for s in self.snapshots if s.parent == snap_id]

    def check_name(self, name: str, parent: int | None) -> None:
        """Refuse a name a sibling already has (siblings are snapshots of one parent)."""
        if any(s.name == name for s in self.children(parent)):
            raise AlreadyExists(f"a snapshot named {name!r} already exists at this level")

    def frozen_files(self) -> set[str]:
        return {f for s in self.snapshots for f in s.disks.values()}

    def path_to(self, snap_id: int | None) -> list[Snapshot]:
        """The snapshots from the root down to ``snap_id``."""
        chain: list[Snapshot] = []
        while snap_id is not None:
            snap = self.get(snap_id)
            chain.append(snap)
            snap_id = snap.parent
        return chain[::-1]


def snapshots_dir(vm_dir: Path) -> Path:
    return vm_dir / SNAPSHOTS_DIR


def snapshot_dir(vm_dir: Path, snap_id: int) -> Path:
    return snapshots_dir(vm_dir) / str(snap_id)


def load_tree(vm_dir: Path) -> SnapshotTree:
    """The VM's tree; empty when it has never had a snapshot."""
    path = snapshots_dir(vm_dir) / TREE_NAME
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return SnapshotTree()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidConfig(f"{SNAPSHOTS_DIR}/{TREE_NAME}: {exc}") from exc
    try:
        return SnapshotTree.model_validate(data)
    except ValidationError as exc:
        raise InvalidConfig(f"{SNAPSHOTS_DIR}/{TREE_NAME}: {invalid_argument(exc)}") from None


def save_tree(vm_dir: Path, tree: SnapshotTree) -> None:
    directory = snapshots_dir(vm_dir)
    directory.mkdir(exist_ok=True)
    atomic_write(directory / TREE_NAME, tomli_w.dumps(tree.model_dump(exclude_none=True)))


def overlay_name(disk: str, number: int) -> str:
    return f"{disk}-{number:06d}.qcow2"
