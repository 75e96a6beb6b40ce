"""The network's CIM classes (DSP1097, DSP1050), answered by the real dispatcher and the
real providers over a fake agent: its VMs and switches are plain data.

The compiled schema comes from the shared test cache, as in ``test_cim_schema``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from pywbem import CIMClassName, CIMError, CIMInstance, CIMInstanceName, Uint16

from thinvisor.auth import Role
from thinvisor.auth.users import User
from thinvisor.cim import schema
from thinvisor.cim.operations import Dispatcher
from thinvisor.cim.provider import CIMV2, INTEROP, CimContext, InstanceProvider
from thinvisor.cim.providers import default_registry, extended, interop, network
from thinvisor.cim.providers.base import FunctionProvider, host_path, pool_path, vm_path
from thinvisor.cim.schema import ClassRepository
from thinvisor.errors import NotFound
from thinvisor.host.engine.paths import VmPaths
from thinvisor.host.service import VmInfo
from thinvisor.model.vm import NicSpec, VmSpec

TEST_CACHE = Path(os.environ.get("THINVISOR_TEST_CACHE") or "/var/cache/thinvisor-test")
ADMIN = User("admin", Role.ADMIN, datetime.now(UTC))

WEB_UUID = "6f1c3a52-8d4e-4c1b-9a55-0b3f1d2e7a10"
DB_UUID = "0a9e5c1d-2b3f-4e6a-8c7d-1e2f3a4b5c6d"
TAP = "tv0123456789ab"


@pytest.fixture(scope="module")
def repository() -> ClassRepository:
    return schema.load_repository(TEST_CACHE)


# A fake agent: the calls the providers make, answered from data


class FakeNetwork:
    def __init__(self, switches: list[dict[str, Any]]) -> None:
        self.switches = switches

    async def list_switches(self) -> list[dict[str, Any]]:
        return self.switches


class FakeService:
    def __init__(self, vms: list[VmInfo], switches: list[dict[str, Any]]) -> None:
        self.vms = vms
        self.network = FakeNetwork(switches)

    async def list_vms(self) -> list[VmInfo]:
        return self.vms

    def resolve(self, ref: str) -> str:
        for vm in self.vms:
            if ref in (vm.name, vm.spec and vm.spec.uuid):
                return vm.name
        raise NotFound(f"vm {ref!r} does not exist")


class FakeAgent:
    def __init__(self, service: FakeService) -> None:
        self.service = service


def vm(tmp: Path, name: str, uuid: str, state: str, nics: Sequence[NicSpec]) -> VmInfo:
    spec = VmSpec(name=name, uuid=uuid, nics=list(nics))
    return VmInfo(name, "local", state, spec, VmPaths(tmp / name, tmp / "run" / name))


def nic(name: str, mac: str, network: str, connected: bool = True) -> NicSpec:
    return NicSpec(name=name, mac=mac, network=network, connected=connected)


def switch(
    name: str, groups: list[dict[str, Any]], present: bool = True, **extra: Any
) -> dict[str, Any]:
    base = {
        "name": name,
        "bridge": f"tvbr-{name}",
        "mtu": 1500,
        "uplink": None,
        "vlan_filtering": True,
        "nat": None,
        "port_groups": groups,
        "present": present,
        "vlan_enforcement": "bridge",
        "dhcp": None,
    }
    return {**base, **extra}


def port(vm: str, nic: str, mac: str, tap: str | None) -> dict[str, Any]:
    return {"vm": vm, "nic": nic, "mac": mac, "tap": tap}


@pytest.fixture
def host(tmp_path: Path) -> FakeAgent:
    """``web`` runs with a NIC on VLAN 10 and one on user networking; ``db`` is stopped;
    switch ``lan`` has an uplink, switch ``gone`` lost its bridge."""
    web = vm(
        tmp_path,
        "web",
        WEB_UUID,
        "running",
        [nic("net0", "52:54:00:aa:bb:01", "vlan10"), nic("net1", "52:54:00:aa:bb:02", "user")],
    )
    db = vm(tmp_path, "db", DB_UUID, "stopped", [nic("net0", "52:54:00:aa:bb:03", "plain")])
    groups = [
        {"name": "vlan10", "vlan": 10, "ports": [port("web", "net0", "52:54:00:aa:bb:01", TAP)]},
        {"name": "plain", "vlan": 0, "ports": [port("db", "net0", "52:54:00:aa:bb:03", None)]},
        {"name": "all", "vlan": 4095, "ports": []},
    ]
    lan = switch("lan", groups, uplink="eth9")
    gone = switch("gone", [], present=False)
    return FakeAgent(FakeService([web, db], [lan, gone]))


def call(
    repository: ClassRepository, agent: FakeAgent | None, operation: str, **params: Any
) -> Any:
    namespace = params.pop("namespace", CIMV2)
    ctx = CimContext(cast(Any, agent), ADMIN, repository, namespace)
    dispatcher = Dispatcher(repository, default_registry())
    return asyncio.run(dispatcher.intrinsic(ctx, operation, params))


def enumerate_instances(
    repository: ClassRepository, agent: FakeAgent, classname: str
) -> list[CIMInstance]:
    found: list[CIMInstance] = call(
        repository, agent, "EnumerateInstances", ClassName=CIMClassName(classname)
    )
    return found


def associators(
    repository: ClassRepository, agent: FakeAgent, path: CIMInstanceName, assoc: str
) -> list[CIMInstance]:
    found: list[CIMInstance] = call(
        repository, agent, "Associators", ObjectName=path, AssocClass=CIMClassName(assoc)
    )
    return found


def vm_port_path(uuid: str, device: str) -> CIMInstanceName:
    return network.port_path(vm_path(uuid), device)


# Switches (DSP1097)


def test_a_switch_is_a_computer_system_dedicated_to_switching(
    repository: ClassRepository, host: FakeAgent
) -> None:
    systems = enumerate_instances(repository, host, "CIM_ComputerSystem")
    switches = {s["ElementName"]: s for s in systems if 5 in (s["Dedicated"] or [])}
    assert set(switches) == {"lan", "gone"}
    lan = switches["lan"]
    assert lan.path == network.switch_path("lan")
    assert lan["Name"] == "thinvisor:switch:lan"
    assert lan["Dedicated"] == [5, 38]
    assert lan["OtherIdentifyingInfo"] == ["tvbr-lan"]
    assert (lan["EnabledState"], lan["OperationalStatus"]) == (2, [2])
    gone = switches["gone"]
    assert (gone["EnabledState"], gone["OperationalStatus"]) == (3, [6])
    assert "missing" in gone["Description"]


def test_switches_are_hosted_and_defined_by_their_settings(
    repository: ClassRepository, host: FakeAgent
) -> None:
    hosted = associators(repository, host, host_path(), "TV_HostedDependency")
    assert {h["ElementName"] for h in hosted} == {"web", "db", "lan", "gone"}
    lan = network.switch_path("lan")
    [settings] = associators(repository, host, lan, "CIM_SettingsDefineState")
    assert settings.classname == "TV_VirtualEthernetSwitchSettingData"
    assert settings["VLANConnection"] == ["10"]  # untagged and trunk groups name no VLAN
    assert settings["EVBMode"] == 2
    assert settings["AssociatedResourcePool"] == [pool_path("network").to_wbem_uri()]
    [same] = associators(repository, host, lan, "CIM_ElementSettingData")
    assert same.path == settings.path


def test_switch_ports_are_the_uplink_and_the_running_nics(
    repository: ClassRepository, host: FakeAgent
) -> None:
    ports = associators(repository, host, network.switch_path("lan"), "TV_SystemDevice")
    by_id = {p["DeviceID"]: p for p in ports}
    assert set(by_id) == {"eth9", TAP}  # db is stopped: its NIC has no TAP, no port
    tap = by_id[TAP]
    assert tap["SystemName"] == "thinvisor:switch:lan"
    assert tap["PVID"] == 10 and tap["EnabledState"] == 2
    assert tap["OtherIdentifyingInfo"] == ["vlan10", "web", "net0"]
    assert tap["ActiveMaximumTransmissionUnit"] == 1500
    uplink = by_id["eth9"]
    assert uplink["PVID"] is None and uplink["IdentifyingDescriptions"] == ["thinvisor:uplink"]
    [back] = associators(repository, host, tap.path, "TV_SystemDevice")
    assert back.path == network.switch_path("lan")


def test_an_unplugged_nic_keeps_its_switch_port_disabled(
    repository: ClassRepository, host: FakeAgent
) -> None:
    web = host.service.vms[0]
    assert web.spec is not None
    web.spec.nics[0] = nic("net0", "52:54:00:aa:bb:01", "vlan10", connected=False)
    got = call(repository, host, "GetInstance", InstanceName=vm_port_path(WEB_UUID, "net0"))
    assert got["EnabledState"] == 3 and got["OperationalStatus"] == [10]
    [tap] = [
        p for p in enumerate_instances(repository, host, "TV_EthernetPort") if p["DeviceID"] == TAP
    ]
    assert tap["EnabledState"] == 3


def test_a_switch_has_no_power_to_change(repository: ClassRepository, host: FakeAgent) -> None:
    ctx = CimContext(cast(Any, host), ADMIN, repository, CIMV2)
    dispatcher = Dispatcher(repository, default_registry())
    result = asyncio.run(
        dispatcher.invoke(
            ctx, network.switch_path("lan"), "RequestStateChange", {"RequestedState": Uint16(3)}
        )
    )
    assert result.return_value == 1


# VM NICs (DSP1050)


def test_each_nic_is_an_ethernet_port_of_its_vm(
    repository: ClassRepository, host: FakeAgent
) -> None:
    ports = associators(repository, host, vm_path(WEB_UUID), "TV_SystemDevice")
    by_id = {p["DeviceID"]: p for p in ports}
    assert set(by_id) == {"net0", "net1"}
    net0 = by_id["net0"]
    assert net0.classname == "TV_EthernetPort"
    assert net0["SystemCreationClassName"] == "TV_ComputerSystem"
    assert net0["SystemName"] == WEB_UUID
    assert net0["PermanentAddress"] == "525400AABB01"
    assert (net0["LinkTechnology"], net0["EnabledState"]) == (2, 2)
    assert net0["OtherIdentifyingInfo"] == ["vlan10", TAP]
    assert by_id["net1"]["OtherIdentifyingInfo"] == ["user"]  # no switch, no TAP
    [stopped] = associators(repository, host, vm_path(DB_UUID), "TV_SystemDevice")
    assert stopped["EnabledState"] == 3 and stopped["OperationalStatus"] == [10]


def test_a_nic_is_connected_to_its_switch_port(
    repository: ClassRepository, host: FakeAgent
) -> None:
    [switch_port] = associators(
        repository, host, vm_port_path(WEB_UUID, "net0"), "TV_DeviceConnection"
    )
    assert switch_port["DeviceID"] == TAP
    [vm_port] = associators(repository, host, switch_port.path, "CIM_DeviceConnection")
    assert vm_port.path == vm_port_path(WEB_UUID, "net0")
    assert (
        associators(repository, host, vm_port_path(DB_UUID, "net0"), "CIM_DeviceConnection") == []
    )


def test_a_nic_is_allocated_from_the_network_pool_as_its_rasd_says(
    repository: ClassRepository, host: FakeAgent
) -> None:
    net0 = vm_port_path(WEB_UUID, "net0")
    [rasd] = associators(repository, host, net0, "CIM_SettingsDefineState")
    assert rasd.classname == "TV_EthernetPortAllocationSettingData"
    assert rasd["Address"] == "525400AABB01" and rasd["Connection"] == ["vlan10"]
    assert rasd["PoolID"] == "thinvisor:pool:network"
    [pool] = call(
        repository,
        host,
        "AssociatorNames",
        ObjectName=net0,
        AssocClass=CIMClassName("CIM_ElementAllocatedFromPool"),
    )
    assert pool["InstanceID"] == rasd["PoolID"]
    allocated = call(
        repository,
        host,
        "AssociatorNames",
        ObjectName=pool_path("network"),
        AssocClass=CIMClassName("TV_ElementAllocatedFromPool"),
    )
    assert len(allocated) == 3  # every NIC, user networking included


def test_every_network_instance_is_found_by_its_path(
    repository: ClassRepository, host: FakeAgent
) -> None:
    classes = [p.classname for p in [*network.providers(), *network.extensions()]]
    for classname in classes:
        for inst in enumerate_instances(repository, host, classname):
            got = call(repository, host, "GetInstance", InstanceName=inst.path)
            assert got.path == inst.path


def test_an_unknown_port_is_not_found(repository: ClassRepository, host: FakeAgent) -> None:
    with pytest.raises(CIMError) as exc:
        call(repository, host, "GetInstance", InstanceName=vm_port_path(WEB_UUID, "net7"))
    assert exc.value.status_code == 6  # CIM_ERR_NOT_FOUND


# Profile Registration


def test_the_profiles_are_registered_with_their_central_instances(
    repository: ClassRepository, host: FakeAgent
) -> None:
    profiles = call(
        repository,
        host,
        "EnumerateInstances",
        ClassName=CIMClassName("TV_RegisteredProfile"),
        namespace=INTEROP,
    )
    names = {(p["RegisteredName"], p["RegisteredVersion"]) for p in profiles}
    assert {
        ("Virtual Ethernet Switch", "1.0.0"),
        ("Ethernet Port Resource Virtualization", "1.0.0"),
        ("Virtual System Snapshot Service", "1.0.0"),  # the snapshots module's
        ("Base Metrics", "1.0.1"),  # the metrics module's
        *((p.name, p.version) for p in interop.PROFILES),
    } == names
    expected = {
        network.VIRTUAL_ETHERNET_SWITCH: {network.switch_path("lan"), network.switch_path("gone")},
        network.ETHERNET_PORT_RESOURCE_VIRTUALIZATION: {pool_path("network")},
    }
    for profile, centrals in expected.items():
        found = call(
            repository,
            host,
            "AssociatorNames",
            ObjectName=profile.path,
            AssocClass=CIMClassName("CIM_ElementConformsToProfile"),
            namespace=INTEROP,
        )
        assert {_local(p) for p in found} == {_local(p) for p in centrals}
        [scoping] = call(
            repository,
            host,
            "AssociatorNames",
            ObjectName=profile.path,
            AssocClass=CIMClassName("CIM_ReferencedProfile"),
            ResultRole="Dependent",
            namespace=INTEROP,
        )
        assert scoping["InstanceID"] == interop.SYSTEM_VIRTUALIZATION.instance_id


def test_interop_alone_registers_only_its_own_profiles() -> None:
    registered = {p.classname: p for p in interop.providers()}
    assert set(registered) >= {"TV_RegisteredProfile", "TV_ReferencedProfile"}
    assert network.VIRTUAL_ETHERNET_SWITCH not in interop.PROFILES


def _local(path: CIMInstanceName) -> CIMInstanceName:
    path = path.copy()
    path.host = None
    path.namespace = CIMV2
    return path


# Joining providers


async def _none(ctx: CimContext) -> list[CIMInstance]:
    return []


def test_an_extension_needs_a_provider_of_its_class() -> None:
    with pytest.raises(ValueError, match="TV_Fan"):
        extended([], [FunctionProvider("TV_Fan", CIMV2, _none)])
    with pytest.raises(ValueError, match="TV_Fan"):
        extended(
            [FunctionProvider("TV_Fan", INTEROP, _none)], [FunctionProvider("TV_Fan", CIMV2, _none)]
        )


def test_joined_providers_keep_the_owners_methods(repository: ClassRepository) -> None:
    class Owner:
        classname = "TV_Fan"
        namespace = CIMV2

        async def instances(self, ctx: CimContext) -> list[CIMInstance]:
            return [CIMInstance("TV_Fan", {"DeviceID": "a"})]

        async def invoke(
            self, ctx: CimContext, target: Any, method: str, params: dict[str, Any]
        ) -> tuple[Any, dict[str, Any]]:
            return method, params

    async def more(ctx: CimContext) -> list[CIMInstance]:
        return [CIMInstance("TV_Fan", {"DeviceID": "b"})]

    # Class names are matched as CIM matches them: without regard to case.
    extra: list[InstanceProvider] = [
        FunctionProvider("tv_fan", CIMV2, more),
        FunctionProvider("TV_Fan", CIMV2, more),
    ]
    [joined] = extended([Owner()], extra)
    ctx = CimContext(None, ADMIN, repository, CIMV2)
    found = asyncio.run(joined.instances(ctx))
    assert [i["DeviceID"] for i in found] == ["a", "b", "b"]
    invoke = getattr(joined, "invoke")  # noqa: B009
    assert asyncio.run(invoke(ctx, "TV_Fan", "Spin", {"x": 1})) == ("Spin", {"x": 1})


# The compiled schema


def test_new_mof_files_are_compiled_and_change_the_cache_key(
    tmp_path: Path, repository: ClassRepository
) -> None:
    names = {p.name for p in schema.tv_mof_files()}
    assert {"TV_VirtualEthernetSwitchSettingData.mof", "TV_DeviceConnection.mof"} <= names
    assert repository.superclasses("TV_DeviceConnection")[0] == "CIM_DeviceConnection"
    (tmp_path / "cim-schema").mkdir()
    shared = schema.fetch_schema(TEST_CACHE)
    (tmp_path / "cim-schema" / schema.SCHEMA_VERSION).symlink_to(shared)
    compiled: list[list[str]] = []

    def compile_fn(directory: Path, classes: Sequence[str], mof: Sequence[Path]) -> Any:
        compiled.append([p.name for p in mof])
        return ClassRepository([], [])

    mof = schema.tv_mof_files()
    extra = tmp_path / "TV_Extra.mof"
    extra.write_text("// nothing\n")
    for files in (mof, mof, [*mof, extra]):
        schema.load_repository(tmp_path, extra_mof=files, compile_fn=compile_fn)
    assert len(compiled) == 2  # the same files: cached; one more file: compiled again
    assert compiled[1][-1] == "TV_Extra.mof"
