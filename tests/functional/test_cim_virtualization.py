"""DSP1042/DSP1057/DSP1041 over CIM-XML: an appliance VM defined, powered and destroyed
with pywbem's ``WBEMConnection`` only (no REST, no service calls)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, Uint16, Uint64, WBEMConnection

from thinvisor.cim.providers import virtualization
from thinvisor.cim.providers.base import host_path

from .cimenv import READER, connect, served_agent
from .hostenv import TestHost

pytestmark = pytest.mark.functional

VSMS = "TV_VirtualSystemManagementService"


@pytest.fixture
def url(host: TestHost) -> Iterator[str]:
    with served_agent(host.config) as served:
        yield served


def vsms(conn: WBEMConnection) -> CIMInstanceName:
    [path] = conn.EnumerateInstanceNames(VSMS)
    return path


def appliance_settings(name: str) -> tuple[CIMInstance, list[CIMInstance]]:
    system = CIMInstance(
        "CIM_VirtualSystemSettingData",
        {"ElementName": name, "VirtualSystemType": "DMTF:thinvisor:appliance"},
    )
    memory = CIMInstance(
        "CIM_ResourceAllocationSettingData",
        {"ResourceType": Uint16(4), "VirtualQuantity": Uint64(128), "AllocationUnits": "byte*2^20"},
    )
    cpu = CIMInstance(
        "CIM_ResourceAllocationSettingData",
        {"ResourceType": Uint16(3), "VirtualQuantity": Uint64(1), "AllocationUnits": "count"},
    )
    return system, [memory, cpu]


def define(conn: WBEMConnection, name: str) -> CIMInstanceName:
    system, resources = appliance_settings(name)
    rc, out = conn.InvokeMethod(
        "DefineSystem", vsms(conn), SystemSettings=system, ResourceSettings=resources
    )
    assert rc == 0
    vm: CIMInstanceName = out["ResultingSystem"]
    return vm


def change_state(conn: WBEMConnection, vm: CIMInstanceName, state: int) -> tuple[int, Any]:
    rc, out = conn.InvokeMethod("RequestStateChange", vm, RequestedState=Uint16(state))
    return int(rc), out


def wait_job(conn: WBEMConnection, job: CIMInstanceName, timeout: float = 120) -> CIMInstance:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inst = conn.GetInstance(job)
        if inst["JobState"] in (7, 10):
            return inst
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not finish")


def enabled_state(conn: WBEMConnection, vm: CIMInstanceName) -> int:
    return int(conn.GetInstance(vm)["EnabledState"])


def test_define_power_and_destroy(host: TestHost, url: str) -> None:
    conn = connect(url)
    vm = define(conn, "cimvm")
    inst = conn.GetInstance(vm)
    assert inst["ElementName"] == "cimvm" and inst["EnabledState"] == 3

    assert change_state(conn, vm, 9)[0] == 4097  # a stopped VM cannot pause
    assert change_state(conn, vm, 2)[0] == 0
    host.wait_ready("cimvm")
    assert enabled_state(conn, vm) == 2

    assert change_state(conn, vm, 9)[0] == 0
    assert enabled_state(conn, vm) == 9
    assert change_state(conn, vm, 2)[0] == 0
    assert enabled_state(conn, vm) == 2

    # DestroySystem refuses a running VM: nothing is done.
    with pytest.raises(pywbem.CIMError):
        conn.InvokeMethod("DestroySystem", vsms(conn), AffectedSystem=vm)

    assert change_state(conn, vm, 3)[0] == 0
    assert enabled_state(conn, vm) == 3
    assert change_state(conn, vm, 3)[0] == 4097  # already off

    rc, _ = conn.InvokeMethod("DestroySystem", vsms(conn), AffectedSystem=vm)
    assert rc == 0
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetInstance(vm)
    assert exc.value.status_code == pywbem.CIM_ERR_NOT_FOUND


def test_suspend_is_a_job(host: TestHost, url: str) -> None:
    conn = connect(url)
    vm = define(conn, "jobvm")
    assert change_state(conn, vm, 2)[0] == 0
    host.wait_ready("jobvm")
    rc, out = change_state(conn, vm, 6)
    assert rc == 4096
    job = wait_job(conn, out["Job"])
    assert job["JobState"] == 7 and job["PercentComplete"] == 100
    assert enabled_state(conn, vm) == 6
    affected = conn.AssociatorNames(out["Job"], AssocClass="CIM_AffectedJobElement")
    assert [p["Name"] for p in affected] == [vm["Name"]]
    rc, out = change_state(conn, vm, 2)  # restored from disk: a job too
    assert rc == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
    assert enabled_state(conn, vm) == 2
    assert change_state(conn, vm, 3)[0] == 0


def test_associations(url: str) -> None:
    conn = connect(url)
    vm = define(conn, "assocvm")
    hosted = conn.Associators(
        host_path(), AssocClass="CIM_HostedDependency", ResultClass="CIM_ComputerSystem"
    )
    assert [i["ElementName"] for i in hosted] == ["assocvm"]
    assert change_state(conn, host_path(), 3)[0] == 1  # the host is not powered over CIM

    [settings] = conn.Associators(vm, AssocClass="CIM_SettingsDefineState")
    assert settings.classname == "TV_VirtualSystemSettingData"
    assert settings["VirtualSystemIdentifier"] == "assocvm"
    rasds = conn.Associators(settings.path, AssocClass="CIM_VirtualSystemSettingDataComponent")
    by_type = {int(r["ResourceType"]): r for r in rasds}
    assert by_type[3]["VirtualQuantity"] == 1
    assert by_type[4]["VirtualQuantity"] == 128
    assert by_type[4]["AllocationUnits"] == "byte*2^20"

    pools = conn.Associators(host_path(), AssocClass="CIM_HostedResourcePool")
    assert {p["InstanceID"] for p in pools} >= {"thinvisor:pool:processor", "thinvisor:pool:memory"}
    memory_pool = next(p for p in pools if p["ResourceType"] == 4)
    allocated = conn.AssociatorNames(memory_pool.path, AssocClass="CIM_ResourceAllocationFromPool")
    assert by_type[4].path["InstanceID"] in {p["InstanceID"] for p in allocated}
    # The host hosts the snapshot service too.
    [service] = conn.Associators(host_path(), AssocClass="CIM_HostedService", ResultClass=VSMS)
    caps = conn.Associators(service.path, AssocClass="CIM_ElementCapabilities")
    assert caps[0].classname == "TV_VirtualSystemManagementCapabilities"

    # A disk added and removed through the VSMS.
    disk = CIMInstance(
        "CIM_StorageAllocationSettingData",
        {"ResourceType": Uint16(31), "VirtualQuantity": Uint64(16), "AllocationUnits": "byte*2^20"},
    )
    rc, out = conn.InvokeMethod(
        "AddResourceSettings",
        vsms(conn),
        AffectedConfiguration=settings.path,
        ResourceSettings=[disk],
    )
    assert rc == 0
    [added] = out["ResultingResourceSettings"]
    assert conn.GetInstance(added)["HostResource"][0].endswith(".qcow2")
    rc, _ = conn.InvokeMethod("RemoveResourceSettings", vsms(conn), ResourceSettings=[added])
    assert rc == 0
    nic = CIMInstance("CIM_EthernetPortAllocationSettingData", {"ResourceType": Uint16(10)})
    rc, _ = conn.InvokeMethod(
        "AddResourceSettings",
        vsms(conn),
        AffectedConfiguration=settings.path,
        ResourceSettings=[nic],
    )
    assert rc == 1  # NIC hot-add: not supported (yet)


def test_read_only_user_cannot_define(url: str) -> None:
    reader = connect(url, READER)
    system, resources = appliance_settings("nope")
    with pytest.raises(pywbem.CIMError) as exc:
        reader.InvokeMethod(
            "DefineSystem", vsms(reader), SystemSettings=system, ResourceSettings=resources
        )
    assert exc.value.status_code == pywbem.CIM_ERR_ACCESS_DENIED
    assert reader.EnumerateInstances("TV_VirtualSystemSettingData") == []


def test_define_from_strings_and_modify(url: str) -> None:
    """Settings sent as plain CIM-XML strings (as wbemcli does) define a VM too; its
    settings and resources then change through the VSMS."""
    conn = connect(url)
    system, resources = appliance_settings("strvm")
    nic = CIMInstance(
        "CIM_EthernetPortAllocationSettingData",
        {"ResourceType": Uint16(10), "Address": "02747600AB01", "Connection": ["user"]},
    )
    rc, out = conn.InvokeMethod(
        "DefineSystem",
        vsms(conn),
        SystemSettings=system.tocimxmlstr(),
        ResourceSettings=[r.tocimxmlstr() for r in [*resources, nic]],
    )
    assert rc == 0
    vm = out["ResultingSystem"]
    [settings] = conn.Associators(vm, AssocClass="CIM_ElementSettingData")
    rasds = conn.Associators(settings.path, AssocClass="CIM_VirtualSystemSettingDataComponent")
    [port] = [r for r in rasds if r["ResourceType"] == 10]
    assert port.classname == "TV_EthernetPortAllocationSettingData"
    assert port["Address"] == "02747600AB01" and port["Connection"] == ["user"]

    changed = CIMInstance(
        "CIM_VirtualSystemSettingData",
        {"InstanceID": settings["InstanceID"], "AutomaticStartupAction": Uint16(4)},
    )
    rc, _ = conn.InvokeMethod("ModifySystemSettings", vsms(conn), SystemSettings=changed)
    assert rc == 0
    assert conn.GetInstance(settings.path)["AutomaticStartupAction"] == 4

    [memory] = [r for r in rasds if r["ResourceType"] == 4]
    memory["VirtualQuantity"] = Uint64(192)
    rc, out = conn.InvokeMethod("ModifyResourceSettings", vsms(conn), ResourceSettings=[memory])
    assert rc == 0 and conn.GetInstance(memory.path)["VirtualQuantity"] == 192

    bad = CIMInstance("CIM_ResourceAllocationSettingData", {"ResourceType": Uint16(4)})
    rc, _ = conn.InvokeMethod(
        "DefineSystem", vsms(conn), SystemSettings=system, ResourceSettings=[bad]
    )
    assert rc == 4  # Invalid Parameter: memory without a quantity


def test_every_instance_is_found_by_its_path(url: str) -> None:
    conn = connect(url)
    vm = define(conn, "pathvm")
    assert change_state(conn, vm, 2)[0] == 0
    for provider in virtualization.providers():
        for inst in conn.EnumerateInstances(provider.classname):
            assert conn.GetInstance(inst.path).path == inst.path
    assert change_state(conn, vm, 3)[0] == 0
