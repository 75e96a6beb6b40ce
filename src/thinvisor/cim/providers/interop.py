"""Profile Registration (DSP1033) in root/interop: what this CIM server implements.

The object manager (one ``TV_ObjectManager``), its namespaces (``TV_Namespace``), a
``TV_RegisteredProfile`` for each profile in ``PROFILES``, ``TV_ElementConformsToProfile``
from each profile to its central instances (in root/cimv2, but for Profile
Registration's own: the object manager) and ``TV_ReferencedProfile`` from the
autonomous profiles (Base Server, System Virtualization) to their component profiles.
Profiles implemented by other provider modules (the network's DSP1097 and DSP1050) are
handed to ``providers`` as ``ProfileSupport``: registered, referenced and conformed to
the same way.
Clients find central instances the way pywbem's ``WBEMServer.get_central_instances``
does: AssociatorNames over ``CIM_ElementConformsToProfile`` to ``ManagedElement``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from pywbem import CIMInstance, CIMInstanceName

from thinvisor.cim.provider import CIMV2, INTEROP, NAMESPACES, CimContext, InstanceProvider
from thinvisor.cim.providers.base import (
    HOST_CLASS,
    POOL_KINDS,
    FunctionProvider,
    host_name,
    host_path,
    make_instance,
    pool_path,
    vm_path,
)
from thinvisor.cim.providers.hardware import HostHardware
from thinvisor.cim.providers.logs import log_path

OBJECT_MANAGER = "TV_ObjectManager"
OBJECT_MANAGER_NAME = "thinvisor"
DMTF = 2  # RegisteredOrganization


@dataclass(frozen=True)
class Profile:
    """A DMTF profile: its document number, registered name and version."""

    dsp: str
    name: str
    version: str

    @property
    def instance_id(self) -> str:
        return f"thinvisor:{self.dsp}"

    @property
    def path(self) -> CIMInstanceName:
        return profile_path(self.dsp)


PROFILE_REGISTRATION = Profile("DSP1033", "Profile Registration", "1.0.0")
BASE_SERVER = Profile("DSP1004", "Base Server", "1.0.0")
COMPUTER_SYSTEM = Profile("DSP1052", "Computer System", "1.0.0")
CPU = Profile("DSP1022", "CPU", "1.0.0")
SYSTEM_MEMORY = Profile("DSP1026", "System Memory", "1.0.0")
SENSORS = Profile("DSP1009", "Sensors", "1.0.0")
FAN = Profile("DSP1013", "Fan", "1.0.0")
POWER_SUPPLY = Profile("DSP1015", "Power Supply", "1.0.0")
RECORD_LOG = Profile("DSP1010", "Record Log", "2.0.0")
SYSTEM_VIRTUALIZATION = Profile("DSP1042", "System Virtualization", "1.0.0")
VIRTUAL_SYSTEM = Profile("DSP1057", "Virtual System", "1.0.0")
RESOURCE_ALLOCATION = Profile("DSP1041", "Resource Allocation", "1.1.0")

PROFILES = (
    PROFILE_REGISTRATION,
    BASE_SERVER,
    COMPUTER_SYSTEM,
    CPU,
    SYSTEM_MEMORY,
    SENSORS,
    FAN,
    POWER_SUPPLY,
    RECORD_LOG,
    SYSTEM_VIRTUALIZATION,
    VIRTUAL_SYSTEM,
    RESOURCE_ALLOCATION,
)

# Scoping profile -> the component profiles it references.
REFERENCES = {
    BASE_SERVER: (CPU, SYSTEM_MEMORY, SENSORS, FAN, POWER_SUPPLY, RECORD_LOG),
    SYSTEM_VIRTUALIZATION: (VIRTUAL_SYSTEM, RESOURCE_ALLOCATION),
}


def profile_path(dsp: str) -> CIMInstanceName:
    """The path of the ``TV_RegisteredProfile`` of DMTF document ``dsp`` (``DSP1004``)."""
    return CIMInstanceName(
        "TV_RegisteredProfile", {"InstanceID": f"thinvisor:{dsp}"}, namespace=INTEROP
    )


def object_manager_path() -> CIMInstanceName:
    keys = {
        "SystemCreationClassName": HOST_CLASS,
        "SystemName": host_name(),
        "CreationClassName": OBJECT_MANAGER,
        "Name": OBJECT_MANAGER_NAME,
    }
    return CIMInstanceName(OBJECT_MANAGER, keys, namespace=INTEROP)


async def object_managers(ctx: CimContext) -> list[CIMInstance]:
    properties = {
        **object_manager_path().keybindings,
        "ElementName": "thinvisor",
        "Description": "thinvisor CIM server",
        "Started": True,
        "GatherStatisticalData": False,
        "EnabledState": 2,  # Enabled
        "RequestedState": 12,  # Not Applicable
        "OperationalStatus": [2],  # OK
        "HealthState": 5,  # OK
    }
    return [make_instance(ctx.repository, OBJECT_MANAGER, properties, INTEROP)]


async def namespaces(ctx: CimContext) -> list[CIMInstance]:
    manager = object_manager_path()
    return [
        make_instance(
            ctx.repository,
            "TV_Namespace",
            {
                "SystemCreationClassName": HOST_CLASS,
                "SystemName": host_name(),
                "ObjectManagerCreationClassName": OBJECT_MANAGER,
                "ObjectManagerName": manager["Name"],
                "Name": namespace,
                "ElementName": namespace,
                "ClassType": 2,  # CIM
                "ClassTypeVersion": "2.49.0",
            },
            INTEROP,
        )
        for namespace in NAMESPACES
    ]


async def registered_profiles(
    ctx: CimContext, profiles: Sequence[Profile] = PROFILES
) -> list[CIMInstance]:
    return [
        make_instance(
            ctx.repository,
            "TV_RegisteredProfile",
            {
                "InstanceID": profile.instance_id,
                "RegisteredOrganization": DMTF,
                "RegisteredName": profile.name,
                "RegisteredVersion": profile.version,
                "ElementName": f"{profile.name} {profile.version} ({profile.dsp})",
                "AdvertiseTypes": [2],  # Not Advertised
            },
            INTEROP,
        )
        for profile in profiles
    ]


async def referenced_profiles(
    ctx: CimContext, references: Mapping[Profile, Sequence[Profile]] = REFERENCES
) -> list[CIMInstance]:
    return [
        make_instance(
            ctx.repository,
            "TV_ReferencedProfile",
            {"Antecedent": component.path, "Dependent": scoping.path},
            INTEROP,
        )
        for scoping, components in references.items()
        for component in components
    ]


Centrals = Callable[[CimContext], Awaitable[list[CIMInstanceName]]]


@dataclass(frozen=True)
class ProfileSupport:
    """A profile another provider module implements: how to find its central instances,
    and the autonomous profile that references it (None when it is autonomous)."""

    profile: Profile
    centrals: Centrals
    scoping: Profile | None = None


class Conformance:
    """Which instances are central to which profile."""

    def __init__(self, hardware: HostHardware, extra: Sequence[ProfileSupport] = ()) -> None:
        self.hardware = hardware
        self.extra = tuple(extra)

    def centrals(self) -> dict[Profile, Centrals]:
        return {
            PROFILE_REGISTRATION: self._object_manager,
            BASE_SERVER: self._host,
            COMPUTER_SYSTEM: self._host,
            SYSTEM_VIRTUALIZATION: self._host,
            CPU: self._paths(self.hardware.processors),
            SYSTEM_MEMORY: self._paths(self.hardware.memory),
            SENSORS: self._paths(self.hardware.sensors),
            FAN: self._paths(self.hardware.fans),
            POWER_SUPPLY: self._paths(self.hardware.power_supplies),
            RECORD_LOG: self._log,
            VIRTUAL_SYSTEM: self._vms,
            RESOURCE_ALLOCATION: self._pools,
            **{support.profile: support.centrals for support in self.extra},
        }

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        """The ``TV_ElementConformsToProfile`` instances."""
        found: list[CIMInstance] = []
        for profile, centrals in self.centrals().items():
            for path in await centrals(ctx):
                refs = {"ConformantStandard": profile.path, "ManagedElement": path}
                found.append(
                    make_instance(ctx.repository, "TV_ElementConformsToProfile", refs, INTEROP)
                )
        return found

    @staticmethod
    async def _object_manager(ctx: CimContext) -> list[CIMInstanceName]:
        return [object_manager_path()]

    @staticmethod
    async def _host(ctx: CimContext) -> list[CIMInstanceName]:
        return [host_path(CIMV2)]

    @staticmethod
    async def _log(ctx: CimContext) -> list[CIMInstanceName]:
        return [log_path()]

    @staticmethod
    async def _vms(ctx: CimContext) -> list[CIMInstanceName]:
        if ctx.agent is None:
            return []
        vms = await ctx.agent.service.list_vms()
        return [vm_path(vm.spec.uuid) for vm in vms if vm.spec is not None]

    @staticmethod
    async def _pools(ctx: CimContext) -> list[CIMInstanceName]:
        return [pool_path(kind) for kind in POOL_KINDS]

    @staticmethod
    def _paths(
        build: Callable[[CimContext], Awaitable[list[CIMInstance]]],
    ) -> Centrals:
        async def paths(ctx: CimContext) -> list[CIMInstanceName]:
            return [inst.path for inst in await build(ctx)]

        return paths


def providers(
    hardware: HostHardware | None = None, extra: Sequence[ProfileSupport] = ()
) -> list[InstanceProvider]:
    """The Profile Registration profile's providers; ``hardware`` finds the central
    instances of the hardware profiles (the host's own /sys and /proc by default);
    ``extra`` are the profiles other modules implement, registered next to ``PROFILES``."""
    conformance = Conformance(hardware or HostHardware(), extra)
    profiles = [*PROFILES, *(support.profile for support in extra)]
    references = {scoping: list(components) for scoping, components in REFERENCES.items()}
    for support in extra:
        if support.scoping is not None:
            references.setdefault(support.scoping, []).append(support.profile)
    return [
        FunctionProvider(OBJECT_MANAGER, INTEROP, object_managers),
        FunctionProvider("TV_Namespace", INTEROP, namespaces),
        FunctionProvider(
            "TV_RegisteredProfile", INTEROP, partial(registered_profiles, profiles=profiles)
        ),
        FunctionProvider(
            "TV_ReferencedProfile", INTEROP, partial(referenced_profiles, references=references)
        ),
        FunctionProvider("TV_ElementConformsToProfile", INTEROP, conformance.instances),
    ]
