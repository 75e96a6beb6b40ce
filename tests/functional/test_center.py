"""One center over hosts of every kind: three thinvisor agents, each in its own network
namespace with its own address, a libvirtd running the appliance, and the vSphere
simulator, driven through ``thinvisor center`` as an operator would, on SQLite and on
PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from tests.peers.lab import Lab
from tests.peers.libvirtd import LibvirtDaemon, libvirt_daemon
from tests.peers.peer_vsphere import PASSWORD as VC_PASSWORD
from tests.peers.peer_vsphere import USERNAME as VC_USER
from tests.peers.postgres import DatabaseMaker
from tests.peers.vcsim import Vcsim
from thinvisor.appliance import Appliance

from .centerenv import LabAgent, LabCenter
from .hostenv import TestHost

pytestmark = pytest.mark.functional

LIBVIRT_VM = "center-lv"
#: How long the center may take to notice a host gone (it pings every second here).
NOTICE_S = 30.0


@dataclass
class LabHosts:
    lab: Lab
    agents: list[LabAgent]
    libvirt: LibvirtDaemon
    vcsim: Vcsim


@pytest.fixture(scope="module")
def lab_hosts(appliance: Appliance) -> Iterator[LabHosts]:
    """Three thinvisor hosts (VM ``appN`` on host N), libvirtd and the vSphere simulator."""
    lab = Lab()
    with ExitStack() as stack:
        stack.callback(lab.close)
        agents = []
        for n in (1, 2, 3):
            host = TestHost(appliance)
            stack.callback(host.close)
            host.create(f"app{n}", start=False)
            agent = LabAgent(host, lab.add_node())
            stack.callback(agent.close)
            agents.append(agent)
        with ThreadPoolExecutor(len(agents)) as pool:
            list(pool.map(LabAgent.start, agents))
        libvirt = stack.enter_context(libvirt_daemon())
        libvirt.define_appliance(LIBVIRT_VM)
        # The simulator answers on the lab center's own loopback.
        sim = Vcsim.start(VC_USER, VC_PASSWORD, namespace=lab.center.ns.name)
        stack.callback(sim.stop)
        yield LabHosts(lab, agents, libvirt, sim)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def center(request: pytest.FixtureRequest, lab_hosts: LabHosts) -> Iterator[LabCenter]:
    """A center with every host registered: /dc/f1/host1, /dc/f2/host2 and host3,
    /dc/libvirt, /dc/vcenter."""
    url, maker, database = None, None, ""
    if request.param == "postgresql":
        maker = request.getfixturevalue("postgres_databases")
        assert isinstance(maker, DatabaseMaker)
        database = maker.take()
        server = maker.server
        # Over the server's unix socket: the center's namespace has no route to its TCP port.
        url = (
            f"postgresql://postgres:{server.password}@/{database}"
            f"?host={server.socket_dir}&port={server.port}"
        )
    c = LabCenter(lab_hosts.lab.center, database_url=url)
    try:
        c.start()
        c.login()
        _register(c, lab_hosts)
        yield c
    finally:
        c.close()
        if maker is not None:
            maker.drop(database)


def _register(c: LabCenter, hosts: LabHosts) -> None:
    c.cli("datacenter", "create", "dc")
    c.cli("folder", "create", "/dc", "f1")
    c.cli("folder", "create", "/dc", "f2")
    password = str(c.password_file)
    for n, agent in enumerate(hosts.agents, 1):
        folder = "/dc/f1" if n == 1 else "/dc/f2"
        c.cli("host", "add", agent.url, "--provider", "thinvisor", "--parent", folder,
              "--user", "admin", "--password-file", password,
              "--fingerprint", agent.fingerprint, "--name", f"host{n}")  # fmt: skip
    c.cli("host", "add", hosts.libvirt.uri, "--provider", "libvirt", "--parent", "/dc",
          "--name", "libvirt")  # fmt: skip
    vc_password = c.root / "vcenter.pw"
    vc_password.write_text(VC_PASSWORD + "\n")
    c.cli("host", "add", hosts.vcsim.address, "--provider", "vsphere", "--parent", "/dc",
          "--user", VC_USER, "--password-file", str(vc_password),
          "--fingerprint", hosts.vcsim.fingerprint, "--name", "vcenter")  # fmt: skip


def _vms(c: LabCenter, user: str = "admin") -> dict[str, dict[str, Any]]:
    return {vm["path"]: vm for vm in c.json("vm", "list", user=user)}


def _hosts(c: LabCenter) -> dict[str, dict[str, Any]]:
    return {h["path"]: h for h in c.json("host", "list")}


def _until(what: str, check: Any, timeout: float) -> float:
    """Poll ``check()`` until true; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _ready_lines(agent: LabAgent, vm: str) -> int:
    return agent.host.serial_log(vm).count(b"THINVISOR-APPLIANCE-READY")


def test_the_tree_lists_every_vm_of_every_host(center: LabCenter, lab_hosts: LabHosts) -> None:
    hosts = _hosts(center)
    assert set(hosts) == {"/dc/f1/host1", "/dc/f2/host2", "/dc/f2/host3", "/dc/libvirt",
                          "/dc/vcenter"}  # fmt: skip
    assert {h["state"] for h in hosts.values()} == {"connected"}
    vms = _vms(center)
    for n in (1, 2, 3):
        assert vms[f"/dc/{'f1' if n == 1 else 'f2'}/host{n}/app{n}"]["power_state"] == "stopped"
    assert vms[f"/dc/libvirt/{LIBVIRT_VM}"]["power_state"] == "stopped"
    vsphere = [path for path in vms if path.startswith("/dc/vcenter/")]
    assert "/dc/vcenter/DC0_H0_VM0" in vsphere and len(vsphere) >= 4
    tree = center.cli("tree")
    assert "host3" in tree and LIBVIRT_VM in tree and "DC0_H0_VM0" in tree
    found = center.json("vm", "find", "app2")
    assert [(vm["host"], vm["path"]) for vm in found] == [("host2", "/dc/f2/host2/app2")]


def test_power_on_through_the_center_reaches_the_ready_line(
    center: LabCenter, lab_hosts: LabHosts
) -> None:
    agent = lab_hosts.agents[0]
    before = _ready_lines(agent, "app1")
    center.cli("vm", "start", "/dc/f1/host1/app1")
    agent.host.wait_ready("app1", count=before + 1)
    # The guest's serial console, brokered by the center from the host's.
    answer = center.cli("vm", "console", "/dc/f1/host1/app1", input="echo center-$((6*7))\n")
    assert "center-42" in answer
    center.cli("vm", "start", f"/dc/libvirt/{LIBVIRT_VM}")
    lab_hosts.libvirt.wait_ready(LIBVIRT_VM)
    vms = _vms(center)
    assert vms["/dc/f1/host1/app1"]["power_state"] == "running"
    assert vms[f"/dc/libvirt/{LIBVIRT_VM}"]["power_state"] == "running"
    center.cli("vm", "stop", "/dc/f1/host1/app1")
    center.cli("vm", "stop", f"/dc/libvirt/{LIBVIRT_VM}")
    assert agent.host.pid("app1") is None
    vms = _vms(center)
    assert vms["/dc/f1/host1/app1"]["power_state"] == "stopped"
    assert vms[f"/dc/libvirt/{LIBVIRT_VM}"]["power_state"] == "stopped"


def test_a_killed_agent_is_disconnected_then_resynced(
    center: LabCenter, lab_hosts: LabHosts
) -> None:
    before = _vms(center)
    agent = lab_hosts.agents[2]
    agent.kill()
    try:
        took = _until(
            "host3 marked disconnected",
            lambda: _hosts(center)["/dc/f2/host3"]["state"] == "disconnected",
            NOTICE_S,
        )
        assert took < NOTICE_S
        gone = _vms(center)
        assert gone["/dc/f2/host3/app3"]["power_state"] == "unknown"
        assert gone.keys() == before.keys()  # shown as unknown, not deleted
        error = center.cli("vm", "start", "/dc/f2/host3/app3", code=1)
        assert "disconnected" in error and "host3" in error
    finally:
        agent.start()
    _until(
        "host3 connected again",
        lambda: _hosts(center)["/dc/f2/host3"]["state"] == "connected",
        NOTICE_S,
    )
    after = _vms(center)
    assert after.keys() == before.keys()
    assert [vm["id"] for vm in after.values()] == [vm["id"] for vm in before.values()]
    assert after["/dc/f2/host3/app3"]["power_state"] == "stopped"
    events = center.cli("events", "--limit", "200")
    assert "host3" in events and "disconnected" in events


def test_an_operator_of_one_folder_powers_on_there_only(
    center: LabCenter, lab_hosts: LabHosts
) -> None:
    center.cli("user", "add", "tenant", "--role", "no-access",
               "--password-file", str(center.password_file))  # fmt: skip
    center.cli("grant", "/dc/f1", "tenant", "operator")
    center.login("tenant")
    visible = _vms(center, user="tenant")
    assert set(visible) == {"/dc/f1/host1/app1"}
    # Elsewhere: what they cannot see does not exist for them; what they may only read,
    # they may not power on.
    error = center.cli("vm", "start", "/dc/f2/host2/app2", code=1, user="tenant")
    assert error.strip() == "error: no inventory object at /dc/f2/host2/app2"
    center.cli("grant", "/dc/f2", "tenant", "read-only")
    assert "/dc/f2/host2/app2" in _vms(center, user="tenant")
    error = center.cli("vm", "start", "/dc/f2/host2/app2", code=1, user="tenant")
    assert "tenant" in error and "power" in error
    assert lab_hosts.agents[1].host.pid("app2") is None
    agent = lab_hosts.agents[0]
    before = _ready_lines(agent, "app1")
    center.cli("vm", "start", "/dc/f1/host1/app1", user="tenant")
    agent.host.wait_ready("app1", count=before + 1)
    center.cli("vm", "stop", "/dc/f1/host1/app1", user="tenant")
    center.cli("user", "remove", "tenant")
