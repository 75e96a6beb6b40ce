"""High availability through the center (``thinvisor.center.ha``): a cluster's HA
settings (``/clusters/{id}/ha``), a VM's restart priority (``/vms/{id}/ha``) and what
HA sees now (``/ha``: each cluster's hosts as heard, isolated or failed, and the VMs it
restarted).

Reading needs the read permission on the object, changing needs configure on it. A
cluster or VM the user does not see answers 404, as a missing one does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, User
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.access import Caller, center_of, check, in_thread, visible_ids
from thinvisor.center.ha import HostHaState, HostStatus, Restart
from thinvisor.center.inventory import HA_TIMEOUT_S, ClusterHa, HostRow, VmRow
from thinvisor.center.models import HaPriority, HostState, NodeKind
from thinvisor.errors import NotFound
from thinvisor.model.base import StrictModel

# No prefix: this module serves ``/ha`` and routes under ``/clusters`` and ``/vms``.
router = APIRouter(tags=["ha"], responses=ERROR_RESPONSES)

#: A host's ``state`` where its cluster has HA off.
OFF = "off"


class ClusterHaIn(StrictModel):
    enabled: bool
    timeout_s: float | None = Field(
        default=None,
        description=f"how long a host may stay silent before it counts as failed, "
        f"{HA_TIMEOUT_S[0]:g} to {HA_TIMEOUT_S[1]:g} s; default: the cluster's own (15 s "
        "unless set)",
    )


class ClusterHaOut(BaseModel):
    cluster_id: int
    cluster: str
    """The cluster's path."""
    enabled: bool
    timeout_s: float


class VmHaIn(StrictModel):
    priority: HaPriority = Field(
        description="high, medium and low VMs are restarted in that order; disabled: never"
    )


class VmHaOut(BaseModel):
    vm_id: int
    vm: str
    """The VM's path."""
    priority: str
    cluster_id: int | None
    cluster: str | None
    """The path of its host's cluster; None: its host is in none."""
    protected: bool = Field(description="its cluster has HA on and its priority is not disabled")


class HostHaOut(BaseModel):
    id: int
    name: str
    path: str
    connected: bool
    """Whether the center's sync has it."""
    heard: bool
    """Whether it answers the center's HA heartbeat."""
    state: str = Field(
        description="heard, connected, unheard, isolated, failed or unsupported; off where "
        "its cluster has HA off"
    )
    silent_s: float | None
    """How long it has not been heard (None: it is, or HA is off)."""
    error: str | None


class RestartOut(BaseModel):
    vm_id: int
    vm: str
    source: str
    """The failed host's name."""
    target: str
    """The host it was restarted on."""
    path: str
    """Its path now."""
    priority: str
    time: datetime


class ClusterStatusOut(ClusterHaOut):
    hosts: list[HostHaOut]
    restarted: list[RestartOut]
    """The VMs restarted since the center started, the oldest first."""


def cluster_ha_out(settings: ClusterHa) -> ClusterHaOut:
    return ClusterHaOut(
        cluster_id=settings.cluster_id,
        cluster=settings.path,
        enabled=settings.enabled,
        timeout_s=settings.timeout_s,
    )


# --- a cluster's settings -------------------------------------------------------------


@router.get("/clusters/{cluster_id}/ha", response_model=ClusterHaOut)
async def get_cluster_ha(cluster_id: int, request: Request, user: Caller) -> ClusterHaOut:
    agent = center_of(request)
    return cluster_ha_out(await in_thread(_cluster, agent, user, cluster_id, Permission.READ))


@router.put("/clusters/{cluster_id}/ha", response_model=ClusterHaOut)
async def set_cluster_ha(
    cluster_id: int, body: ClusterHaIn, request: Request, user: Caller
) -> ClusterHaOut:
    """Turn HA on or off for a cluster: with it on, the VMs of a host of it that fails
    are restarted on its other hosts."""
    agent = center_of(request)

    def write() -> ClusterHa:
        _cluster(agent, user, cluster_id, Permission.CONFIGURE)
        return agent.inventory.set_cluster_ha(cluster_id, body.enabled, body.timeout_s)

    settings = await in_thread(write)
    said = f" (timeout {settings.timeout_s:g} s)" if settings.enabled else ""
    agent.events.emit(
        "ha.configured",
        f"HA {'on' if settings.enabled else 'off'} for cluster {settings.path}{said}",
        object=f"{NodeKind.CLUSTER}{settings.path}",
        user=user.name,
        data={"enabled": settings.enabled, "timeout_s": settings.timeout_s},
    )
    return cluster_ha_out(settings)


def _cluster(agent: CenterAgent, user: User, cluster_id: int, permission: Permission) -> ClusterHa:
    """The cluster's settings, if the user holds ``permission`` on it."""
    settings = agent.inventory.cluster_ha(cluster_id)
    check(agent, user, cluster_id, permission, absent=f"no cluster with id {cluster_id}")
    return settings


# --- a VM's priority --------------------------------------------------------------------


@router.get("/vms/{vm_id}/ha", response_model=VmHaOut)
async def get_vm_ha(vm_id: int, request: Request, user: Caller) -> VmHaOut:
    agent = center_of(request)

    def read() -> VmHaOut:
        return _vm_ha_out(agent, _vm(agent, user, vm_id, Permission.READ))

    return await in_thread(read)


@router.put("/vms/{vm_id}/ha", response_model=VmHaOut)
async def set_vm_ha(vm_id: int, body: VmHaIn, request: Request, user: Caller) -> VmHaOut:
    """Set when a VM is restarted if its host fails."""
    agent = center_of(request)

    def write() -> tuple[VmRow, VmHaOut]:
        _vm(agent, user, vm_id, Permission.CONFIGURE)
        vm = agent.inventory.set_vm_ha_priority(vm_id, body.priority)
        return vm, _vm_ha_out(agent, vm)

    vm, out = await in_thread(write)
    agent.events.emit(
        "ha.vm_configured",
        f"vm {vm.path}: HA priority {out.priority}",
        object=f"host/{vm.host_name}/vm/{vm.name}",
        user=user.name,
        data={"vm_id": vm_id, "priority": out.priority},
    )
    return out


def _vm(agent: CenterAgent, user: User, vm_id: int, permission: Permission) -> VmRow:
    vm = agent.inventory.vm(vm_id)
    check(agent, user, vm_id, permission, absent=f"no vm with id {vm_id}")
    return vm


def _vm_ha_out(agent: CenterAgent, vm: VmRow) -> VmHaOut:
    """The VM's HA settings, with its host's cluster's (blocking)."""
    host = agent.inventory.host(vm.host_id)
    cluster = _cluster_of(agent, host)
    return VmHaOut(
        vm_id=vm.id,
        vm=vm.path,
        priority=vm.ha_priority.value,
        cluster_id=None if cluster is None else cluster.cluster_id,
        cluster=None if cluster is None else cluster.path,
        protected=cluster is not None and cluster.enabled and vm.ha_priority != HaPriority.DISABLED,
    )


def _cluster_of(agent: CenterAgent, host: HostRow) -> ClusterHa | None:
    if host.parent_id is None:
        return None
    try:
        return agent.inventory.cluster_ha(host.parent_id)
    except NotFound:  # a host right in a datacenter or a folder
        return None


# --- what HA sees -------------------------------------------------------------------------


@router.get("/ha", response_model=list[ClusterStatusOut])
async def ha_status(
    request: Request,
    user: Caller,
    cluster: Annotated[int | None, Query(description="only this cluster: its id")] = None,
) -> list[ClusterStatusOut]:
    """Every cluster the user may read, with its HA settings, how HA sees each of its
    hosts now, and the VMs it restarted; by path."""
    agent = center_of(request)

    def read() -> list[ClusterStatusOut]:
        if cluster is not None:
            clusters = [_cluster(agent, user, cluster, Permission.READ)]
        else:
            clusters = agent.inventory.ha_clusters()
        visible = visible_ids(agent, user)
        hosts = agent.inventory.hosts()
        return [
            _status(agent, c, [h for h in hosts if h.parent_id == c.cluster_id], visible)
            for c in clusters
            if visible is None or c.cluster_id in visible
        ]

    return await in_thread(read)


def _status(
    agent: CenterAgent, cluster: ClusterHa, hosts: list[HostRow], visible: set[int] | None
) -> ClusterStatusOut:
    shown = [h for h in hosts if visible is None or h.id in visible]
    restarts = [
        r for r in agent.ha.restarts(cluster.cluster_id) if visible is None or r.vm_id in visible
    ]
    return ClusterStatusOut(
        **cluster_ha_out(cluster).model_dump(),
        hosts=[_host_out(agent, cluster, h) for h in shown],
        restarted=[_restart_out(r) for r in restarts],
    )


def _host_out(agent: CenterAgent, cluster: ClusterHa, host: HostRow) -> HostHaOut:
    """How HA sees the host: the monitor's view, where it has come round to it."""
    connected = host.state == HostState.CONNECTED
    status = agent.ha.host_status(host.id) if cluster.enabled else None
    if status is None:
        pending = HostHaState.CONNECTED if connected else HostHaState.UNHEARD
        status = HostStatus(host.id, pending, heard=False, silent_s=None, error=None)
    silent = None if status.silent_s is None else round(status.silent_s, 1)
    return HostHaOut(
        id=host.id,
        name=host.name,
        path=host.path,
        connected=connected,
        heard=status.heard,
        state=status.state.value if cluster.enabled else OFF,
        silent_s=silent,
        error=status.error,
    )


def _restart_out(restart: Restart) -> RestartOut:
    return RestartOut(
        vm_id=restart.vm_id,
        vm=restart.vm,
        source=restart.source,
        target=restart.target,
        path=restart.path,
        priority=restart.priority.value,
        time=restart.time,
    )
