"""Base Metrics (DSP1053) over CIM-XML from a real agent sampling every second: an
appliance VM runs, and pywbem and Debian's wbemcli (sblim) read its CPU among the metric
values; its values go when it stops."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest
from pywbem import CIMDateTime, CIMInstance, CIMInstanceName, WBEMConnection, WBEMServer

from .agentenv import PASSWORD, TestAgent
from .test_api import create_appliance_vm
from .test_cim_clients import connection

pytestmark = pytest.mark.functional

VM_NAME = "metered"
CPU = "thinvisor:vm:cpu_percent"


@pytest.fixture
def agent(sampling_agent: TestAgent) -> TestAgent:
    return sampling_agent


def vm_system(conn: WBEMConnection, name: str) -> CIMInstanceName:
    """The VM's ``TV_ComputerSystem``, as the virtualization provider names it."""
    [vm] = [s for s in conn.EnumerateInstances("TV_ComputerSystem") if s["ElementName"] == name]
    path: CIMInstanceName = vm.path
    return path


def values_of(conn: WBEMConnection, name: str) -> dict[str, CIMInstance]:
    """The metric values measured on ``name``, by their definition's Id."""
    return {
        str(v["MetricDefinitionId"]): v
        for v in conn.EnumerateInstances("CIM_BaseMetricValue")
        if v["MeasuredElementName"] == name
    }


def wait_value(conn: WBEMConnection, name: str, metric: str, timeout: float = 30) -> CIMInstance:
    """The value of ``metric`` for ``name``, once the sampler has it (two samples for a rate)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = values_of(conn, name).get(metric)
        if found is not None:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no value of {metric} for {name}")


def wbemcli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["wbemcli", "-noverify", *args], capture_output=True, check=False, text=True, timeout=60
    )


def test_a_running_vm_has_its_metrics_over_cim(agent: TestAgent) -> None:
    with agent.client() as c:
        create_appliance_vm(agent, c, VM_NAME, vcpus=1)
        assert c.post(f"/vms/{VM_NAME}/start").status_code == 200
    conn = connection(agent)
    vm = vm_system(conn, VM_NAME)

    cpu = wait_value(conn, VM_NAME, CPU)
    assert cpu.classname == "TV_BaseMetricValue"
    assert cpu["InstanceID"] == f"thinvisor:{vm['Name']}:metric:cpu_percent"
    assert float(cpu["MetricValue"]) >= 0 and cpu["Volatile"] is True
    assert cpu["Duration"] == CIMDateTime(timedelta(seconds=1))
    stamp = cpu["TimeStamp"].datetime
    assert abs(datetime.now(UTC) - stamp) < timedelta(seconds=30)
    assert values_of(conn, VM_NAME)["thinvisor:vm:memory_resident_bytes"]["MetricValue"] != "0"
    host_values = {v["MetricDefinitionId"] for v in conn.EnumerateInstances("TV_BaseMetricValue")}
    assert "thinvisor:host:memory_used_bytes" in host_values

    # From the VM to its values, and from a value to its definition.
    mine = conn.Associators(vm, AssocClass="CIM_MetricForME")
    assert CPU in {v["MetricDefinitionId"] for v in mine}
    assert {v["MeasuredElementName"] for v in mine} == {VM_NAME}
    [definition] = conn.Associators(cpu.path, AssocClass="CIM_MetricInstance")
    assert (definition["Id"], definition["Units"]) == (CPU, "Percent")
    defined = conn.AssociatorNames(vm, AssocClass="CIM_MetricDefForME")
    assert len(defined) == 9 and CPU in {d["Id"] for d in defined}

    # The profile is registered; its central instances are the definitions.
    server = WBEMServer(connection(agent, "root/interop"))
    [profile] = server.get_selected_profiles("DMTF", "Base Metrics")
    centrals = server.get_central_instances(profile.path)
    assert CPU in {d["Id"] for d in centrals} and len(centrals) == 13

    assert shutil.which("wbemcli"), "make deps installs sblim-wbemcli"
    base = f"https://admin:{PASSWORD}@127.0.0.1:{agent.cim_port}/root/cimv2"
    listed = wbemcli("ei", f"{base}:CIM_BaseMetricValue")
    assert listed.returncode == 0, listed.stderr
    [line] = [s for s in listed.stdout.splitlines() if str(cpu["InstanceID"]) in s.split(" ")[0]]
    assert f'MetricDefinitionId="{CPU}"' in line and "MetricValue=" in line

    # A VM that does not run has no values.
    with agent.client() as c:
        assert c.post(f"/vms/{VM_NAME}/stop").status_code == 200
    assert values_of(conn, VM_NAME) == {}
    assert conn.Associators(vm, AssocClass="CIM_MetricForME") == []
    assert len(conn.AssociatorNames(vm, AssocClass="CIM_MetricDefForME")) == 9
