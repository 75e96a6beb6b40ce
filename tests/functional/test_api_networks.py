"""``/networks`` and ``/vms/{vm}/nics`` of a real agent whose networking lives in a
namespace the test created: answers, error codes, refusals that change nothing, roles."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import pytest

from .netenv import NetAgent

pytestmark = pytest.mark.functional

Change = tuple[str, str, dict[str, Any] | None]
LAB = {"name": "lab", "port_groups": [{"name": "pg-a"}, {"name": "pg-b", "vlan": 10}]}


def _error(response: httpx.Response, status: int, code: str) -> str:
    """The message of an error answer, once its status and code are the ones expected."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == code, body
    message: str = body["message"]
    return message


def _on_machine(link: str) -> bool:
    """Whether ``link`` exists in the machine's own namespace (it never should)."""
    probe = subprocess.run(["ip", "link", "show", "dev", link], capture_output=True, check=False)
    return probe.returncode == 0


def _readers_are_refused(agent: NetAgent, reads: list[str], changes: list[Change]) -> None:
    """The read-only user and the operator may read (READ) but not change (CONFIGURE)."""
    for user in ("viewer", "oper"):
        with agent.client(user) as c:
            for path in reads:
                assert c.get(path).status_code == 200, (user, path)
            for method, path, body in changes:
                _error(c.request(method, path, json=body), 403, "forbidden")


def test_switches_and_port_groups(net_agent: NetAgent) -> None:
    with net_agent.client() as c:
        created = c.post("/networks/switches", json=LAB)
        assert created.status_code == 201, created.text
        lab = created.json()
        assert (lab["name"], lab["bridge"], lab["mtu"]) == ("lab", "tvbr-lab", 1500)
        assert lab["present"] and lab["dhcp"] is None and lab["nat"] is None
        assert lab["vlan_enforcement"] in ("bridge", "nftables")
        assert [(g["name"], g["vlan"], g["ports"]) for g in lab["port_groups"]] == [
            ("pg-a", 0, []),
            ("pg-b", 10, []),
        ]
        links = net_agent.netns.links()
        assert links["tvbr-lab"]["linkinfo"]["info_kind"] == "bridge"
        assert not _on_machine("tvbr-lab")

        assert c.get("/networks/switches").json() == [lab]
        assert c.get("/networks/switches/lab").json() == lab
        groups = c.get("/networks/portgroups").json()
        assert [(g["name"], g["switch"], g["vlan"]) for g in groups] == [
            ("pg-a", "lab", 0),
            ("pg-b", "lab", 10),
        ]
        assert c.get("/networks/portgroups/pg-b").json() == groups[1]
        _error(c.get("/networks/switches/nope"), 404, "not_found")
        _error(c.get("/networks/portgroups/nope"), 404, "not_found")

        _check_refusals(net_agent, c)
        # None of the refusals changed anything.
        assert c.get("/networks/switches").json() == [lab]
        assert c.get("/networks/portgroups").json() == groups

        added = c.post("/networks/portgroups", json={"name": "pg-c", "switch": "lab", "vlan": 7})
        assert added.status_code == 201, added.text
        assert added.json() == {"name": "pg-c", "switch": "lab", "vlan": 7, "ports": []}
        changed = c.patch("/networks/portgroups/pg-c", json={"vlan": 4095})
        assert changed.status_code == 200, changed.text
        assert changed.json()["vlan"] == 4095
        _error(c.patch("/networks/portgroups/nope", json={"vlan": 1}), 404, "not_found")
        assert c.delete("/networks/portgroups/pg-c").status_code == 204
        _error(c.delete("/networks/portgroups/pg-c"), 404, "not_found")
        assert [g["name"] for g in c.get("/networks/switches/lab").json()["port_groups"]] == [
            "pg-a",
            "pg-b",
        ]

    reads = ["/networks/switches", "/networks/switches/lab", "/networks/portgroups/pg-a"]
    _readers_are_refused(
        net_agent,
        reads,
        [
            ("POST", "/networks/switches", {"name": "x"}),
            ("DELETE", "/networks/switches/lab", None),
            ("POST", "/networks/portgroups", {"name": "x", "switch": "lab"}),
            ("PATCH", "/networks/portgroups/pg-a", {"vlan": 3}),
            ("DELETE", "/networks/portgroups/pg-a", None),
        ],
    )

    with net_agent.client() as c:
        assert c.get("/networks/switches/lab").json() == lab
        assert c.delete("/networks/switches/lab").status_code == 204
        _error(c.delete("/networks/switches/lab"), 404, "not_found")
        assert c.get("/networks/switches").json() == []
        assert c.get("/networks/portgroups").json() == []
        assert "tvbr-lab" not in net_agent.netns.links()


def test_nics_of_a_vm(net_agent: NetAgent) -> None:
    with net_agent.client() as c:
        assert c.post("/networks/switches", json=LAB).status_code == 201
        body = {"name": "vm1", "appliance": True, "memory_mib": 128, "nics": [{"network": "pg-a"}]}
        task = net_agent.wait_task(c, c.post("/vms", json=body))
        assert task["state"] == "success", task
        started = c.post("/vms/vm1/start")
        assert started.status_code == 200, started.text
        uuid = started.json()["uuid"]

        [nic] = c.get("/vms/vm1/nics").json()
        assert (nic["name"], nic["network"], nic["connected"]) == ("net0", "pg-a", True)
        assert nic["mac"].startswith("02:74:76:") and nic["shaping"] is None
        tap = nic["tap"]
        assert tap and net_agent.netns.links()[tap]["master"] == "tvbr-lab"
        assert not _on_machine(tap)
        assert c.get(f"/vms/{uuid}/nics").json() == [nic]  # by UUID too
        group = c.get("/networks/portgroups/pg-a").json()
        assert group["ports"] == [{"vm": "vm1", "nic": "net0", "mac": nic["mac"], "tap": tap}]

        # In use: the switch and the port group stay, bridge and TAP included.
        lab = c.get("/networks/switches/lab").json()
        assert "vm1/net0" in _error(c.delete("/networks/switches/lab"), 409, "busy")
        assert "vm1/net0" in _error(c.delete("/networks/portgroups/pg-a"), 409, "busy")
        assert c.get("/networks/switches/lab").json() == lab
        assert {"tvbr-lab", tap} <= set(net_agent.netns.links())

        _check_cable(c, uuid)

    _readers_are_refused(
        net_agent,
        ["/vms/vm1/nics"],
        [
            ("POST", "/vms/vm1/nics", {"network": "pg-b"}),
            ("PATCH", "/vms/vm1/nics/net0", {"connected": False}),
            ("DELETE", "/vms/vm1/nics/net0", None),
        ],
    )

    with net_agent.client() as c:
        assert c.get("/vms/vm1/nics").json()[0]["connected"] is True
        assert c.post("/vms/vm1/stop").json()["state"] == "stopped"
        assert c.get("/vms/vm1/nics").json()[0]["tap"] is None
        assert tap not in net_agent.netns.links()
        added = c.post("/vms/vm1/nics", json={"network": "pg-b", "connected": False})
        assert added.status_code == 201, added.text
        assert (added.json()["name"], added.json()["connected"]) == ("net1", False)
        assert [n["name"] for n in c.get("/vms/vm1/nics").json()] == ["net0", "net1"]
        assert c.delete("/vms/vm1/nics/net0").status_code == 204
        _error(c.delete("/vms/vm1/nics/net0"), 404, "not_found")
        assert "vm1/net1" in _error(c.delete("/networks/switches/lab"), 409, "busy")
        assert c.delete("/vms/vm1").status_code == 204
        assert c.delete("/networks/portgroups/pg-a").status_code == 204
        assert c.delete("/networks/switches/lab").status_code == 204
        assert "tvbr-lab" not in net_agent.netns.links()


def _check_refusals(agent: NetAgent, c: httpx.Client) -> None:
    """Taken names, bad VLAN ids, a missing uplink or switch: refused with the field named."""
    # Names are unique on the host: switches, and port groups across switches.
    assert "lab" in _error(c.post("/networks/switches", json=LAB), 409, "already_exists")
    other = {"name": "other", "port_groups": [{"name": "pg-a"}]}
    assert "pg-a" in _error(c.post("/networks/switches", json=other), 409, "already_exists")
    again = {"name": "pg-b", "switch": "lab"}
    assert "pg-b" in _error(c.post("/networks/portgroups", json=again), 409, "already_exists")

    # VLAN ids are 0 to 4095; the message names the field.
    too_high = {"name": "pg-c", "switch": "lab", "vlan": 5000}
    message = _error(c.post("/networks/portgroups", json=too_high), 400, "invalid_argument")
    assert message.startswith("vlan: ")
    bad = c.patch("/networks/portgroups/pg-b", json={"vlan": 5000})
    message = _error(bad, 400, "invalid_argument")
    assert message.startswith("vlan: ")
    in_switch = {"name": "vl", "port_groups": [{"name": "pg-v", "vlan": 5000}]}
    message = _error(c.post("/networks/switches", json=in_switch), 400, "invalid_argument")
    assert message.startswith("port_groups.0.vlan: ")

    uplink = {"name": "up", "uplink": "nosuch0"}
    message = _error(c.post("/networks/switches", json=uplink), 400, "invalid_argument")
    assert message.startswith("uplink: ") and "nosuch0" in message
    assert "tvbr-up" not in agent.netns.links()
    missing = {"name": "pg-c", "switch": "nope", "vlan": 5}
    assert "nope" in _error(c.post("/networks/portgroups", json=missing), 404, "not_found")


def _check_cable(c: httpx.Client, uuid: str) -> None:
    """Unplug and plug the virtual cable of a running VM's NIC (by name, by UUID)."""
    unplugged = c.patch("/vms/vm1/nics/net0", json={"connected": False})
    assert unplugged.status_code == 200, unplugged.text
    assert unplugged.json()["connected"] is False
    assert c.get("/vms/vm1/nics").json()[0]["connected"] is False
    plugged = c.patch(f"/vms/{uuid}/nics/net0", json={"connected": True})
    assert plugged.status_code == 200, plugged.text
    assert plugged.json()["connected"] is True
    bad = c.patch("/vms/vm1/nics/net0", json={"network": "nope"})
    message = _error(bad, 400, "invalid_argument")
    assert message.startswith("network: ")
    _error(c.patch("/vms/vm1/nics/net9", json={"connected": False}), 404, "not_found")
    _error(c.get("/vms/nope/nics"), 404, "not_found")
    assert c.get("/vms/vm1").json()["spec"]["nics"][0]["network"] == "pg-a"
