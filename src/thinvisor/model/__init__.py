"""Pure data: VM specifications and their parts."""

from thinvisor.model.vm import (
    CdromSpec,
    DiskSpec,
    DiskUpdate,
    FirmwareBoot,
    GraphicsSpec,
    KernelBoot,
    NicSpec,
    ParallelSpec,
    SerialSpec,
    VmSpec,
    parse_spec,
)

__all__ = [
    "CdromSpec",
    "DiskSpec",
    "DiskUpdate",
    "FirmwareBoot",
    "GraphicsSpec",
    "KernelBoot",
    "NicSpec",
    "ParallelSpec",
    "SerialSpec",
    "VmSpec",
    "parse_spec",
]
