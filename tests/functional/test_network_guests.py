"""Guests that really talk: appliance VMs on thinvisor's switches, driven over the REST
API of a real agent whose networking lives in a namespace the test created.

Commands are typed on the guests' serial consoles and their answers read back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

import pytest

from .netenv import NetAgent

pytestmark = pytest.mark.functional

LOSS = re.compile(r"(\d+)% packet loss")


def _static(agent: NetAgent, vm: str, address: str) -> None:
    """Stop the appliance's DHCP client and give eth0 a fixed address."""
    console = agent.console(vm)
    console.run("kill $(pidof udhcpc) 2>/dev/null; ip -4 addr flush dev eth0")
    console.run(f"ip addr add {address} dev eth0 && ip link set eth0 up")


def _ping(agent: NetAgent, vm: str, address: str, count: int = 3) -> int:
    """The packet loss in percent of ``count`` pings from ``vm`` to ``address``."""
    out = agent.console(vm).run(f"ping -c {count} -W 2 {address}", timeout=60)
    match = LOSS.search(out)
    assert match, out
    return int(match.group(1))


def _reaches(agent: NetAgent, vm: str, address: str) -> bool:
    # The first packets may go while the bridge still learns: a few tries.
    return any(_ping(agent, vm, address) < 100 for _ in range(3))


def _switch(c: Any, name: str, *groups: tuple[str, int], **extra: Any) -> dict[str, Any]:
    body = {"name": name, "port_groups": [{"name": g, "vlan": v} for g, v in groups], **extra}
    response = c.post("/networks/switches", json=body)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def _taps(agent: NetAgent) -> list[str]:
    links = agent.netns.links()
    return sorted(n for n, v in links.items() if v.get("linkinfo", {}).get("info_kind") == "tun")


def test_two_vms_on_one_port_group_ping_each_other(net_agent: NetAgent) -> None:
    with net_agent.client() as c:
        switch = _switch(c, "lan", ("vms", 0))
        assert switch["present"]
        net_agent.create_vm(c, "a", "vms")
        net_agent.create_vm(c, "b", "vms")
        net_agent.wait_ready("a", "b")
        _static(net_agent, "a", "10.50.0.1/24")
        _static(net_agent, "b", "10.50.0.2/24")
        assert _reaches(net_agent, "a", "10.50.0.2")
        assert _reaches(net_agent, "b", "10.50.0.1")
        # Each NIC is one TAP on the switch's bridge, named after the VM and the NIC.
        nics = {vm: c.get(f"/vms/{vm}/nics").json() for vm in ("a", "b")}
        taps = sorted(n[0]["tap"] for n in nics.values())
        assert _taps(net_agent) == taps
        links = net_agent.netns.links()
        assert {links[t]["master"] for t in taps} == {"tvbr-lan"}
        ports = c.get("/networks/portgroups/vms").json()["ports"]
        assert sorted(p["tap"] for p in ports) == taps
        # A switch in use cannot go; stopping the VMs removes their TAPs.
        refused = c.delete("/networks/switches/lan")
        assert refused.status_code == 409, refused.text
        for vm in ("a", "b"):
            assert c.post(f"/vms/{vm}/stop").status_code == 200
        assert _taps(net_agent) == []


def test_vlans_keep_port_groups_apart(net_agent: NetAgent) -> None:
    with net_agent.client() as c:
        _switch(c, "vl", ("red", 10), ("red2", 10), ("blue", 20))
        net_agent.create_vm(c, "r1", "red")
        net_agent.create_vm(c, "r2", "red2")
        net_agent.create_vm(c, "b1", "blue")
        net_agent.wait_ready("r1", "r2", "b1")
        for vm, address in (("r1", "10.60.0.1/24"), ("r2", "10.60.0.2/24"), ("b1", "10.60.0.3/24")):
            _static(net_agent, vm, address)
        # Same VLAN id on two port groups: one segment.
        assert _reaches(net_agent, "r1", "10.60.0.2")
        # Different VLAN ids: nothing gets through, either way.
        assert _ping(net_agent, "r1", "10.60.0.3") == 100
        assert _ping(net_agent, "b1", "10.60.0.2") == 100
        # Moving blue to VLAN 10 joins it to red at once, running guests and all.
        moved = c.patch("/networks/portgroups/blue", json={"vlan": 10})
        assert moved.status_code == 200, moved.text
        assert _reaches(net_agent, "b1", "10.60.0.1")


def _dhcp_address(agent: NetAgent, vm: str, prefix: str) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        out = agent.console(vm).run("ip -4 -o addr show dev eth0")
        match = re.search(rf"inet ({re.escape(prefix)}\d+)/24", out)
        if match:
            return match.group(1)
        time.sleep(2)
    raise AssertionError(f"{vm} got no DHCP address on {prefix}0/24")


def test_nat_network_gives_dhcp_and_reaches_the_host(net_agent: NetAgent) -> None:
    with net_agent.client() as c:
        switch = _switch(c, "default", ("default", 0), nat={"address": "10.70.0.1/24"})
        assert switch["dhcp"]["pid"] > 0
        net_agent.create_vm(c, "n1", "default")
        net_agent.wait_ready("n1")
        address = _dhcp_address(net_agent, "n1", "10.70.0.")
        assert _reaches(net_agent, "n1", "10.70.0.1")
        route = net_agent.console("n1").run("ip route show default")
        assert "via 10.70.0.1" in route
        # The agent shows the lease, on the switch and on the NIC.
        leases = c.get("/networks/switches/default").json()["dhcp"]["leases"]
        nic = c.get("/vms/n1/nics").json()[0]
        assert {(lease["mac"], lease["ip"]) for lease in leases} == {(nic["mac"], address)}
        assert nic["ip"] == address
        # Masquerading out of the host is set up in the namespace's nftables.
        ruleset = net_agent.netns.run("nft", "list", "ruleset").stdout
        assert "masquerade" in ruleset and "10.70.0.0/24" in ruleset
        assert net_agent.netns.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"


def _tc(agent: NetAgent, *args: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(agent.netns.run("tc", "-j", *args).stdout)
    return data


def _htb_rates(agent: NetAgent, tap: str) -> tuple[str, str]:
    """The rate and ceiling of the TAP's htb class (tc prints htb classes as text only)."""
    out = agent.netns.run("tc", "class", "show", "dev", tap).stdout
    match = re.search(r"class htb \S+ .*?rate (\S+) ceil (\S+)", out)
    assert match, out
    return match.group(1), match.group(2)


def test_shaping_shows_in_the_taps_tc_configuration(net_agent: NetAgent) -> None:
    with net_agent.client() as c:
        _switch(c, "lan", ("vms", 0))
        shaping = {
            "inbound": {"average_kbps": 1000, "peak_kbps": 2000, "burst_kib": 64},
            "outbound": {"average_kbps": 500},
        }
        body = {"name": "s1", "appliance": True, "memory_mib": 128,
                "nics": [{"network": "vms", "shaping": shaping}]}  # fmt: skip
        assert net_agent.wait_task(c, c.post("/vms", json=body))["state"] == "success"
        assert c.post("/vms/s1/start").status_code == 200
        tap = c.get("/vms/s1/nics").json()[0]["tap"]
        assert _htb_rates(net_agent, tap) == ("1Mbit", "2Mbit")
        qdiscs = {q["kind"] for q in _tc(net_agent, "qdisc", "show", "dev", tap)}
        assert {"htb", "ingress"} <= qdiscs
        # Changed on the running VM: the kernel follows.
        faster = {"inbound": {"average_kbps": 8000}}
        response = c.patch(f"/vms/s1/nics/{c.get('/vms/s1/nics').json()[0]['name']}",
                           json={"shaping": faster})  # fmt: skip
        assert response.status_code == 200, response.text
        assert _htb_rates(net_agent, tap) == ("8Mbit", "8Mbit")
        assert "ingress" not in {q["kind"] for q in _tc(net_agent, "qdisc", "show", "dev", tap)}


def test_nic_hotplug_and_cable(net_agent: NetAgent) -> None:
    with net_agent.client() as c:
        _switch(c, "lan", ("vms", 0))
        net_agent.create_vm(c, "h1", "vms")
        net_agent.wait_ready("h1")
        console = net_agent.console("h1")
        assert console.run("cat /sys/class/net/eth0/carrier").strip() == "1"
        assert c.patch("/vms/h1/nics/net0", json={"connected": False}).status_code == 200
        assert console.run("cat /sys/class/net/eth0/carrier").strip() == "0"
        assert c.patch("/vms/h1/nics/net0", json={"connected": True}).status_code == 200
        assert console.run("cat /sys/class/net/eth0/carrier").strip() == "1"
        added = c.post("/vms/h1/nics", json={"network": "vms"})
        assert added.status_code == 201, added.text
        nic = added.json()
        deadline = time.monotonic() + 60
        while "eth1" not in console.run("ls /sys/class/net"):
            assert time.monotonic() < deadline, "the hot-added NIC did not appear"
            time.sleep(1)
        mac = console.run("cat /sys/class/net/eth1/address").strip()
        assert mac == nic["mac"]
        assert len(_taps(net_agent)) == 2
        removed = c.delete(f"/vms/h1/nics/{nic['name']}")
        assert removed.status_code == 204, removed.text
        assert "eth1" not in console.run("ls /sys/class/net")
        assert len(_taps(net_agent)) == 1


def test_agent_killed_and_restarted_leaks_nothing(net_agent: NetAgent) -> None:
    with net_agent.client() as c:
        switch = _switch(c, "default", ("default", 0), ("red", 10), nat={"address": "10.80.0.1/24"})
        net_agent.create_vm(c, "k1", "default", "red")
        net_agent.create_vm(c, "k2", "default")
        net_agent.wait_ready("k1", "k2")
        address = _dhcp_address(net_agent, "k2", "10.80.0.")
        taps = _taps(net_agent)
        dnsmasq = switch["dhcp"]["pid"]
    assert len(taps) == 3
    assert net_agent.proc is not None
    os.kill(net_agent.proc.pid, signal.SIGKILL)
    net_agent.proc.wait()
    net_agent.proc = None
    net_agent.start()
    with net_agent.client() as c:
        # Same TAPs, none twice, none left over; the same dnsmasq, re-adopted.
        assert _taps(net_agent) == taps
        assert c.get("/networks/switches/default").json()["dhcp"]["pid"] == dnsmasq
        dnsmasqs = [p for p in net_agent.netns.pids() if _comm(p) == "dnsmasq"]
        assert dnsmasqs == [dnsmasq]
        # Guests still connected: k1 reaches k2 and the host through the NAT switch.
        net_agent.console("k1").run("kill $(pidof udhcpc) 2>/dev/null; true")
        _static(net_agent, "k1", "10.80.0.250/24")
        assert _reaches(net_agent, "k1", address)
        assert _reaches(net_agent, "k1", "10.80.0.1")
        events = [e["kind"] for e in c.get("/events").json()]
        assert "agent.started" in events
        # A NAT switch's dnsmasq that dies is started again by the agent's watcher.
        os.kill(dnsmasq, signal.SIGKILL)
        assert _dhcp_pid_after(c, "default", dnsmasq) is not None
        kinds = [e["kind"] for e in c.get("/events").json()]
        assert "network.dnsmasq_restarted" in kinds


def _dhcp_pid_after(c: Any, switch: str, old: int, timeout: float = 30) -> int | None:
    """The pid of the switch's dnsmasq once it is another than ``old``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = c.get(f"/networks/switches/{switch}").json()["dhcp"]["pid"]
        if pid not in (None, old):
            return int(pid)
        time.sleep(0.2)
    return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
