"""System Virtualization (DSP1042), Virtual System (DSP1057), Resource Allocation (DSP1041).

Every class here is a translation of ``HostService`` (and the agent's tasks) into CIM:
the methods call the same service functions as the REST API, nothing more.

Conventions:

- A VM is a ``TV_ComputerSystem`` keyed by its UUID (``Name``), its name in
  ``ElementName``. Only VMs whose ``vm.toml`` is valid have instances. EnabledState:
  running 2, stopped 3, suspended 6 (Enabled but Offline), paused 9 (Quiesce).
- Its settings are one ``TV_VirtualSystemSettingData`` (InstanceID ``thinvisor:<uuid>``)
  and one RASD per resource (InstanceID ``thinvisor:<uuid>:<device>``): ``cpu``
  (``TV_ProcessorAllocationSettingData``, ResourceType 3, count), ``memory`` (4,
  ``byte*2^20``), each disk by its name (``TV_StorageAllocationSettingData``, 31 Logical
  Disk as DSP1047 gives the virtual disk, HostResource = the image file,
  ResourceSubType = the bus), ``cdrom0`` (16) and each NIC by its name
  (``TV_EthernetPortAllocationSettingData``, 10, Address = the MAC as twelve hex
  digits as DSP1050 writes it, Connection = [network], ResourceSubType = the model).
- VirtualSystemType is ``DMTF:thinvisor:<machine>`` (q35, pc, microvm). In DefineSystem
  ``DMTF:thinvisor:appliance`` (or ``thinvisor:appliance`` among the VSSD's Notes)
  boots the quick-start appliance on q35. AutomaticStartupAction 4 (Always Startup) is
  autostart, AutomaticStartupActionSequenceNumber its order.
- DefineSystem reads vcpus and memory from RASDs 3 and 4, disks from 17/19/31 (a size
  from VirtualQuantity x AllocationUnits, or an image to copy in HostResource), the
  CD-ROM from 15/16 and NICs from 10 (Address optional).
- Return codes: 0 completed; 4096 a job was started (``Job`` = a ``TV_ConcreteJob``,
  one per thinvisor task, InstanceID ``thinvisor:task:<id>``); VSMS methods answer 1
  not supported and 4 invalid parameter; RequestStateChange answers 1 (the host
  itself), 5 invalid parameter and 4097 when the VM's state refuses the transition.
  Any other failure is a CIM error carrying thinvisor's message.
- RequestStateChange: 2 start (resume when paused or suspended), 3 hard power off,
  4 ACPI shutdown (a job), 6 suspend (a job), 9 pause, 10 and 11 reset. Starting a
  suspended VM restores its memory from disk: a job too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import defusedxml.ElementTree  # type: ignore[import-untyped]
import pywbem
from pywbem import (
    CIM_ERR_FAILED,
    CIMDateTime,
    CIMError,
    CIMInstance,
    CIMInstanceName,
    Uint32,
)

from thinvisor.cim import codec
from thinvisor.cim.provider import CIMV2, CimContext, InstanceProvider
from thinvisor.cim.providers.base import (
    POOL_KINDS,
    FunctionProvider,
    host_name,
    host_path,
    host_system,
    make_association,
    make_instance,
    pool_path,
    vm_path,
)
from thinvisor.errors import InvalidArgument, InvalidState, NotFound
from thinvisor.host import hostinfo
from thinvisor.host.context import current_user
from thinvisor.host.service import HostService, VmInfo
from thinvisor.host.state import Action, PowerState, check_allowed
from thinvisor.host.tasks import Task, TaskState, Work
from thinvisor.model.create import NewDiskSpec, NewNicSpec, VmCreate
from thinvisor.model.vm import CdromSpec, VmSpec, VmUpdate, validate

log = logging.getLogger(__name__)

VSMS_CLASS = "TV_VirtualSystemManagementService"
VSMS_NAME = "thinvisor VSMS"
VSMC_ID = "thinvisor:vsms:capabilities"
TYPE_PREFIX = "DMTF:thinvisor:"
APPLIANCE_TYPE = TYPE_PREFIX + "appliance"
MACHINES = ("q35", "pc", "microvm")

# CIM_ResourceAllocationSettingData.ResourceType
RT_PROCESSOR, RT_MEMORY, RT_NETWORK = 3, 4, 10
RT_CD, RT_DVD, RT_DISK_DRIVE, RT_STORAGE_EXTENT, RT_LOGICAL_DISK = 15, 16, 17, 19, 31
DISK_TYPES = (RT_DISK_DRIVE, RT_STORAGE_EXTENT, RT_LOGICAL_DISK)
POOL_TYPES = {
    "processor": RT_PROCESSOR,
    "memory": RT_MEMORY,
    "disk": RT_LOGICAL_DISK,
    "network": RT_NETWORK,
}

ENABLED_STATES = {"running": 2, "stopped": 3, "suspended": 6, "paused": 9}
# RequestedStates a VM in each state may be asked for (DSP1057 AvailableRequestedStates).
AVAILABLE_STATES = {
    "running": [3, 4, 6, 9, 10, 11],
    "stopped": [2],
    "suspended": [2, 3],
    "paused": [2, 3, 6, 10, 11],
}
JOB_STATES = {TaskState.QUEUED: 3, TaskState.RUNNING: 4, TaskState.SUCCESS: 7, TaskState.ERROR: 10}

# Return codes
COMPLETED = 0
NOT_SUPPORTED = 1
VSMS_INVALID_PARAMETER = 4
RSC_INVALID_PARAMETER = 5
JOB_STARTED = 4096
INVALID_STATE_TRANSITION = 4097

Result = tuple[Any, dict[str, Any]]


# Reading the host


def service_of(ctx: CimContext) -> HostService:
    if ctx.agent is None:
        raise CIMError(CIM_ERR_FAILED, "no agent")
    return ctx.agent.service


async def valid_vms(ctx: CimContext) -> list[tuple[VmInfo, VmSpec]]:
    """The VMs with a valid configuration, with their specs."""
    return [(i, i.spec) for i in await service_of(ctx).list_vms() if i.spec is not None]


def _iid(spec: VmSpec, device: str | None = None) -> str:
    return f"thinvisor:{spec.uuid}" if device is None else f"thinvisor:{spec.uuid}:{device}"


def vssd_path(spec: VmSpec, ns: str = CIMV2) -> CIMInstanceName:
    return CIMInstanceName("TV_VirtualSystemSettingData", {"InstanceID": _iid(spec)}, namespace=ns)


def vsms_path(ns: str = CIMV2) -> CIMInstanceName:
    keys = {
        "SystemCreationClassName": "TV_ComputerSystem",
        "SystemName": host_name(),
        "CreationClassName": VSMS_CLASS,
        "Name": VSMS_NAME,
    }
    return CIMInstanceName(VSMS_CLASS, keys, namespace=ns)


def job_path(task_id: str, ns: str = CIMV2) -> CIMInstanceName:
    return CIMInstanceName(
        "TV_ConcreteJob", {"InstanceID": f"thinvisor:task:{task_id}"}, namespace=ns
    )


def _mac_digits(mac: str) -> str:
    return mac.replace(":", "").upper()


def _mac_colons(address: str) -> str:
    digits = re.sub(r"[:-]", "", address).lower()
    if not re.fullmatch(r"[0-9a-f]{12}", digits):
        raise InvalidArgument("Address", f"{address!r} is not a MAC address")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


# Instances


def vm_system(ctx: CimContext, info: VmInfo, spec: VmSpec) -> CIMInstance:
    return make_instance(
        ctx.repository,
        "TV_ComputerSystem",
        {
            "Name": spec.uuid,
            "NameFormat": "Other",
            "ElementName": spec.name,
            "Caption": "Virtual machine template" if spec.template else "Virtual machine",
            "Description": f"thinvisor virtual machine {spec.name}",
            "Dedicated": [0],  # Not Dedicated
            "EnabledState": ENABLED_STATES.get(info.state, 0),
            "RequestedState": 12,  # Not Applicable
            "EnabledDefault": 3,
            # A template is never powered on: no state can be requested of it.
            "AvailableRequestedStates": []
            if spec.template
            else AVAILABLE_STATES.get(info.state, []),
            "HealthState": 5,
            "OperationalStatus": [2],
            "OtherIdentifyingInfo": [spec.name],
            "IdentifyingDescriptions": ["thinvisor:name"],
        },
        ctx.namespace,
    )


def vssd(ctx: CimContext, spec: VmSpec) -> CIMInstance:
    return make_instance(
        ctx.repository,
        "TV_VirtualSystemSettingData",
        {
            "InstanceID": _iid(spec),
            "ElementName": spec.name,
            "Caption": "Virtual system settings",
            "VirtualSystemIdentifier": spec.name,
            "VirtualSystemType": TYPE_PREFIX + spec.machine,
            "AutomaticStartupAction": 4 if spec.autostart else 2,
            "AutomaticStartupActionSequenceNumber": spec.autostart_order,
            "Notes": [f"uuid:{spec.uuid}"],
        },
        ctx.namespace,
    )


def rasds(ctx: CimContext, info: VmInfo, spec: VmSpec) -> list[CIMInstance]:
    """The VM's resource allocations: processor, memory, disks, CD-ROM, NICs."""

    def rasd(classname: str, device: str, pool: str | None, **props: Any) -> CIMInstance:
        props = {
            "InstanceID": _iid(spec, device),
            "ElementName": device,
            "PoolID": pool and f"thinvisor:pool:{pool}",
            "AutomaticAllocation": True,
            **props,
        }
        return make_instance(ctx.repository, classname, props, ctx.namespace)

    found = [
        rasd(
            "TV_ProcessorAllocationSettingData",
            "cpu",
            "processor",
            ResourceType=RT_PROCESSOR,
            VirtualQuantity=spec.vcpus,
            AllocationUnits="count",
            VirtualQuantityUnits="count",
        ),
        rasd(
            "TV_ResourceAllocationSettingData",
            "memory",
            "memory",
            ResourceType=RT_MEMORY,
            VirtualQuantity=spec.memory_mib,
            AllocationUnits="byte*2^20",
            VirtualQuantityUnits="byte*2^20",
        ),
    ]
    for disk in spec.disks:
        found.append(
            rasd(
                "TV_StorageAllocationSettingData",
                disk.name,
                "disk",
                ResourceType=RT_LOGICAL_DISK,
                ResourceSubType=disk.bus,
                HostResource=[str(info.paths.resolve(disk.path))],
                Access=1 if disk.readonly else 3,
                Address=disk.name,
            )
        )
    if spec.cdrom is not None:
        media = [spec.cdrom.path] if spec.cdrom.path else []
        found.append(
            rasd(
                "TV_ResourceAllocationSettingData",
                "cdrom0",
                None,
                ResourceType=RT_DVD,
                ResourceSubType=spec.cdrom.bus,
                HostResource=media,
            )
        )
    for nic in spec.nics:
        found.append(
            rasd(
                "TV_EthernetPortAllocationSettingData",
                nic.name,
                "network",
                ResourceType=RT_NETWORK,
                ResourceSubType=nic.model,
                Address=_mac_digits(nic.mac),
                Connection=[nic.network],
            )
        )
    return found


async def _all_rasds(ctx: CimContext) -> list[tuple[VmSpec, CIMInstance]]:
    return [(s, r) for i, s in await valid_vms(ctx) for r in rasds(ctx, i, s)]


def _assoc(ctx: CimContext, classname: str, **refs: CIMInstanceName) -> CIMInstance:
    return make_association(ctx.repository, classname, ctx.namespace, **refs)


def _pool_of(inst: CIMInstance) -> str | None:
    pool = inst.get("PoolID")
    return None if pool is None else str(pool).rsplit(":", 1)[-1]


async def _pools(ctx: CimContext) -> list[CIMInstance]:
    facts = await asyncio.to_thread(hostinfo.host_facts)
    specs = [s for _, s in await valid_vms(ctx)]
    disk_bytes = await asyncio.to_thread(_datastore_bytes, ctx)
    known: dict[str, dict[str, Any]] = {
        "processor": {
            "Capacity": facts.cpus,
            "AllocationUnits": "count",
            "Reserved": sum(s.vcpus for s in specs),
        },
        "memory": {
            "Capacity": facts.memory_total_mib,
            "AllocationUnits": "byte*2^20",
            "Reserved": sum(s.memory_mib for s in specs),
        },
        "disk": {"Capacity": disk_bytes, "AllocationUnits": "byte"},
        "network": {"AllocationUnits": "count"},
    }
    return [
        make_instance(
            ctx.repository,
            "TV_ResourcePool",
            {
                "InstanceID": pool_path(kind)["InstanceID"],
                "PoolID": f"thinvisor:pool:{kind}",
                "ElementName": f"thinvisor {kind} pool",
                "Primordial": True,
                "ResourceType": POOL_TYPES[kind],
                **known[kind],
            },
            ctx.namespace,
        )
        for kind in POOL_KINDS
    ]


def _datastore_bytes(ctx: CimContext) -> int | None:
    if ctx.agent is None:
        return None
    total = 0
    for store in ctx.agent.config.all_datastores():
        try:
            total += shutil.disk_usage(store.path).total
        except OSError:
            continue
    return total or None


def _capabilities_id(kind: str) -> str:
    return f"thinvisor:pool:{kind}:capabilities"


def _job(ctx: CimContext, task: Task) -> CIMInstance:
    error = task.error or {}
    status = {TaskState.SUCCESS: [2, 17], TaskState.ERROR: [6, 17]}.get(task.state, [2])
    return make_instance(
        ctx.repository,
        "TV_ConcreteJob",
        {
            "InstanceID": job_path(task.id)["InstanceID"],
            "Name": task.kind,
            "ElementName": f"{task.kind} {task.object or ''}".strip(),
            "JobState": JOB_STATES[task.state],
            "JobStatus": task.message or str(task.state),
            "PercentComplete": task.progress,
            "ErrorDescription": error.get("message"),
            "Owner": task.user,
            "OperationalStatus": status,
            "DeleteOnCompletion": False,
            "TimeSubmitted": _datetime(task.created),
            "StartTime": _datetime(task.started),
        },
        ctx.namespace,
    )


def _datetime(stamp: str | None) -> CIMDateTime | None:
    if stamp is None:
        return None
    try:
        return CIMDateTime(datetime.fromisoformat(stamp))
    except ValueError:
        return None


def _tasks(ctx: CimContext) -> list[Task]:
    return [] if ctx.agent is None else ctx.agent.tasks.list(limit=10_000)


# Instance builders for the classes without methods


async def _vsmc(ctx: CimContext) -> list[CIMInstance]:
    props = {
        "InstanceID": VSMC_ID,
        "ElementName": "thinvisor VSMS capabilities",
        "VirtualSystemTypesSupported": [TYPE_PREFIX + m for m in MACHINES] + [APPLIANCE_TYPE],
        "SynchronousMethodsSupported": [2, 3, 5, 6, 7, 10],
        "AsynchronousMethodsSupported": [],
        "RequestedStatesSupported": [2, 3, 4, 6, 9, 10, 11],
        "ElementNameEditSupported": False,
        "StateAwareness": [2],
    }
    return [
        make_instance(
            ctx.repository, "TV_VirtualSystemManagementCapabilities", props, ctx.namespace
        )
    ]


async def _allocation_capabilities(ctx: CimContext) -> list[CIMInstance]:
    return [
        make_instance(
            ctx.repository,
            "TV_AllocationCapabilities",
            {
                "InstanceID": _capabilities_id(kind),
                "ResourceType": POOL_TYPES[kind],
                "ElementName": f"thinvisor {kind} allocation capabilities",
            },
            ctx.namespace,
        )
        for kind in POOL_KINDS
    ]


async def _hosted_service(ctx: CimContext) -> list[CIMInstance]:
    refs = {"Antecedent": host_path(ctx.namespace), "Dependent": vsms_path(ctx.namespace)}
    return [_assoc(ctx, "TV_HostedService", **refs)]


async def _element_capabilities(ctx: CimContext) -> list[CIMInstance]:
    vsmc = CIMInstanceName(
        "TV_VirtualSystemManagementCapabilities", {"InstanceID": VSMC_ID}, namespace=ctx.namespace
    )
    found = [
        _assoc(
            ctx,
            "TV_ElementCapabilities",
            ManagedElement=vsms_path(ctx.namespace),
            Capabilities=vsmc,
        )
    ]
    for kind in POOL_KINDS:
        caps = CIMInstanceName(
            "TV_AllocationCapabilities",
            {"InstanceID": _capabilities_id(kind)},
            namespace=ctx.namespace,
        )
        found.append(
            _assoc(
                ctx,
                "TV_ElementCapabilities",
                ManagedElement=pool_path(kind, ctx.namespace),
                Capabilities=caps,
            )
        )
    return found


async def _hosted_dependency(ctx: CimContext) -> list[CIMInstance]:
    host = host_path(ctx.namespace)
    return [
        _assoc(
            ctx, "TV_HostedDependency", Antecedent=host, Dependent=vm_path(s.uuid, ctx.namespace)
        )
        for _, s in await valid_vms(ctx)
    ]


async def _vssds(ctx: CimContext) -> list[CIMInstance]:
    return [vssd(ctx, s) for _, s in await valid_vms(ctx)]


async def _rasd_instances(ctx: CimContext) -> list[CIMInstance]:
    return [r for _, r in await _all_rasds(ctx)]


def _vm_to_vssd(classname: str) -> Callable[[CimContext], Awaitable[list[CIMInstance]]]:
    async def build(ctx: CimContext) -> list[CIMInstance]:
        return [
            _assoc(
                ctx,
                classname,
                ManagedElement=vm_path(s.uuid, ctx.namespace),
                SettingData=vssd_path(s, ctx.namespace),
            )
            for _, s in await valid_vms(ctx)
        ]

    return build


async def _vssd_components(ctx: CimContext) -> list[CIMInstance]:
    return [
        _assoc(
            ctx,
            "TV_VirtualSystemSettingDataComponent",
            GroupComponent=vssd_path(s, ctx.namespace),
            PartComponent=r.path,
        )
        for s, r in await _all_rasds(ctx)
    ]


async def _hosted_pools(ctx: CimContext) -> list[CIMInstance]:
    host = host_path(ctx.namespace)
    return [
        _assoc(
            ctx,
            "TV_HostedResourcePool",
            GroupComponent=host,
            PartComponent=pool_path(kind, ctx.namespace),
        )
        for kind in POOL_KINDS
    ]


async def _allocation_from_pool(ctx: CimContext) -> list[CIMInstance]:
    found = []
    for _, r in await _all_rasds(ctx):
        kind = _pool_of(r)
        if kind in POOL_KINDS:
            found.append(
                _assoc(
                    ctx,
                    "TV_ResourceAllocationFromPool",
                    Antecedent=pool_path(kind, ctx.namespace),
                    Dependent=r.path,
                )
            )
    return found


async def _jobs(ctx: CimContext) -> list[CIMInstance]:
    return [_job(ctx, t) for t in _tasks(ctx)]


async def _affected_job_elements(ctx: CimContext) -> list[CIMInstance]:
    uuids = {s.name: s.uuid for _, s in await valid_vms(ctx)}
    found = []
    for task in _tasks(ctx):
        kind, _, name = (task.object or "").partition("/")
        if kind == "vm" and name in uuids:
            found.append(
                _assoc(
                    ctx,
                    "TV_AffectedJobElement",
                    AffectedElement=vm_path(uuids[name], ctx.namespace),
                    AffectingElement=job_path(task.id, ctx.namespace),
                )
            )
    return found


# Parsing what clients send


def embedded_instance(value: Any, name: str) -> CIMInstance:
    """An EmbeddedInstance parameter: the codec gives a CIMInstance; a client that sent
    a plain string gets it parsed here."""
    if isinstance(value, CIMInstance):
        return value
    if isinstance(value, str):
        parse = getattr(codec, "parse_embedded_instance", None) or _parse_instance_xml
        try:
            inst = parse(value)
        except (ValueError, TypeError, KeyError, SyntaxError) as exc:
            raise InvalidArgument(name, f"not an embedded instance: {exc}") from exc
        if isinstance(inst, CIMInstance):
            return inst
    raise InvalidArgument(name, "must be an embedded instance")


def _parse_instance_xml(text: str) -> CIMInstance:
    """A CIM-XML INSTANCE element's class and its PROPERTY / PROPERTY.ARRAY values
    (references are not needed in settings and are skipped)."""
    root = defusedxml.ElementTree.fromstring(text, forbid_dtd=True)
    if root.tag != "INSTANCE":
        raise ValueError(f"{root.tag} is not an INSTANCE")
    inst = CIMInstance(root.attrib["CLASSNAME"])
    for prop in root:
        name, ptype = prop.attrib.get("NAME"), prop.attrib.get("TYPE", "string")
        if name is None or prop.tag not in ("PROPERTY", "PROPERTY.ARRAY"):
            continue
        if prop.tag == "PROPERTY":
            value_elem = prop.find("VALUE")
            value = None if value_elem is None else pywbem.cimvalue(value_elem.text or "", ptype)
        else:
            values = prop.findall("VALUE.ARRAY/VALUE")
            value = [pywbem.cimvalue(v.text or "", ptype) for v in values]
        inst[name] = pywbem.CIMProperty(
            name, value, type=ptype, is_array=prop.tag.endswith("ARRAY")
        )
    return inst


def _get(inst: CIMInstance, name: str) -> Any:
    return inst.get(name)


_UNITS = {"kilobytes": 10, "megabytes": 20, "gigabytes": 30, "bytes": 0}


def quantity_bytes(inst: CIMInstance) -> int:
    """VirtualQuantity x AllocationUnits (``byte``, ``byte*2^N``, or the old names)."""
    quantity = _get(inst, "VirtualQuantity")
    units = str(_get(inst, "AllocationUnits") or _get(inst, "VirtualQuantityUnits") or "byte")
    if quantity is None:
        raise InvalidArgument("VirtualQuantity", "is required")
    match = re.fullmatch(r"\s*byte\s*(?:\*\s*2\s*\^\s*(\d+))?\s*", units, re.IGNORECASE)
    if match:
        shift = int(match.group(1) or 0)
    elif units.lower() in _UNITS:
        shift = _UNITS[units.lower()]
    else:
        raise InvalidArgument("AllocationUnits", f"{units!r} is not a unit of bytes")
    return int(quantity) << shift


def _resource_type(rasd: CIMInstance) -> int:
    value = _get(rasd, "ResourceType")
    if value is None:
        raise InvalidArgument("ResourceType", "is required in every RASD")
    return int(value)


def _first(values: Any) -> str | None:
    if isinstance(values, list):
        return str(values[0]) if values else None
    return None if values is None else str(values)


def vm_create(system: CIMInstance, resources: Iterable[CIMInstance]) -> VmCreate:
    """The ``VmCreate`` that a VSSD and its RASDs describe."""
    data: dict[str, Any] = {**_system_fields(system), "disks": [], "nics": []}
    name = _get(system, "ElementName") or _get(system, "VirtualSystemIdentifier")
    if not name:
        raise InvalidArgument(
            "SystemSettings", "ElementName or VirtualSystemIdentifier is required"
        )
    data["name"] = str(name)
    vstype = str(_get(system, "VirtualSystemType") or "")
    notes = [str(n) for n in _get(system, "Notes") or []]
    if vstype.lower() == APPLIANCE_TYPE.lower() or "thinvisor:appliance" in notes:
        data["appliance"] = True
    for rasd in resources:
        _add_resource(data, rasd)
    return validate(VmCreate, data)


def _system_fields(system: CIMInstance) -> dict[str, Any]:
    """The VmCreate / VmUpdate fields a VSSD gives: machine and autostart."""
    fields: dict[str, Any] = {}
    vstype = _get(system, "VirtualSystemType")
    if vstype is not None and str(vstype).lower() != APPLIANCE_TYPE.lower():
        machine = str(vstype)
        if not machine.lower().startswith(TYPE_PREFIX.lower()):
            raise InvalidArgument("VirtualSystemType", f"{machine!r} is not a thinvisor type")
        fields["machine"] = machine[len(TYPE_PREFIX) :]
    action = _get(system, "AutomaticStartupAction")
    if action is not None:
        fields["autostart"] = int(action) == 4
    order = _get(system, "AutomaticStartupActionSequenceNumber")
    if order is not None:
        fields["autostart_order"] = int(order)
    return fields


def _add_resource(data: dict[str, Any], rasd: CIMInstance) -> None:
    kind = _resource_type(rasd)
    if kind == RT_PROCESSOR:
        data["vcpus"] = int(_get(rasd, "VirtualQuantity") or 1)
    elif kind == RT_MEMORY:
        data["memory_mib"] = quantity_bytes(rasd) >> 20
    elif kind in DISK_TYPES:
        data["disks"].append(new_disk(rasd))
    elif kind in (RT_CD, RT_DVD):
        cdrom: dict[str, Any] = {"path": _first(_get(rasd, "HostResource"))}
        bus = _get(rasd, "ResourceSubType")
        if bus:
            cdrom["bus"] = str(bus)
        data["cdrom"] = validate(CdromSpec, cdrom)
    elif kind == RT_NETWORK:
        data["nics"].append(new_nic(rasd))
    else:
        raise InvalidArgument("ResourceType", f"resource type {kind} is not supported")


def new_disk(rasd: CIMInstance) -> NewDiskSpec:
    source = _first(_get(rasd, "HostResource"))
    fields: dict[str, Any] = {"source": source} if source else {"size": quantity_bytes(rasd)}
    bus = _get(rasd, "ResourceSubType")
    if bus:
        fields["bus"] = str(bus)
    return validate(NewDiskSpec, fields)


def new_nic(rasd: CIMInstance) -> NewNicSpec:
    fields: dict[str, Any] = {}
    address = _get(rasd, "Address")
    if address:
        fields["mac"] = _mac_colons(str(address))
    network = _first(_get(rasd, "Connection"))
    if network:
        fields["network"] = network
    model = _get(rasd, "ResourceSubType")
    if model:
        fields["model"] = str(model)
    return validate(NewNicSpec, fields)


def vm_update(system: CIMInstance, spec: VmSpec) -> VmUpdate:
    name = _get(system, "ElementName")
    if name is not None and str(name) != spec.name:
        raise InvalidArgument("ElementName", "renaming a VM is not supported")
    return validate(VmUpdate, _system_fields(system))


def _parse_iid(iid: Any) -> tuple[str, str | None]:
    """The VM UUID and the device (None for the VSSD) in a settings InstanceID."""
    parts = str(iid or "").split(":")
    if len(parts) not in (2, 3) or parts[0] != "thinvisor":
        raise InvalidArgument("InstanceID", f"{iid!r} is not a thinvisor setting")
    return parts[1], parts[2] if len(parts) == 3 else None


# Methods


class _Acting:
    """Events written during a method name the CIM user, as the REST API does."""

    def __init__(self, ctx: CimContext) -> None:
        self.user = ctx.user.name

    def __enter__(self) -> None:
        self._token = current_user.set(self.user)

    def __exit__(self, *exc: object) -> None:
        current_user.reset(self._token)


def submit_job(ctx: CimContext, kind: str, vm: str, work: Work) -> Result:
    """Run ``work`` as a host task about ``vm``; the method's answer: Job Started, and
    the job's reference."""
    assert ctx.agent is not None
    task = ctx.agent.tasks.submit(kind, f"vm/{vm}", ctx.user.name, work)
    return Uint32(JOB_STARTED), {"Job": job_path(task.id, ctx.namespace)}


@dataclass
class ManagementService:
    """TV_VirtualSystemManagementService: DefineSystem and the other DSP1042 methods."""

    classname: str = VSMS_CLASS
    namespace: str = CIMV2

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        path = vsms_path(ctx.namespace)
        props = {
            **path.keybindings,
            "ElementName": VSMS_NAME,
            "Caption": VSMS_NAME,
            "EnabledState": 2,
            "RequestedState": 12,
            "HealthState": 5,
            "OperationalStatus": [2],
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
            with _Acting(ctx):
                result: Result = await handler(ctx, params)
                return result
        except InvalidArgument as exc:
            log.info("%s: invalid parameter: %s", method, exc)
            return Uint32(VSMS_INVALID_PARAMETER), {}

    async def _definesystem(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        if params.get("ReferenceConfiguration") is not None:
            return Uint32(NOT_SUPPORTED), {}
        system = embedded_instance(params.get("SystemSettings"), "SystemSettings")
        resources = [
            embedded_instance(r, "ResourceSettings") for r in params.get("ResourceSettings") or []
        ]
        info = await service_of(ctx).create_from(vm_create(system, resources))
        assert info.spec is not None
        return Uint32(COMPLETED), {"ResultingSystem": vm_path(info.spec.uuid, ctx.namespace)}

    async def _destroysystem(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        name = _vm_name(ctx, params.get("AffectedSystem"), "AffectedSystem")
        await service_of(ctx).delete_vm(name)
        return Uint32(COMPLETED), {}

    async def _modifysystemsettings(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        system = embedded_instance(params.get("SystemSettings"), "SystemSettings")
        uuid, device = _parse_iid(_get(system, "InstanceID"))
        if device is not None:
            raise InvalidArgument("SystemSettings", "is not a VSSD")
        service = service_of(ctx)
        info = await service.get_vm(service.resolve(uuid))
        assert info.spec is not None
        await service.update_vm(info.name, vm_update(system, info.spec))
        return Uint32(COMPLETED), {}

    async def _modifyresourcesettings(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        """Processor and memory RASDs change vcpus and memory (the VM must be stopped)."""
        service = service_of(ctx)
        changed: list[CIMInstanceName] = []
        for value in params.get("ResourceSettings") or []:
            rasd = embedded_instance(value, "ResourceSettings")
            uuid, device = _parse_iid(_get(rasd, "InstanceID"))
            name = service.resolve(uuid)
            if device == "cpu":
                update = validate(VmUpdate, {"vcpus": _get(rasd, "VirtualQuantity")})
            elif device == "memory":
                update = validate(VmUpdate, {"memory_mib": quantity_bytes(rasd) >> 20})
            else:
                return Uint32(NOT_SUPPORTED), {}
            info = await service.update_vm(name, update)
            assert info.spec is not None
            changed.extend(
                r.path for r in rasds(ctx, info, info.spec) if r["ElementName"] == device
            )
        return Uint32(COMPLETED), {"ResultingResourceSettings": changed}

    async def _addresourcesettings(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        name = _vm_name_of_vssd(ctx, params.get("AffectedConfiguration"))
        resources = [
            embedded_instance(r, "ResourceSettings") for r in params.get("ResourceSettings") or []
        ]
        if any(_resource_type(r) not in DISK_TYPES for r in resources):
            return Uint32(NOT_SUPPORTED), {}  # only disks can be added to a defined VM
        disks = [new_disk(r) for r in resources]
        service = service_of(ctx)
        added: list[CIMInstanceName] = []
        for disk in disks:
            device = (await service.add_disk(name, disk)).name
            iid = _iid(_spec(await service.get_vm(name)), device)
            keys = {"InstanceID": iid}
            added.append(CIMInstanceName(STORAGE_RASD, keys, namespace=ctx.namespace))
        return Uint32(COMPLETED), {"ResultingResourceSettings": added}

    async def _removeresourcesettings(self, ctx: CimContext, params: dict[str, Any]) -> Result:
        service = service_of(ctx)
        targets: list[tuple[str, str]] = []
        for ref in params.get("ResourceSettings") or []:
            uuid, device = _parse_iid(ref.keybindings.get("InstanceID"))
            name = service.resolve(uuid)
            spec = _spec(await service.get_vm(name))
            if device is None or spec.disk(device) is None:
                return Uint32(NOT_SUPPORTED), {}  # only disks can be removed
            targets.append((name, device))
        for name, device in targets:
            await service.remove_disk(name, device)
        return Uint32(COMPLETED), {}


def _spec(info: VmInfo) -> VmSpec:
    if info.spec is None:
        raise NotFound(f"vm {info.name!r} has no valid configuration")
    return info.spec


def _vm_name(ctx: CimContext, ref: Any, param: str) -> str:
    if not isinstance(ref, CIMInstanceName) or "Name" not in ref.keybindings:
        raise InvalidArgument(param, "must be a virtual system's path")
    uuid = str(ref.keybindings["Name"])
    if uuid == host_name():
        raise InvalidArgument(param, "is the host, not a virtual system")
    return service_of(ctx).resolve(uuid)


def _vm_name_of_vssd(ctx: CimContext, ref: Any) -> str:
    if not isinstance(ref, CIMInstanceName):
        raise InvalidArgument("AffectedConfiguration", "must be a VSSD path")
    uuid, device = _parse_iid(ref.keybindings.get("InstanceID"))
    if device is not None:
        raise InvalidArgument("AffectedConfiguration", "must be a VSSD path")
    return service_of(ctx).resolve(uuid)


def _is_vm(ctx: CimContext, system: CIMInstanceName) -> bool:
    """Whether a ``TV_ComputerSystem`` is a VM (not the host, not a virtual switch)."""
    name = str(system.keybindings.get("Name"))
    if name == host_name():
        return False
    try:
        service_of(ctx).resolve(name)
    except NotFound:
        return False
    return True


# RequestedState -> (service method, the action whose state gate it passes, as a job?)
_TRANSITIONS: dict[int, tuple[str, Action, bool]] = {
    2: ("start", Action.START, False),
    3: ("stop", Action.STOP, False),
    4: ("shutdown", Action.SHUTDOWN, True),
    6: ("suspend", Action.SUSPEND, True),
    9: ("pause", Action.PAUSE, False),
    10: ("reset", Action.RESET, False),
    11: ("reset", Action.RESET, False),
}


@dataclass
class ComputerSystems:
    """TV_ComputerSystem: the host and its VMs (the network module adds the switches);
    RequestStateChange drives a VM's power."""

    classname: str = "TV_ComputerSystem"
    namespace: str = CIMV2

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        return [
            host_system(ctx.repository, ctx.namespace),
            *(vm_system(ctx, i, s) for i, s in await valid_vms(ctx)),
        ]

    async def invoke(
        self, ctx: CimContext, target: CIMInstanceName | str, method: str, params: dict[str, Any]
    ) -> Result:
        if method.lower() != "requeststatechange" or not isinstance(target, CIMInstanceName):
            return Uint32(NOT_SUPPORTED), {}
        if not _is_vm(ctx, target):
            return Uint32(NOT_SUPPORTED), {}  # the host and the switches: not over CIM
        requested = params.get("RequestedState")
        if requested is None or int(requested) not in _TRANSITIONS:
            return Uint32(RSC_INVALID_PARAMETER), {}
        try:
            with _Acting(ctx):
                return await self._change(ctx, target, int(requested), params.get("TimeoutPeriod"))
        except InvalidState as exc:
            log.info("RequestStateChange: %s", exc)
            return Uint32(INVALID_STATE_TRANSITION), {}
        except InvalidArgument as exc:
            log.info("RequestStateChange: invalid parameter: %s", exc)
            return Uint32(RSC_INVALID_PARAMETER), {}

    async def _change(
        self, ctx: CimContext, target: CIMInstanceName, requested: int, timeout: Any
    ) -> Result:
        service = service_of(ctx)
        name = service.resolve(str(target.keybindings["Name"]))
        state = PowerState((await service.get_vm(name)).state)
        verb, action, as_job = _TRANSITIONS[requested]
        if requested == 2 and state is not PowerState.STOPPED:
            verb, action = "resume", Action.RESUME  # paused or suspended: resume
            as_job = state is PowerState.SUSPENDED
        elif requested == 2:
            as_job = False
        # The service checks again under the VM's lock; this early check lets a job that
        # could never run answer 4097 now instead of failing later.
        check_allowed(name, state, action)
        kwargs: dict[str, Any] = {}
        if verb == "shutdown" and isinstance(timeout, CIMDateTime) and timeout.is_interval:
            kwargs["timeout"] = timeout.timedelta.total_seconds() or None
        run: Callable[[], Awaitable[Any]] = lambda: getattr(service, verb)(name, **kwargs)  # noqa: E731
        if as_job:
            return submit_job(ctx, f"vm.{verb}", name, lambda _: run())
        await run()
        return Uint32(COMPLETED), {}


def providers() -> list[InstanceProvider]:
    """The providers of DSP1042, DSP1057 and DSP1041's classes."""
    functions: dict[str, Callable[[CimContext], Awaitable[list[CIMInstance]]]] = {
        "TV_VirtualSystemManagementCapabilities": _vsmc,
        "TV_HostedService": _hosted_service,
        "TV_ElementCapabilities": _element_capabilities,
        "TV_HostedDependency": _hosted_dependency,
        "TV_VirtualSystemSettingData": _vssds,
        "TV_SettingsDefineState": _vm_to_vssd("TV_SettingsDefineState"),
        "TV_ElementSettingData": _vm_to_vssd("TV_ElementSettingData"),
        "TV_VirtualSystemSettingDataComponent": _vssd_components,
        "TV_ResourcePool": _pools,
        "TV_HostedResourcePool": _hosted_pools,
        "TV_AllocationCapabilities": _allocation_capabilities,
        "TV_ResourceAllocationFromPool": _allocation_from_pool,
        "TV_ConcreteJob": _jobs,
        "TV_AffectedJobElement": _affected_job_elements,
    }
    found: list[InstanceProvider] = [ManagementService(), ComputerSystems()]
    found.extend(FunctionProvider(name, CIMV2, build) for name, build in functions.items())
    found.extend(_RasdProvider(name) for name in RASD_CLASSES)
    return found


STORAGE_RASD = "TV_StorageAllocationSettingData"
RASD_CLASSES = (
    "TV_ProcessorAllocationSettingData",
    "TV_ResourceAllocationSettingData",
    "TV_StorageAllocationSettingData",
    "TV_EthernetPortAllocationSettingData",
)


@dataclass
class _RasdProvider:
    """The RASDs of one class (the dispatcher asks each class's provider)."""

    classname: str
    namespace: str = CIMV2

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        return [r for r in await _rasd_instances(ctx) if r.classname == self.classname]
