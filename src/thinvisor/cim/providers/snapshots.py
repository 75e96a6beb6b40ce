"""The DMTF Virtual System Snapshot Service profile: a VM's snapshots over CIM.

The snapshot tree of each VM, read from the same service calls as the REST API
(``HostService.list_snapshots``), and the service that takes, applies and destroys
snapshots through ``take_snapshot``, ``revert_snapshot`` and ``delete_snapshot``.

Conventions:

- One ``TV_VirtualSystemSnapshotService``, hosted by the host (``TV_HostedService``),
  with its ``TV_VirtualSystemSnapshotServiceCapabilities`` (``TV_ElementCapabilities``):
  Full (2) and Disk (3) snapshots, every method asynchronous.
- Each snapshot is a ``TV_VirtualSystemSettingData`` of its VM, InstanceID
  ``thinvisor:<vm uuid>:snapshot:<id>``: ElementName its name, Description, CreationTime,
  VirtualSystemType the VM's, Notes ``uuid:<vm uuid>``, ``snapshot:<id>``,
  ``power_state:<the VM's then>`` and ``memory:true|false``.
  ``TV_SnapshotOfVirtualSystem`` joins the VM (Antecedent) to each of its snapshots,
  ``TV_MostCurrentSnapshotInBranch`` to the snapshot its current state descends from,
  and ``TV_ParentChildSettingData`` a snapshot (Antecedent) to each snapshot taken from
  a state descending from it (Dependent).
- Each VM has a ``TV_VirtualSystemSnapshotCapabilities`` (``TV_ElementCapabilities``):
  SnapshotTypesEnabled is Full and Disk, but empty for a template (its disks are never
  snapshotted: linked clones read them) and for a suspended VM.
- CreateSnapshot: SnapshotSettings is optional, an embedded ``CIM_SettingData`` whose
  ElementName names the snapshot (default: the VM's name and the UTC time) and whose
  Description describes it. SnapshotType 2 (Full, the default) saves the memory of a
  running or paused VM, so that applying the snapshot brings the VM back as it ran;
  3 (Disk) saves the disks and configuration only.
- Every method answers 4096 with a ``TV_ConcreteJob`` (a host task, as for
  RequestStateChange); ResultingSnapshot stays NULL: once the job has succeeded, its
  ``TV_AffectedJobElement`` names the new snapshot (ElementEffects 5, Create). Before a
  job starts the parameters and the VM's state are checked: 4 Invalid Parameter (a
  reference that names no VM or no snapshot, a bad setting, a name a sibling snapshot
  has), 5 Invalid State (a template, or a state the action is not allowed in), 6 Invalid
  Type (a SnapshotType other than 2 or 3). A job that fails later reports the error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pywbem import CIMDateTime, CIMInstance, CIMInstanceName, Uint32

from thinvisor.cim.provider import CIMV2, CimContext, InstanceProvider
from thinvisor.cim.providers.base import (
    FunctionProvider,
    host_name,
    host_path,
    make_association,
    make_instance,
    vm_path,
)
from thinvisor.cim.providers.interop import SYSTEM_VIRTUALIZATION, Profile, ProfileSupport
from thinvisor.cim.providers.virtualization import (
    TYPE_PREFIX,
    embedded_instance,
    job_path,
    service_of,
    submit_job,
    valid_vms,
)
from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound, ThinvisorError
from thinvisor.host.context import current_user
from thinvisor.host.service import VmInfo
from thinvisor.host.state import ALLOWED, Action, PowerState, check_allowed, check_template
from thinvisor.host.tasks import Progress, Task, TaskState
from thinvisor.model.vm import VmSpec, validate
from thinvisor.storage.snapshots import Snapshot, SnapshotCreate, SnapshotTree

log = logging.getLogger(__name__)

# Clients look profiles up by registered name and version; the key is thinvisor's own.
VIRTUAL_SYSTEM_SNAPSHOT_SERVICE = Profile(
    "VirtualSystemSnapshotService", "Virtual System Snapshot Service", "1.0.0"
)

SERVICE_CLASS = "TV_VirtualSystemSnapshotService"
SERVICE_NAME = "thinvisor snapshot service"
SERVICE_CAPABILITIES_CLASS = "TV_VirtualSystemSnapshotServiceCapabilities"
SERVICE_CAPABILITIES_ID = "thinvisor:snapshots:capabilities"
VM_CAPABILITIES_CLASS = "TV_VirtualSystemSnapshotCapabilities"
VSSD_CLASS = "TV_VirtualSystemSettingData"
VSSD_CLASSES = frozenset({"tv_virtualsystemsettingdata", "cim_virtualsystemsettingdata"})

# SnapshotType: Full (with the memory of a running VM) and Disk (without).
FULL_SNAPSHOT, DISK_SNAPSHOT = 2, 3
SNAPSHOT_TYPES = (FULL_SNAPSHOT, DISK_SNAPSHOT)
# CIM_VirtualSystemSnapshotServiceCapabilities method identifiers
CREATE_SUPPORTED, DESTROY_SUPPORTED, APPLY_SUPPORTED = 2, 3, 4
CREATE_EFFECT = 5  # CIM_AffectedJobElement.ElementEffects: Create
# The task kinds, as the REST API names them
TAKE_KIND, REVERT_KIND, DELETE_KIND = "vm.snapshot", "vm.revert_snapshot", "vm.delete_snapshot"

# Return codes
NOT_SUPPORTED = 1
INVALID_PARAMETER = 4
INVALID_STATE = 5
INVALID_TYPE = 6
JOB_STARTED = 4096

Result = tuple[Any, dict[str, Any]]
# The power states a VM (not a template) may be snapshotted in.
_SNAPSHOT_STATES = frozenset(s.value for s in ALLOWED[Action.SNAPSHOT])


# Paths


def snapshot_iid(uuid: str, snap_id: int) -> str:
    """The InstanceID of a snapshot's VSSD."""
    return f"thinvisor:{uuid}:snapshot:{snap_id}"


def snapshot_path(uuid: str, snap_id: int, namespace: str = CIMV2) -> CIMInstanceName:
    """The path of a snapshot's ``TV_VirtualSystemSettingData``."""
    keys = {"InstanceID": snapshot_iid(uuid, snap_id)}
    return CIMInstanceName(VSSD_CLASS, keys, namespace=namespace)


def parse_snapshot_iid(iid: Any) -> tuple[str, int] | None:
    """The VM's UUID and the snapshot's id in a snapshot's InstanceID; None for any other."""
    parts = str(iid or "").split(":")
    if len(parts) != 4 or parts[0] != "thinvisor" or parts[2] != "snapshot":
        return None
    if not parts[3].isdigit() or not parts[1]:
        return None
    return parts[1], int(parts[3])


def service_path(namespace: str = CIMV2) -> CIMInstanceName:
    keys = {
        "SystemCreationClassName": "TV_ComputerSystem",
        "SystemName": host_name(),
        "CreationClassName": SERVICE_CLASS,
        "Name": SERVICE_NAME,
    }
    return CIMInstanceName(SERVICE_CLASS, keys, namespace=namespace)


def service_capabilities_path(namespace: str = CIMV2) -> CIMInstanceName:
    keys = {"InstanceID": SERVICE_CAPABILITIES_ID}
    return CIMInstanceName(SERVICE_CAPABILITIES_CLASS, keys, namespace=namespace)


def vm_capabilities_path(uuid: str, namespace: str = CIMV2) -> CIMInstanceName:
    keys = {"InstanceID": f"thinvisor:{uuid}:snapshot-capabilities"}
    return CIMInstanceName(VM_CAPABILITIES_CLASS, keys, namespace=namespace)


# What the host has


@dataclass(frozen=True)
class VmSnapshots:
    """A VM (with a valid spec) and its snapshot tree."""

    info: VmInfo
    spec: VmSpec
    tree: SnapshotTree


async def read_snapshots(ctx: CimContext) -> list[VmSnapshots]:
    """Every VM's snapshot tree; a VM whose tree cannot be read is left out (and logged)."""
    service = service_of(ctx)
    found = []
    for info, spec in await valid_vms(ctx):
        try:
            tree = await service.list_snapshots(info.name)
        except ThinvisorError as exc:
            log.warning("vm %s: snapshots not listed over CIM: %s", info.name, exc)
            continue
        found.append(VmSnapshots(info, spec, tree))
    return found


# Instances


def snapshot_settings(ctx: CimContext, spec: VmSpec, snap: Snapshot) -> CIMInstance:
    """A snapshot as a VSSD of its VM."""
    notes = [
        f"uuid:{spec.uuid}",
        f"snapshot:{snap.id}",
        f"power_state:{snap.power_state}",
        f"memory:{str(snap.memory).lower()}",
    ]
    return make_instance(
        ctx.repository,
        VSSD_CLASS,
        {
            "InstanceID": snapshot_iid(spec.uuid, snap.id),
            "ElementName": snap.name,
            "Description": snap.description or None,
            "Caption": "Virtual system snapshot",
            "VirtualSystemIdentifier": spec.name,
            "VirtualSystemType": TYPE_PREFIX + spec.machine,
            "CreationTime": _datetime(snap.created),
            "Notes": notes,
        },
        ctx.namespace,
    )


def _datetime(stamp: str) -> CIMDateTime | None:
    try:
        return CIMDateTime(datetime.fromisoformat(stamp))
    except ValueError:
        return None


def snapshot_types_enabled(info: VmInfo, spec: VmSpec) -> list[int]:
    """The snapshot types the VM may be given now: none for a template or a VM whose
    state does not allow a snapshot (suspended)."""
    if spec.template or info.state not in _SNAPSHOT_STATES:
        return []
    return list(SNAPSHOT_TYPES)


def vm_capabilities(ctx: CimContext, info: VmInfo, spec: VmSpec) -> CIMInstance:
    path = vm_capabilities_path(spec.uuid, ctx.namespace)
    return make_instance(
        ctx.repository,
        VM_CAPABILITIES_CLASS,
        {
            **path.keybindings,
            "ElementName": f"snapshot capabilities of {spec.name}",
            "SnapshotTypesEnabled": snapshot_types_enabled(info, spec),
            "GuestOSNotificationEnabled": False,
        },
        ctx.namespace,
    )


def _assoc(ctx: CimContext, classname: str, **refs: CIMInstanceName) -> CIMInstance:
    return make_association(ctx.repository, classname, ctx.namespace, **refs)


async def _service_capabilities(ctx: CimContext) -> list[CIMInstance]:
    props = {
        "InstanceID": SERVICE_CAPABILITIES_ID,
        "ElementName": "thinvisor snapshot service capabilities",
        "SnapshotTypesSupported": list(SNAPSHOT_TYPES),
        "SynchronousMethodsSupported": [],
        # The schema spells this property so.
        "AynchronousMethodsSupported": [CREATE_SUPPORTED, DESTROY_SUPPORTED, APPLY_SUPPORTED],
    }
    return [make_instance(ctx.repository, SERVICE_CAPABILITIES_CLASS, props, ctx.namespace)]


async def _vm_capabilities(ctx: CimContext) -> list[CIMInstance]:
    return [vm_capabilities(ctx, info, spec) for info, spec in await valid_vms(ctx)]


async def _snapshot_settings(ctx: CimContext) -> list[CIMInstance]:
    return [
        snapshot_settings(ctx, vm.spec, snap)
        for vm in await read_snapshots(ctx)
        for snap in vm.tree.snapshots
    ]


async def _snapshots_of_systems(ctx: CimContext) -> list[CIMInstance]:
    return [
        _assoc(
            ctx,
            "TV_SnapshotOfVirtualSystem",
            Antecedent=vm_path(vm.spec.uuid, ctx.namespace),
            Dependent=snapshot_path(vm.spec.uuid, snap.id, ctx.namespace),
        )
        for vm in await read_snapshots(ctx)
        for snap in vm.tree.snapshots
    ]


async def _most_current(ctx: CimContext) -> list[CIMInstance]:
    return [
        _assoc(
            ctx,
            "TV_MostCurrentSnapshotInBranch",
            Antecedent=vm_path(vm.spec.uuid, ctx.namespace),
            Dependent=snapshot_path(vm.spec.uuid, vm.tree.current, ctx.namespace),
        )
        for vm in await read_snapshots(ctx)
        if vm.tree.current is not None
    ]


async def _parents_and_children(ctx: CimContext) -> list[CIMInstance]:
    return [
        _assoc(
            ctx,
            "TV_ParentChildSettingData",
            Antecedent=snapshot_path(vm.spec.uuid, snap.parent, ctx.namespace),
            Dependent=snapshot_path(vm.spec.uuid, snap.id, ctx.namespace),
        )
        for vm in await read_snapshots(ctx)
        for snap in vm.tree.snapshots
        if snap.parent is not None
    ]


async def _hosted_service(ctx: CimContext) -> list[CIMInstance]:
    refs = {"Antecedent": host_path(ctx.namespace), "Dependent": service_path(ctx.namespace)}
    return [_assoc(ctx, "TV_HostedService", **refs)]


async def _element_capabilities(ctx: CimContext) -> list[CIMInstance]:
    found = [
        _assoc(
            ctx,
            "TV_ElementCapabilities",
            ManagedElement=service_path(ctx.namespace),
            Capabilities=service_capabilities_path(ctx.namespace),
        )
    ]
    for _, spec in await valid_vms(ctx):
        found.append(
            _assoc(
                ctx,
                "TV_ElementCapabilities",
                ManagedElement=vm_path(spec.uuid, ctx.namespace),
                Capabilities=vm_capabilities_path(spec.uuid, ctx.namespace),
            )
        )
    return found


async def _created_by_jobs(ctx: CimContext) -> list[CIMInstance]:
    """Each job that took a snapshot and the snapshot it took, while it exists."""
    vms = {vm.info.name: vm for vm in await read_snapshots(ctx)}
    found = []
    for task in _tasks(ctx):
        vm = vms.get(_vm_of_task(task) or "")
        snap_id = created_snapshot(task)
        if vm is None or snap_id is None or snap_id not in {s.id for s in vm.tree.snapshots}:
            continue
        found.append(
            make_instance(
                ctx.repository,
                "TV_AffectedJobElement",
                {
                    "AffectedElement": snapshot_path(vm.spec.uuid, snap_id, ctx.namespace),
                    "AffectingElement": job_path(task.id, ctx.namespace),
                    "ElementEffects": [CREATE_EFFECT],
                },
                ctx.namespace,
            )
        )
    return found


def created_snapshot(task: Task) -> int | None:
    """The id of the snapshot a finished snapshot task took (over CIM or REST)."""
    if task.kind != TAKE_KIND or task.state is not TaskState.SUCCESS:
        return None
    result = task.result
    snap_id = result.get("id") if isinstance(result, dict) else None
    return snap_id if isinstance(snap_id, int) else None


def _vm_of_task(task: Task) -> str | None:
    kind, _, name = (task.object or "").partition("/")
    return name if kind == "vm" else None


def _tasks(ctx: CimContext) -> list[Task]:
    return [] if ctx.agent is None else ctx.agent.tasks.list(limit=10_000)


# Parsing what clients send


def snapshot_type(value: Any) -> int:
    """The requested SnapshotType; Full when none is given."""
    return FULL_SNAPSHOT if value is None else int(value)


def snapshot_request(
    settings: CIMInstance | None, kind: int, vm: str, now: datetime
) -> SnapshotCreate:
    """The ``SnapshotCreate`` that SnapshotSettings and SnapshotType ask for."""
    name = _text(settings, "ElementName") or f"{vm} {now.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
    fields = {
        "name": name,
        "description": _text(settings, "Description") or "",
        "memory": kind == FULL_SNAPSHOT,
    }
    return validate(SnapshotCreate, fields)


def _text(settings: CIMInstance | None, name: str) -> str | None:
    value = None if settings is None else settings.get(name)
    return None if value is None else str(value)


def _settings(value: Any) -> CIMInstance | None:
    """SnapshotSettings: an embedded instance, or nothing (NULL or an empty string)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return embedded_instance(value, "SnapshotSettings")


def vm_name(ctx: CimContext, ref: Any, param: str) -> str:
    """The name of the VM a ``CIM_ComputerSystem`` reference names."""
    if not isinstance(ref, CIMInstanceName) or "Name" not in ref.keybindings:
        raise InvalidArgument(param, "must be a virtual system's path")
    uuid = str(ref.keybindings["Name"])
    if uuid == host_name():
        raise InvalidArgument(param, "is the host, not a virtual system")
    return service_of(ctx).resolve(uuid)


async def snapshot_of(ctx: CimContext, ref: Any, param: str) -> tuple[str, Snapshot]:
    """The VM's name and the snapshot a snapshot VSSD reference names."""
    if not isinstance(ref, CIMInstanceName) or ref.classname.lower() not in VSSD_CLASSES:
        raise InvalidArgument(param, "must be a snapshot's VSSD path")
    parsed = parse_snapshot_iid(ref.keybindings.get("InstanceID"))
    if parsed is None:
        raise InvalidArgument(param, "names no snapshot")
    uuid, snap_id = parsed
    service = service_of(ctx)
    name = service.resolve(uuid)
    tree = await service.list_snapshots(name)
    for snap in tree.snapshots:
        if snap.id == snap_id:
            return name, snap
    raise InvalidArgument(param, f"vm {name!r} has no snapshot {snap_id}")


async def check_action(ctx: CimContext, name: str, action: Action) -> None:
    """Raise ``InvalidState`` when the VM refuses ``action`` now (a template, or its
    power state); the service checks again when the job runs."""
    info = await service_of(ctx).get_vm(name)
    if info.spec is None:
        raise InvalidState(name, info.state, action.value)
    check_template(name, info.spec.template, action)
    check_allowed(name, PowerState(info.state), action)


# Methods


@contextlib.contextmanager
def _acting(ctx: CimContext) -> Iterator[None]:
    """Events written during a method (and its job) name the CIM user."""
    token = current_user.set(ctx.user.name)
    try:
        yield
    finally:
        current_user.reset(token)


@dataclass
class SnapshotService:
    """TV_VirtualSystemSnapshotService: CreateSnapshot, DestroySnapshot, ApplySnapshot."""

    classname: str = SERVICE_CLASS
    namespace: str = CIMV2

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        path = service_path(ctx.namespace)
        props = {
            **path.keybindings,
            "ElementName": SERVICE_NAME,
            "Caption": SERVICE_NAME,
            "Description": "Takes, applies and destroys snapshots of virtual machines",
            "EnabledState": 2,  # Enabled
            "RequestedState": 12,  # Not Applicable
            "EnabledDefault": 2,
            "HealthState": 5,  # OK
            "OperationalStatus": [2],  # OK
            "Started": True,
        }
        return [make_instance(ctx.repository, self.classname, props, ctx.namespace)]

    async def invoke(
        self, ctx: CimContext, target: CIMInstanceName | str, method: str, params: dict[str, Any]
    ) -> Result:
        handler = getattr(self, f"_{method.lower()}", None)
        if handler is None:
            return Uint32(NOT_SUPPORTED), {}
        try:
            with _acting(ctx):
                result: Result = await handler(ctx, params)
                return result
        except (InvalidArgument, NotFound, AlreadyExists) as exc:
            log.info("%s: invalid parameter: %s", method, exc)
            return Uint32(INVALID_PARAMETER), {}
        except InvalidState as exc:
            log.info("%s: %s", method, exc)
            return Uint32(INVALID_STATE), {}

    async def _createsnapshot(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        kind = snapshot_type(params.get("SnapshotType"))
        if kind not in SNAPSHOT_TYPES:
            return Uint32(INVALID_TYPE), {}
        service = service_of(ctx)
        name = vm_name(ctx, params.get("AffectedSystem"), "AffectedSystem")
        settings = _settings(params.get("SnapshotSettings"))
        request = snapshot_request(settings, kind, name, datetime.now(UTC))
        await check_action(ctx, name, Action.SNAPSHOT)
        tree = await service.list_snapshots(name)
        tree.check_name(request.name, tree.current)

        async def work(progress: Progress) -> Snapshot:
            return await service.take_snapshot(name, request, progress)

        return submit_job(ctx, TAKE_KIND, name, work)

    async def _destroysnapshot(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        service = service_of(ctx)
        name, snap = await snapshot_of(ctx, params.get("AffectedSnapshot"), "AffectedSnapshot")
        await check_action(ctx, name, Action.DELETE_SNAPSHOT)

        async def work(progress: Progress) -> Snapshot:
            return await service.delete_snapshot(name, str(snap.id), progress)

        return submit_job(ctx, DELETE_KIND, name, work)

    async def _applysnapshot(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        service = service_of(ctx)
        name, snap = await snapshot_of(ctx, params.get("Snapshot"), "Snapshot")
        await check_action(ctx, name, Action.REVERT_SNAPSHOT)

        async def work(progress: Progress) -> Snapshot:
            return await service.revert_snapshot(name, str(snap.id), progress)

        return submit_job(ctx, REVERT_KIND, name, work)


# Registration


async def _central_services(ctx: CimContext) -> list[CIMInstanceName]:
    return [service_path(CIMV2)]


def profiles() -> list[ProfileSupport]:
    """The snapshot service profile, for Profile Registration; System Virtualization
    scopes it (the service is hosted by the host)."""
    return [
        ProfileSupport(VIRTUAL_SYSTEM_SNAPSHOT_SERVICE, _central_services, SYSTEM_VIRTUALIZATION)
    ]


def providers() -> list[InstanceProvider]:
    """The providers of the classes only this module has instances of."""
    functions: dict[str, Callable[[CimContext], Awaitable[list[CIMInstance]]]] = {
        SERVICE_CAPABILITIES_CLASS: _service_capabilities,
        VM_CAPABILITIES_CLASS: _vm_capabilities,
        "TV_SnapshotOfVirtualSystem": _snapshots_of_systems,
        "TV_MostCurrentSnapshotInBranch": _most_current,
        "TV_ParentChildSettingData": _parents_and_children,
    }
    found: list[InstanceProvider] = [SnapshotService()]
    found.extend(FunctionProvider(name, CIMV2, build) for name, build in functions.items())
    return found


def extensions() -> list[InstanceProvider]:
    """This module's instances of classes that ``virtualization`` provides."""
    return [
        FunctionProvider(VSSD_CLASS, CIMV2, _snapshot_settings),
        FunctionProvider("TV_HostedService", CIMV2, _hosted_service),
        FunctionProvider("TV_ElementCapabilities", CIMV2, _element_capabilities),
        FunctionProvider("TV_AffectedJobElement", CIMV2, _created_by_jobs),
    ]
