"""``/health`` and ``/host``: is the agent up, what is this host, and its maintenance mode."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from functools import cache
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from thinvisor import __version__
from thinvisor.api.auth import agent_of, require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.tasks import ACCEPTED, accepted
from thinvisor.auth import Permission, User
from thinvisor.host import hostinfo
from thinvisor.host.stats import HostSample
from thinvisor.host.tasks import Progress
from thinvisor.model.base import StrictModel

router = APIRouter(tags=["host"], responses=ERROR_RESPONSES)


class Health(BaseModel):
    status: str
    version: str


class Accelerator(BaseModel):
    name: str
    reason: str


class DatastoreSummary(BaseModel):
    name: str
    path: str
    capacity_bytes: int
    free_bytes: int


class HostReservation(BaseModel):
    """What the host keeps for itself (``[reservations]`` of host.toml)."""

    cpu_mhz: int
    memory_mib: int


class HostInfo(BaseModel):
    hostname: str
    cpu_model: str
    cpus: int
    core_mhz: int = Field(description="one core's clock: the unit of CPU reservations")
    cpu_load: float | None = Field(
        description="how busy all the host's CPUs were at the last statistics sample, "
        "0 (idle) to 1 (all busy); null before the first sample"
    )
    host_reservation: HostReservation = Field(
        description="what the host keeps for itself; VMs' reservations share the rest"
    )
    memory_total_mib: int
    memory_available_mib: int
    accelerator: Accelerator
    thinvisor_version: str
    qemu_version: str
    datastores: list[DatastoreSummary]
    tls_fingerprint: str | None
    vms: dict[str, int]
    host_id: str = Field(description="what the owner files of this host's VMs name")
    maintenance: bool


class MaintenanceState(BaseModel):
    maintenance: bool


class MaintenanceChange(StrictModel):
    maintenance: bool = Field(description="true: enter maintenance mode; false: leave it")


class ShutdownResult(BaseModel):
    stopped: list[str]


@cache
def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.splitlines()[0].removeprefix("QEMU emulator version ").strip()


def _datastore(name: str, path: str) -> DatastoreSummary:
    try:
        st = os.statvfs(path)
        capacity, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    except OSError:
        capacity = free = 0
    return DatastoreSummary(name=name, path=path, capacity_bytes=capacity, free_bytes=free)


def _cpu_load(sample: HostSample | None) -> float | None:
    if sample is None or sample.cpu_percent is None:
        return None
    return min(1.0, max(0.0, sample.cpu_percent / 100))


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Whether the agent answers; the one route that needs no authentication."""
    return Health(status="ok", version=__version__)


@router.get("/host", response_model=HostInfo)
async def host_info(
    request: Request, user: Annotated[User, Depends(require(Permission.READ))]
) -> HostInfo:
    """CPU, memory, the accelerator in use and why, datastores, versions."""
    agent = agent_of(request)
    facts, keep = hostinfo.host_facts(), agent.config.reservations
    accel = await asyncio.to_thread(agent.service.accel)
    version = await asyncio.to_thread(qemu_version, agent.config.qemu_binary)
    vms = await agent.service.list_vms()
    states: dict[str, int] = {}
    for vm in vms:
        states[vm.state] = states.get(vm.state, 0) + 1
    return HostInfo(
        hostname=socket.gethostname(),
        cpu_model=facts.cpu_model,
        cpus=facts.cpus,
        core_mhz=facts.core_mhz,
        cpu_load=_cpu_load(agent.stats.latest_host),
        host_reservation=HostReservation(
            cpu_mhz=keep.host_cpu_mhz, memory_mib=keep.host_memory_mib
        ),
        memory_total_mib=facts.memory_total_mib,
        memory_available_mib=facts.memory_available_mib,
        accelerator=Accelerator(name=accel.name, reason=accel.reason),
        thinvisor_version=__version__,
        qemu_version=version,
        datastores=[_datastore(d.name, str(d.path)) for d in agent.config.all_datastores()],
        tls_fingerprint=agent.tls_fingerprint,
        vms=states,
        host_id=agent.service.inventory.host_id,
        maintenance=agent.maintenance.active,
    )


@router.get("/host/maintenance", response_model=MaintenanceState)
async def get_maintenance(
    request: Request, user: Annotated[User, Depends(require(Permission.READ))]
) -> MaintenanceState:
    """Whether the host is in maintenance mode."""
    return MaintenanceState(maintenance=agent_of(request).maintenance.active)


@router.post("/host/maintenance", response_model=MaintenanceState)
async def set_maintenance(
    body: MaintenanceChange,
    request: Request,
    user: Annotated[User, Depends(require(Permission.ADMIN))],
) -> MaintenanceState:
    """Enter or leave maintenance mode. Entering is refused (409) while a VM runs or
    is paused: move or stop them first. In maintenance mode no VM powers on, resumes
    or arrives by migration."""
    return MaintenanceState(maintenance=await agent_of(request).maintenance.set(body.maintenance))


@router.post("/host/shutdown", status_code=202, response_model=None, responses=ACCEPTED)
async def shutdown_vms(
    request: Request, user: Annotated[User, Depends(require(Permission.ADMIN))]
) -> JSONResponse:
    """Shut the autostart VMs down, in reverse autostart order (a task)."""
    agent = agent_of(request)

    async def work(progress: Progress) -> ShutdownResult:
        return ShutdownResult(stopped=await agent.shutdown_autostart_vms())

    return accepted(request, "host.shutdown", "host", user, work)
