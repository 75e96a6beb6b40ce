"""A request to create a VM: a spec with what only creation needs (new disks, the
appliance, NICs without a MAC yet, a datastore). The CLI and the REST API send the same."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from thinvisor.model.base import StrictModel
from thinvisor.model.vm import (
    MEMORY_MIN_MIB,
    USER_NETWORK,
    VCPUS_MAX,
    BootSpec,
    CdromSpec,
    DiskBus,
    DiskFormat,
    GraphicsSpec,
    MachineType,
    NetworkName,
    NicModel,
    NicShaping,
    ParallelSpec,
    SerialSpec,
    VmName,
)


class NewDiskSpec(StrictModel):
    """A disk made for the VM: empty and thin, or a copy of an image in a datastore."""

    size: int | None = Field(default=None, gt=0, description="bytes")
    source: Path | None = Field(default=None, description="an image in a datastore to copy")
    bus: DiskBus = "virtio"
    format: DiskFormat = "qcow2"

    @model_validator(mode="after")
    def _size_or_source(self) -> Self:
        if self.size is None and self.source is None:
            raise ValueError("give a size or a source image")
        return self


class NewNicSpec(StrictModel):
    model: NicModel = "virtio"
    network: NetworkName = USER_NETWORK
    mac: str | None = None  # chosen from thinvisor's prefix when not given
    connected: bool = True
    shaping: NicShaping | None = None


class NicUpdate(StrictModel):
    """What may change on a NIC, running or not; only the fields given are applied."""

    network: NetworkName | None = None
    connected: bool | None = None
    shaping: NicShaping | None = None


class VmCreate(StrictModel):
    name: VmName
    vcpus: int = Field(default=1, ge=1, le=VCPUS_MAX)
    memory_mib: int = Field(default=256, ge=MEMORY_MIN_MIB)
    machine: MachineType = "q35"
    appliance: bool = Field(default=False, description="boot the quick-start appliance")
    boot: BootSpec | None = None
    disks: list[NewDiskSpec] = Field(default_factory=list)
    cdrom: CdromSpec | None = None
    nics: list[NewNicSpec] = Field(default_factory=list)
    serials: list[SerialSpec] = Field(default_factory=lambda: [SerialSpec(name="serial0")])
    parallel: ParallelSpec | None = None
    graphics: GraphicsSpec = Field(default_factory=GraphicsSpec)
    autostart: bool = False
    autostart_order: int = Field(default=0, ge=0, le=10_000)
    datastore: str | None = None

    @model_validator(mode="after")
    def _one_boot(self) -> Self:
        if self.appliance and self.boot is not None:
            raise ValueError("give either appliance or boot, not both")
        return self
