"""Virtual Ethernet Switch (DSP1097) and Ethernet Port Resource Virtualization (DSP1050)
over CIM-XML: a real agent whose networking lives in a namespace the test created, a
switch made over REST, an appliance VM on one of its port groups, read with pywbem and
Debian's wbemcli (sblim)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, Uint16, WBEMConnection, WBEMServer

from thinvisor.cim.providers import network
from thinvisor.cim.providers.base import host_path, pool_path

from .agentenv import PASSWORD
from .netenv import NetAgent

pytestmark = pytest.mark.functional


def connection(agent: NetAgent, namespace: str = "root/cimv2") -> WBEMConnection:
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        os.environ.pop(var, None)  # requests prefers these over the CA file it is given
    return WBEMConnection(
        agent.cim_url,
        ("admin", PASSWORD),
        default_namespace=namespace,
        ca_certs=str(agent.cert),
        timeout=60,
    )


@pytest.fixture
def lan(net_agent: NetAgent) -> Iterator[dict[str, Any]]:
    """Switch ``lan`` (uplink ``up0``, port group ``pg`` on VLAN 10) and VM ``netvm``
    running with one NIC on ``pg``: the REST view of that NIC."""
    net_agent.netns.run("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p")
    with net_agent.client() as c:
        body = {"name": "lan", "uplink": "up0", "port_groups": [{"name": "pg", "vlan": 10}]}
        response = c.post("/networks/switches", json=body)
        assert response.status_code == 201, response.text
        net_agent.create_vm(c, "netvm", "pg")
        [nic] = c.get("/vms/netvm/nics").json()
        assert nic["tap"], nic
        yield nic


def the_vm(conn: WBEMConnection, name: str) -> CIMInstance:
    [vm] = [s for s in conn.EnumerateInstances("TV_ComputerSystem") if s["ElementName"] == name]
    return vm


def test_the_switch_is_a_computer_system_hosted_by_the_host(
    net_agent: NetAgent, lan: dict[str, Any]
) -> None:
    conn = connection(net_agent)
    switches = [
        s for s in conn.EnumerateInstances("CIM_ComputerSystem") if 5 in (s["Dedicated"] or [])
    ]
    assert [s["ElementName"] for s in switches] == ["lan"]
    [switch] = switches
    assert switch.path.classname == "TV_ComputerSystem"
    assert switch["Name"] == "thinvisor:switch:lan"
    assert switch["Dedicated"] == [5, 38] and switch["EnabledState"] == 2
    assert switch["OtherIdentifyingInfo"] == ["tvbr-lan"]
    assert conn.GetInstance(switch.path)["ElementName"] == "lan"
    hosted = conn.AssociatorNames(host_path(), AssocClass="TV_HostedDependency")
    assert network.switch_path("lan")["Name"] in {p["Name"] for p in hosted}
    # A switch is not powered over CIM.
    rc, _ = conn.InvokeMethod("RequestStateChange", switch.path, RequestedState=Uint16(3))
    assert rc == 1

    [settings] = conn.Associators(switch.path, AssocClass="CIM_SettingsDefineState")
    assert settings.classname == "TV_VirtualEthernetSwitchSettingData"
    assert settings["VLANConnection"] == ["10"]

    ports = conn.Associators(switch.path, AssocClass="TV_SystemDevice")
    by_id = {p["DeviceID"]: p for p in ports}
    assert set(by_id) == {"up0", lan["tap"]}
    tap = by_id[lan["tap"]]
    assert tap.classname == "TV_EthernetPort"
    assert tap["PVID"] == 10 and tap["EnabledState"] == 2
    assert tap["OtherIdentifyingInfo"] == ["pg", "netvm", lan["name"]]


def test_the_vm_nic_is_an_ethernet_port(net_agent: NetAgent, lan: dict[str, Any]) -> None:
    conn = connection(net_agent)
    vm = the_vm(conn, "netvm")
    [port] = conn.Associators(vm.path, AssocClass="TV_SystemDevice")
    assert port.classname == "TV_EthernetPort"
    assert port["SystemName"] == vm["Name"] and port["DeviceID"] == lan["name"]
    assert port["PermanentAddress"] == lan["mac"].replace(":", "").upper()
    assert (port["LinkTechnology"], port["EnabledState"]) == (2, 2)
    assert conn.GetInstance(port.path)["PermanentAddress"] == port["PermanentAddress"]

    missing = port.path.copy()
    missing.keybindings["DeviceID"] = "net99"
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetInstance(missing)
    assert exc.value.status_code == pywbem.CIM_ERR_NOT_FOUND

    [rasd] = conn.Associators(port.path, AssocClass="TV_SettingsDefineState")
    assert rasd.classname == "TV_EthernetPortAllocationSettingData"
    assert rasd["Connection"] == ["pg"] and rasd["Address"] == port["PermanentAddress"]
    [pool] = conn.AssociatorNames(port.path, AssocClass="TV_ElementAllocatedFromPool")
    assert pool["InstanceID"] == rasd["PoolID"] == pool_path("network")["InstanceID"]

    # The NIC is plugged into the switch through its TAP.
    [switch_port] = conn.Associators(port.path, AssocClass="TV_DeviceConnection")
    assert switch_port["DeviceID"] == lan["tap"]
    [switch] = conn.AssociatorNames(switch_port.path, AssocClass="TV_SystemDevice")
    assert switch["Name"] == "thinvisor:switch:lan"

    # Stopped: the port is disabled, and the switch has no port for it any more.
    with net_agent.client() as c:
        assert c.post("/vms/netvm/stop").status_code == 200
    assert conn.GetInstance(port.path)["EnabledState"] == 3
    assert conn.Associators(port.path, AssocClass="TV_DeviceConnection") == []
    ports = conn.AssociatorNames(network.switch_path("lan"), AssocClass="TV_SystemDevice")
    assert [p["DeviceID"] for p in ports] == ["up0"]


def test_the_profiles_are_registered(net_agent: NetAgent, lan: dict[str, Any]) -> None:
    server = WBEMServer(connection(net_agent))
    found = {(p["RegisteredName"], p["RegisteredVersion"]) for p in server.profiles}
    assert {
        ("Virtual Ethernet Switch", "1.0.0"),
        ("Ethernet Port Resource Virtualization", "1.0.0"),
    } <= found
    [switches] = server.get_selected_profiles("DMTF", "Virtual Ethernet Switch")
    centrals = server.get_central_instances(switches.path)
    assert [p["Name"] for p in centrals] == ["thinvisor:switch:lan"]
    [ports] = server.get_selected_profiles("DMTF", "Ethernet Port Resource Virtualization")
    centrals = server.get_central_instances(ports.path)
    assert [p["InstanceID"] for p in centrals] == [pool_path("network")["InstanceID"]]
    scoping = server.conn.AssociatorNames(
        ports.path, AssocClass="CIM_ReferencedProfile", ResultRole="Dependent"
    )
    assert [p["InstanceID"] for p in scoping] == ["thinvisor:DSP1042"]


def wbemcli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["wbemcli", "-noverify", *args], capture_output=True, check=False, text=True, timeout=60
    )


def test_sblim_wbemcli_lists_and_gets_the_ports(net_agent: NetAgent, lan: dict[str, Any]) -> None:
    assert shutil.which("wbemcli"), "make deps installs sblim-wbemcli"
    base = f"https://admin:{PASSWORD}@127.0.0.1:{net_agent.cim_port}"
    names = wbemcli("ein", f"{base}/root/cimv2:TV_EthernetPort")
    assert names.returncode == 0, names.stderr
    lines = names.stdout.strip().splitlines()
    assert len(lines) == 3, names.stdout  # the uplink, the TAP, the VM's NIC
    mac = lan["mac"].replace(":", "").upper()
    for line in lines:
        # wbemcli prints host:port/namespace:Class.keys; get each instance back.
        got = wbemcli("gi", f"{base}/{line.split('/', 1)[1]}")
        assert got.returncode == 0, got.stderr
        assert "LinkTechnology=2" in got.stdout
        if f'DeviceID="{lan["name"]}"' in line:
            assert f'PermanentAddress="{mac}"' in got.stdout


def test_a_host_without_switches_shows_none(net_agent: NetAgent) -> None:
    """A host without switches: VMs' ports still show, nothing else does."""
    with net_agent.client() as c:
        body = {"name": "lonely", "appliance": True, "memory_mib": 128}
        task = net_agent.wait_task(c, c.post("/vms", json=body))
        assert task["state"] == "success", task
    conn = connection(net_agent)
    vm = the_vm(conn, "lonely")
    ports = conn.Associators(vm.path, AssocClass="CIM_SystemDevice")
    assert all(p["EnabledState"] == 3 for p in ports)  # stopped
    systems = conn.EnumerateInstances("TV_ComputerSystem")
    assert not [s for s in systems if 5 in (s["Dedicated"] or [])]
    switch_path: CIMInstanceName = network.switch_path("nosuch")
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetInstance(switch_path)
    assert exc.value.status_code == pywbem.CIM_ERR_NOT_FOUND
