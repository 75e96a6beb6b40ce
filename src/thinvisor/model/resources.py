"""A VM's share of the host, in ESXi's terms: shares, reservations and limits.

- **Shares** are a relative weight, used only when VMs compete: ``low``, ``normal`` and
  ``high`` (ESXi's 500, 1000 and 2000 per vCPU for CPU; 5, 10 and 20 per MiB for memory)
  or a number.
- A **reservation** is guaranteed: a VM starts only when the host can still give every
  running VM its reservation and this one too (admission control).
- A **limit** is a ceiling the VM never exceeds, even on an idle host.

CPU is counted in MHz of the host's cores, as in vSphere (one core is the host's
nominal clock). Pure data: the host-dependent checks (does it fit) are the service's.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, ValidatorFunctionWrapHandler, WrapValidator, model_validator

from thinvisor.model.base import StrictModel

SHARES_MIN = 1
SHARES_MAX = 1_000_000
ShareLevel = Literal["low", "normal", "high"]


def _check_shares(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    # One message for the whole union, rather than one per member.
    if value in ("low", "normal", "high"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and SHARES_MIN <= value <= SHARES_MAX:
        return value
    raise ValueError(f"must be low, normal, high or a number from {SHARES_MIN} to {SHARES_MAX}")


Shares = Annotated[
    ShareLevel | Annotated[int, Field(ge=SHARES_MIN, le=SHARES_MAX)], WrapValidator(_check_shares)
]
#: ESXi's shares per vCPU and per MiB of guest memory for each level.
CPU_SHARES_PER_VCPU: dict[ShareLevel, int] = {"low": 500, "normal": 1000, "high": 2000}
MEMORY_SHARES_PER_MIB: dict[ShareLevel, int] = {"low": 5, "normal": 10, "high": 20}
_MHZ_MAX = 10_000_000
_IOPS_MAX = 10_000_000
_BPS_MAX = 1 << 40


def cpu_shares(shares: Shares, vcpus: int) -> int:
    """The number of CPU shares a VM has."""
    return shares if isinstance(shares, int) else CPU_SHARES_PER_VCPU[shares] * vcpus


def memory_shares(shares: Shares, memory_mib: int) -> int:
    """The number of memory shares a VM has."""
    return shares if isinstance(shares, int) else MEMORY_SHARES_PER_MIB[shares] * memory_mib


class ResourceSpec(StrictModel):
    """CPU and memory controls of a VM, and what of its memory the host may reclaim."""

    cpu_shares: Shares = "normal"
    cpu_reservation_mhz: int = Field(default=0, ge=0, le=_MHZ_MAX)
    cpu_limit_mhz: int | None = Field(default=None, ge=1, le=_MHZ_MAX)
    memory_shares: Shares = "normal"
    memory_reservation_mib: int = Field(default=0, ge=0)
    memory_limit_mib: int | None = Field(default=None, ge=1)
    # Identical pages of this VM may be merged with others' (KSM, QEMU's mem-merge).
    page_sharing: bool = True
    # A virtio balloon, through which the host takes back memory under pressure.
    balloon: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        limit, reserved = self.cpu_limit_mhz, self.cpu_reservation_mhz
        if limit is not None and limit < reserved:
            raise ValueError("cpu_limit_mhz must not be below cpu_reservation_mhz")
        mem_limit, mem_reserved = self.memory_limit_mib, self.memory_reservation_mib
        if mem_limit is not None and mem_limit < mem_reserved:
            raise ValueError("memory_limit_mib must not be below memory_reservation_mib")
        return self


class ResourceUpdate(StrictModel):
    """The controls to change, on a running VM too; only the fields given are applied.

    A limit of 0 removes the limit.
    """

    cpu_shares: Shares | None = None
    cpu_reservation_mhz: int | None = Field(default=None, ge=0, le=_MHZ_MAX)
    cpu_limit_mhz: int | None = Field(default=None, ge=0, le=_MHZ_MAX)
    memory_shares: Shares | None = None
    memory_reservation_mib: int | None = Field(default=None, ge=0)
    memory_limit_mib: int | None = Field(default=None, ge=0)

    def apply(self, current: ResourceSpec) -> ResourceSpec:
        """``current`` with the given fields replaced, validated as a whole."""
        changes = self.model_dump(include=self.model_fields_set)
        for unlimited in ("cpu_limit_mhz", "memory_limit_mib"):
            if changes.get(unlimited) == 0:
                changes[unlimited] = None
        return ResourceSpec.model_validate({**current.model_dump(), **changes})


class DiskLimits(StrictModel):
    """I/O limits of one disk (QEMU's throttling); None is unlimited."""

    iops_total: int | None = Field(default=None, ge=1, le=_IOPS_MAX)
    iops_read: int | None = Field(default=None, ge=1, le=_IOPS_MAX)
    iops_write: int | None = Field(default=None, ge=1, le=_IOPS_MAX)
    bps_total: int | None = Field(default=None, ge=1, le=_BPS_MAX, description="bytes/s")
    bps_read: int | None = Field(default=None, ge=1, le=_BPS_MAX)
    bps_write: int | None = Field(default=None, ge=1, le=_BPS_MAX)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        # QEMU refuses a total together with a read or write limit of the same kind.
        for kind in ("iops", "bps"):
            total = getattr(self, f"{kind}_total")
            split = getattr(self, f"{kind}_read") or getattr(self, f"{kind}_write")
            if total is not None and split is not None:
                raise ValueError(f"{kind}_total excludes {kind}_read and {kind}_write")
        return self

    def is_unlimited(self) -> bool:
        return all(v is None for v in self.model_dump().values())
