"""The DMTF profiles over CIM-XML: pywbem's ``WBEMServer`` finds the interop namespace,
the registered profiles and each profile's central instances on a real server.

The host's hardware comes from a fake /sys and /proc tree; one VM is created (no QEMU
runs) so that Virtual System has a central instance.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pywbem import (
    CIMDateTime,
    CIMInstance,
    CIMInstanceName,
    ValueMapping,
    WBEMConnection,
    WBEMServer,
)

from thinvisor.cim.provider import CIMV2, INTEROP, CimContext, InstanceProvider, Registry
from thinvisor.cim.providers import interop, logs
from thinvisor.cim.providers.base import (
    HOST_CLASS,
    POOL_KINDS,
    FunctionProvider,
    host_path,
    host_system,
    pool_path,
    vm_path,
)
from thinvisor.cim.providers.hardware import HostHardware, device_path, scan
from thinvisor.cim.schema import ClassRepository, load_repository
from thinvisor.cim.server import create_cim_app
from thinvisor.host.agent import HostAgent
from thinvisor.model.vm import VmSpec

from .cimenv import TEST_CACHE, Served, connect, make_agent, temp_config

pytestmark = pytest.mark.functional

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz
cpu MHz\t\t: 2394.454

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz
cpu MHz\t\t: 2394.454
"""

SYSFS = {
    "class/hwmon/hwmon0/name": "coretemp",
    "class/hwmon/hwmon0/temp1_input": "45000",
    "class/hwmon/hwmon0/temp1_label": "Package id 0",
    "class/hwmon/hwmon0/temp1_max": "80000",
    "class/hwmon/hwmon0/temp1_crit": "100000",
    "class/hwmon/hwmon0/temp2_input": "85000",
    "class/hwmon/hwmon0/temp2_max": "80000",
    "class/hwmon/hwmon1/name": "nct6775",
    "class/hwmon/hwmon1/fan1_input": "1200",
    "class/hwmon/hwmon1/fan1_label": "CPU fan",
    "class/thermal/thermal_zone0/temp": "42000",
    "class/thermal/thermal_zone0/type": "x86_pkg_temp",
    "class/thermal/thermal_zone0/trip_point_0_type": "critical",
    "class/thermal/thermal_zone0/trip_point_0_temp": "105000",
    "class/power_supply/AC/type": "Mains",
    "class/power_supply/AC/online": "1",
    "class/power_supply/BAT0/type": "Battery",
    "devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq": "3300000",
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.fixture(scope="module")
def hardware(tmp_path_factory: pytest.TempPathFactory) -> HostHardware:
    root = tmp_path_factory.mktemp("hw")
    sys_root = write_tree(root / "sys", SYSFS)
    proc = write_tree(root / "proc", {"cpuinfo": CPUINFO, "meminfo": "MemTotal: 8192000 kB"})
    return HostHardware(sys_root, proc)


@pytest.fixture(scope="module")
def repository() -> ClassRepository:
    return load_repository(TEST_CACHE)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostAgent]:
    agent = make_agent(temp_config(tmp_path_factory.mktemp("cim-profiles")))
    asyncio.run(agent.service.create_vm(VmSpec(name="demo")))
    agent.events.emit("test.hello", "hello from the profile tests", object="vm/demo")
    yield agent
    agent.events.close()


async def _host_only(ctx: CimContext) -> list[CIMInstance]:
    return [host_system(ctx.repository)]


def virtualization_providers() -> list[InstanceProvider]:
    """The virtualization module's providers if it is there; else the host alone."""
    try:
        module = importlib.import_module("thinvisor.cim.providers.virtualization")
    except ImportError:
        return [FunctionProvider(HOST_CLASS, CIMV2, _host_only)]
    found: list[InstanceProvider] = module.providers()
    return found


@pytest.fixture(scope="module")
def url(agent: HostAgent, repository: ClassRepository, hardware: HostHardware) -> Iterator[str]:
    registry = Registry(
        [
            *interop.providers(hardware),
            *hardware.providers(),
            *logs.providers(),
            *virtualization_providers(),
        ]
    )
    served = Served(create_cim_app(agent, repository, registry))
    yield f"http://127.0.0.1:{served.port}"
    served.close()


@pytest.fixture
def conn(url: str) -> Iterator[WBEMConnection]:
    c = connect(url)
    yield c
    c.close()


@pytest.fixture
def server(conn: WBEMConnection) -> WBEMServer:
    return WBEMServer(conn)


def keys(paths: list[CIMInstanceName]) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Paths as comparable values: class and keys, without host or namespace."""
    return {
        (p.classname.lower(), tuple(sorted((k.lower(), str(v)) for k, v in p.keybindings.items())))
        for p in paths
    }


# Profile Registration


def test_interop_namespace_and_namespaces(server: WBEMServer) -> None:
    assert server.interop_ns == INTEROP
    assert {INTEROP, CIMV2} <= set(server.namespaces)


def test_registered_profiles(server: WBEMServer) -> None:
    found = {(p["RegisteredName"], p["RegisteredVersion"]) for p in server.profiles}
    assert found == {(p.name, p.version) for p in interop.PROFILES}
    assert len({p["InstanceID"] for p in server.profiles}) == len(interop.PROFILES)
    base = server.get_selected_profiles(registered_org="DMTF", registered_name="Base Server")
    assert [p["RegisteredVersion"] for p in base] == ["1.0.0"]


def test_registered_organization_value_mapping(server: WBEMServer) -> None:
    mapping = ValueMapping.for_property(
        server, INTEROP, "CIM_RegisteredProfile", "RegisteredOrganization"
    )
    assert mapping.tovalues(2) == "DMTF"


def test_object_manager(server: WBEMServer) -> None:
    assert server.cimom_inst.classname == "TV_ObjectManager"
    assert server.cimom_inst["ElementName"] == "thinvisor"


def expected_centrals(agent: HostAgent, hardware: HostHardware) -> dict[str, list[CIMInstanceName]]:
    hw = scan(hardware.sys_root, hardware.proc_root)
    vms = asyncio.run(agent.service.list_vms())
    sensors = [device_path("TV_NumericSensor", s.device_id) for s in hw.sensors]
    return {
        "Profile Registration": [interop.object_manager_path()],
        "Base Server": [host_path()],
        "Computer System": [host_path()],
        "System Virtualization": [host_path()],
        "CPU": [device_path("TV_Processor", f"cpu{c.index}") for c in hw.cpus],
        "System Memory": [device_path("TV_Memory", "memory")],
        "Sensors": sensors,
        "Fan": [device_path("TV_Fan", str(s.fan)) for s in hw.fans],
        "Power Supply": [device_path("TV_PowerSupply", p.device_id) for p in hw.power_supplies],
        "Record Log": [logs.log_path()],
        "Virtual System": [vm_path(vm.spec.uuid) for vm in vms if vm.spec],
        "Resource Allocation": [pool_path(kind) for kind in POOL_KINDS],
    }


# Each profile's central class and scoping, as pywbem's documentation spells them.
SCOPING: dict[str, dict[str, Any]] = {
    "CPU": {"central_class": "CIM_Processor", "scoping_path": ["CIM_SystemDevice"]},
    "System Memory": {"central_class": "CIM_Memory", "scoping_path": ["CIM_SystemDevice"]},
    "Fan": {"central_class": "CIM_Fan", "scoping_path": ["CIM_SystemDevice"]},
    "Power Supply": {"central_class": "CIM_PowerSupply", "scoping_path": ["CIM_SystemDevice"]},
    "Sensors": {"central_class": "CIM_Sensor", "scoping_path": ["CIM_SystemDevice"]},
    "Record Log": {"central_class": "CIM_RecordLog", "scoping_path": ["CIM_UseOfLog"]},
}


@pytest.mark.parametrize("profile", interop.PROFILES, ids=lambda p: p.name)
def test_central_instances(
    server: WBEMServer, agent: HostAgent, hardware: HostHardware, profile: interop.Profile
) -> None:
    [path] = server.get_selected_profiles("DMTF", profile.name, profile.version)
    scoping = SCOPING.get(profile.name, {})
    if scoping:
        scoping = {**scoping, "scoping_class": "CIM_ComputerSystem"}
    found = server.get_central_instances(path.path, **scoping)
    expected = expected_centrals(agent, hardware)[profile.name]
    assert expected, profile.name  # the fake tree has at least one of everything
    assert keys(found) == keys(expected)


@pytest.mark.parametrize("profile", interop.PROFILES, ids=lambda p: p.name)
def test_central_instances_exist(conn: WBEMConnection, profile: interop.Profile) -> None:
    paths = conn.AssociatorNames(profile.path, AssocClass="CIM_ElementConformsToProfile")
    found = conn.Associators(profile.path, AssocClass="CIM_ElementConformsToProfile")
    assert keys([i.path for i in found]) == keys(paths)  # no dangling references


def test_component_profiles_reference_their_scoping_profile(conn: WBEMConnection) -> None:
    for scoping, components in interop.REFERENCES.items():
        for component in components:
            found = conn.AssociatorNames(
                component.path, AssocClass="CIM_ReferencedProfile", ResultRole="Dependent"
            )
            assert keys(found) == keys([scoping.path])


# Hardware


def test_system_devices_of_the_host(conn: WBEMConnection, hardware: HostHardware) -> None:
    hw = scan(hardware.sys_root, hardware.proc_root)
    devices = conn.Associators(host_path(), AssocClass="CIM_SystemDevice")
    classes = sorted(d.classname for d in devices)
    assert classes.count("TV_Processor") == len(hw.cpus) == 2
    assert classes.count("TV_Memory") == 1
    assert classes.count("TV_NumericSensor") == len(hw.sensors) == 4
    assert classes.count("TV_Fan") == classes.count("TV_PowerSupply") == 1
    cpus = conn.Associators(host_path(), AssocClass="CIM_SystemDevice", ResultClass="CIM_Processor")
    assert {c["DeviceID"] for c in cpus} == {"cpu0", "cpu1"}
    assert {c["MaxClockSpeed"] for c in cpus} == {3300, 2400}  # cpufreq, else the model name
    [memory] = conn.EnumerateInstances("CIM_Memory")
    assert memory["NumberOfBlocks"] * memory["BlockSize"] == 8192000 * 1024


def test_sensors(conn: WBEMConnection) -> None:
    sensors = {s["DeviceID"]: s for s in conn.EnumerateInstances("CIM_NumericSensor")}
    package = sensors["hwmon:hwmon0:temp1"]
    assert package["ElementName"] == "Package id 0"
    assert (package["SensorType"], package["BaseUnits"], package["UnitModifier"]) == (2, 2, -3)
    assert package["CurrentReading"] == 45000 and package["HealthState"] == 5
    assert package["UpperThresholdCritical"] == 100000
    assert sensors["hwmon:hwmon0:temp2"]["HealthState"] == 10  # above its max
    assert sensors["thermal:thermal_zone0"]["UpperThresholdCritical"] == 105000
    fan_tach = sensors["hwmon:hwmon1:fan1"]
    assert (fan_tach["SensorType"], fan_tach["BaseUnits"], fan_tach["CurrentReading"]) == (
        5,
        19,
        1200,
    )
    [fan] = conn.Associators(fan_tach.path, AssocClass="CIM_AssociatedSensor")
    assert fan.classname == "TV_Fan" and fan["ElementName"] == "CPU fan"


def test_empty_sysfs_has_no_sensors(tmp_path: Path) -> None:
    hw = scan(tmp_path / "sys", tmp_path / "proc")
    assert not hw.sensors and not hw.fans and not hw.power_supplies
    assert hw.cpus  # counted even without /proc/cpuinfo


# Record Log


def test_log_entries_are_the_agents_events(conn: WBEMConnection, agent: HostAgent) -> None:
    events = agent.events.list(limit=logs.MAX_RECORDS)
    entries = conn.EnumerateInstances("CIM_LogEntry")
    assert [e["MessageID"] for e in entries] == [e.kind for e in events]
    hello = next(e for e in entries if e["MessageID"] == "test.hello")
    assert hello["Message"] == "hello from the profile tests"
    assert isinstance(hello["CreationTimeStamp"], CIMDateTime)
    assert "vm.created" in {e["MessageID"] for e in entries}
    [log] = conn.EnumerateInstances("CIM_RecordLog")
    assert log["CurrentNumberOfRecords"] == len(events)
    records = conn.AssociatorNames(log.path, AssocClass="CIM_LogManagesRecord")
    assert keys(records) == keys([e.path for e in entries])
    [used] = conn.AssociatorNames(host_path(), AssocClass="CIM_UseOfLog")
    assert keys([used]) == keys([logs.log_path()])
