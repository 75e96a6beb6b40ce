"""A VM's definition: what ``vm.toml`` holds.

Pure data, no I/O. Everything a spec can check on its own is checked here (names, ranges,
unique device names); what depends on the host (free memory, CPU count, whether a path
lies inside a datastore) is checked by the service against the host's facts.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from thinvisor.errors import InvalidArgument
from thinvisor.model.base import StrictModel
from thinvisor.model.resources import DiskLimits, ResourceSpec

NAME_MAX = 64
M = TypeVar("M", bound=BaseModel)
MEMORY_MIN_MIB = 32
VCPUS_MAX = 255
PCI_SLOT_MAX = 15  # slots 1..15 for virtio disks and NICs; slot 0 is the SCSI controller's
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEVICE_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

MachineType = Literal["q35", "pc", "microvm"]
DiskFormat = Literal["qcow2", "raw"]
DiskBus = Literal["virtio", "scsi", "ide"]
CdromBus = Literal["ide", "scsi"]
NicModel = Literal["virtio", "e1000", "rtl8139"]
BootDevice = Literal["disk", "cdrom", "network"]
_DEFAULT_ORDER: tuple[BootDevice, ...] = ("disk", "cdrom")


def check_name(value: str, field: str = "name") -> str:
    """Validate a VM name; raise ``ValueError`` with the reason."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > NAME_MAX:
        raise ValueError(f"must be at most {NAME_MAX} characters")
    if "/" in value or ".." in value:
        raise ValueError("must not contain '/' or '..'")
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            "may contain only letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return value


def _device_name(value: str) -> str:
    if not _DEVICE_NAME_RE.fullmatch(value):
        raise ValueError("must be a lower-case letter followed by up to 15 letters or digits")
    return value


DeviceName = Annotated[str, AfterValidator(_device_name)]
VmName = Annotated[str, AfterValidator(check_name)]


class KernelBoot(StrictModel):
    """Direct kernel boot: QEMU loads the kernel and initrd itself."""

    kind: Literal["kernel"] = "kernel"
    kernel: str
    initrd: str | None = None
    cmdline: str = ""


class FirmwareBoot(StrictModel):
    """SeaBIOS boots from the devices in ``order``."""

    kind: Literal["firmware"] = "firmware"
    order: list[BootDevice] = Field(default_factory=lambda: list(_DEFAULT_ORDER))

    @field_validator("order")
    @classmethod
    def _unique(cls, value: list[BootDevice]) -> list[BootDevice]:
        if not value:
            raise ValueError("must name at least one device")
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a device")
        return value


BootSpec = Annotated[KernelBoot | FirmwareBoot, Field(discriminator="kind")]


PciSlot = Annotated[int, Field(ge=1, le=PCI_SLOT_MAX)]


class DiskSpec(StrictModel):
    name: DeviceName
    path: str
    format: DiskFormat = "qcow2"
    bus: DiskBus = "virtio"
    readonly: bool = False
    limits: DiskLimits | None = None
    # Where a virtio disk sits on the PCI bus; given once, kept, so that the guest sees
    # the same hardware on every boot and a saved state restores into it.
    slot: PciSlot | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value


class DiskUpdate(StrictModel):
    """The fields of a disk that may change; only those given are applied."""

    readonly: bool | None = None


class CdromSpec(StrictModel):
    """The VM's one CD-ROM drive; ``path`` is the ISO in it, or None when empty."""

    path: str | None = None
    bus: CdromBus = "ide"


class Bandwidth(StrictModel):
    """A rate limit: the average rate, a peak allowed for ``burst_kib`` (libvirt's words)."""

    average_kbps: int = Field(ge=8, le=100_000_000, description="kilobits per second")
    peak_kbps: int | None = Field(default=None, ge=8, le=100_000_000)
    burst_kib: int | None = Field(default=None, ge=1, le=1_048_576)

    @model_validator(mode="after")
    def _peak(self) -> Self:
        if self.peak_kbps is not None and self.peak_kbps < self.average_kbps:
            raise ValueError("peak_kbps must not be below average_kbps")
        return self


class NicShaping(StrictModel):
    """Traffic shaping of one NIC: ``inbound`` is traffic to the guest, ``outbound`` from it."""

    inbound: Bandwidth | None = None
    outbound: Bandwidth | None = None


NetworkName = Annotated[str, AfterValidator(check_name)]
USER_NETWORK = "user"  # QEMU's user-mode networking (no switch): guest-initiated traffic only


class NicSpec(StrictModel):
    name: DeviceName
    model: NicModel = "virtio"
    mac: str
    # A port group of one of the host's switches, or "user" for QEMU's user networking.
    network: NetworkName = USER_NETWORK
    slot: PciSlot | None = None
    # The virtual cable: a disconnected NIC is present in the guest with its link down.
    connected: bool = True
    shaping: NicShaping | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        value = value.lower()
        if not _MAC_RE.fullmatch(value):
            raise ValueError("must be six hex octets separated by ':'")
        if int(value[:2], 16) & 1:
            raise ValueError("must be a unicast address")
        return value


class SerialSpec(StrictModel):
    """A serial port: a private unix socket for consoles, everything also logged."""

    name: DeviceName


class ParallelSpec(StrictModel):
    """A parallel port whose output is written to a log file in the VM's directory."""

    enabled: bool = True


class GraphicsSpec(StrictModel):
    """The graphical console: VNC on a private unix socket, or none."""

    kind: Literal["vnc", "none"] = "vnc"


class VmSpec(StrictModel):
    """Everything needed to start a VM. Stored as ``<datastore>/<name>/vm.toml``."""

    name: VmName
    uuid: str = Field(default_factory=lambda: str(uuidlib.uuid4()))
    vcpus: int = Field(default=1, ge=1, le=VCPUS_MAX)
    memory_mib: int = Field(default=256, ge=MEMORY_MIN_MIB)
    machine: MachineType = "q35"
    boot: BootSpec = Field(default_factory=FirmwareBoot)
    disks: list[DiskSpec] = Field(default_factory=list)
    cdrom: CdromSpec | None = None
    nics: list[NicSpec] = Field(default_factory=list)
    serials: list[SerialSpec] = Field(default_factory=lambda: [SerialSpec(name="serial0")])
    parallel: ParallelSpec | None = None
    graphics: GraphicsSpec = Field(default_factory=GraphicsSpec)
    autostart: bool = False
    # Autostart VMs start in ascending order (then by name) and stop in reverse.
    autostart_order: int = Field(default=0, ge=0, le=10_000)
    # A template is never powered on; VMs are deployed from it as full or linked clones.
    template: bool = False
    resources: ResourceSpec = Field(default_factory=ResourceSpec)

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        try:
            return str(uuidlib.UUID(value))
        except ValueError:
            raise ValueError("must be a UUID") from None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [d.name for d in self.disks] + [n.name for n in self.nics]
        names += [s.name for s in self.serials]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique, repeated: {', '.join(dupes)}")
        if any(d.slot is not None and d.bus != "virtio" for d in self.disks):
            raise ValueError("only virtio disks have a PCI slot")
        slots = [d.slot for d in self.disks if d.slot] + [n.slot for n in self.nics if n.slot]
        if len(set(slots)) != len(slots):
            raise ValueError("PCI slots of disks and NICs must be unique")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise ValueError("NIC MAC addresses must be unique")
        if len(self.serials) > 4:
            raise ValueError("at most 4 serial ports")
        reserved, limit = self.resources.memory_reservation_mib, self.resources.memory_limit_mib
        if reserved > self.memory_mib:
            raise ValueError("resources.memory_reservation_mib must not exceed memory_mib")
        if limit is not None and limit > self.memory_mib:
            raise ValueError("resources.memory_limit_mib must not exceed memory_mib")
        if self.machine == "microvm":
            if self.boot.kind != "kernel":
                raise ValueError("machine 'microvm' needs kernel boot")
            if self.cdrom is not None or any(d.bus != "virtio" for d in self.disks):
                raise ValueError("machine 'microvm' supports only virtio disks and no CD-ROM")
        return self

    def disk(self, name: str) -> DiskSpec | None:
        return next((d for d in self.disks if d.name == name), None)

    def pci_slots(self) -> dict[str, int | None]:
        """Device name -> PCI slot of every device that takes one (virtio disks, NICs)."""
        slots: dict[str, int | None] = {d.name: d.slot for d in self.disks if d.bus == "virtio"}
        slots.update({n.name: n.slot for n in self.nics})
        return slots

    def free_pci_slot(self) -> int | None:
        """The lowest PCI slot no device has, or None when all are taken."""
        taken = set(self.pci_slots().values())
        return next((n for n in range(1, PCI_SLOT_MAX + 1) if n not in taken), None)

    def with_pci_slots(self) -> VmSpec:
        """This spec with a PCI slot given to every device that lacks one."""
        spec = self.model_copy(deep=True)
        devices: list[DiskSpec | NicSpec] = [d for d in spec.disks if d.bus == "virtio"]
        for dev in [*devices, *spec.nics]:
            if dev.slot is None:
                slot = spec.free_pci_slot()
                if slot is None:
                    field = "nics" if isinstance(dev, NicSpec) else "disks"
                    reason = f"too many PCI devices: at most {PCI_SLOT_MAX} virtio disks and NICs"
                    raise InvalidArgument(field, reason)
                dev.slot = slot
        return spec

    def next_device_name(self, prefix: str) -> str:
        """The first free ``<prefix><n>`` among the VM's device names."""
        taken = {d.name for d in self.disks} | {n.name for n in self.nics}
        taken |= {s.name for s in self.serials}
        n = 0
        while f"{prefix}{n}" in taken:
            n += 1
        return f"{prefix}{n}"


_TAGS = ("kernel", "firmware")


class VmUpdate(StrictModel):
    """The settings of a stopped VM that may change; only the fields given are applied.

    Devices change through their own actions (disks, CD-ROM), the name and UUID never.
    """

    vcpus: int | None = Field(default=None, ge=1, le=VCPUS_MAX)
    memory_mib: int | None = Field(default=None, ge=MEMORY_MIN_MIB)
    machine: MachineType | None = None
    boot: BootSpec | None = None
    parallel: ParallelSpec | None = None
    graphics: GraphicsSpec | None = None
    autostart: bool | None = None
    autostart_order: int | None = Field(default=None, ge=0, le=10_000)

    def apply(self, spec: VmSpec) -> VmSpec:
        """``spec`` with the given fields replaced, validated as a whole."""
        # The fields given, each whole (a nested default such as boot.kind included).
        changes = self.model_dump(include=self.model_fields_set)
        return validate(VmSpec, {**spec.model_dump(), **changes})


def _field_of(error: Any) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    # pydantic puts the tag of a tagged union into the location: boot.kernel.initrd.
    loc = [p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "boot" and p in _TAGS)]
    return ".".join(loc) or "spec"


def _reason_of(error: Any) -> str:
    msg = str(error.get("msg", "invalid"))
    if error.get("type") == "extra_forbidden":
        return "unknown field"
    return msg.removeprefix("Value error, ")


def invalid_argument(exc: ValidationError, prefix: str = "") -> InvalidArgument:
    """The first problem of a pydantic ``ValidationError`` as one ``InvalidArgument``."""
    first = exc.errors()[0]
    field = _field_of(first)
    if prefix and field == "spec":  # the object under the prefix as a whole
        return InvalidArgument(prefix.rstrip("."), _reason_of(first))
    return InvalidArgument(f"{prefix}{field}" if prefix else field, _reason_of(first))


def validate(model: type[M], data: Any) -> M:
    """Build ``model`` from plain data; raise ``InvalidArgument`` on the first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_argument(exc) from None


def parse_spec(data: dict[str, Any]) -> VmSpec:
    """Build a ``VmSpec`` from plain data; raise ``InvalidArgument`` on the first problem."""
    return validate(VmSpec, data)
