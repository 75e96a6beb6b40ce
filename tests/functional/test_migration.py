"""Live migration through the center, between thinvisor hosts in their own network
namespaces: on a datastore directory all three share, and between their own datastores
(the disks mirrored while the guest runs); and what a destination dying mid-way leaves.
Then what rests on it: anti-affinity, maintenance mode, and HA after a host crash (its VMs
restarted elsewhere) next to a host only cut off from the center (its VMs left alone).

The guests prove it: each numbers sectors of its disk, one every 100 ms, with its uptime
beside the number, while it moves. Afterwards the destination's disk must hold every
number once, in order, with a growing uptime: no write lost, none repeated, no reboot.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peers.lab import Lab, in_namespace
from thinvisor.appliance import Appliance
from thinvisor.host import hostinfo
from thinvisor.host.inventory import Inventory

from .centerenv import LabAgent, LabCenter
from .hostenv import TestHost

pytestmark = pytest.mark.functional

SECTOR = 512
_FACTS = hostinfo.host_facts()
RESERVED_MHZ = _FACTS.cpus * _FACTS.core_mhz * 6 // 10
#: The guest's writer: sector i holds "i <uptime>"; /tmp/count the last i (renamed into
#: place, so that a reader never sees it half written).
WRITER = (
    "(i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); "
    'echo "$i $(cut -d" " -f1 /proc/uptime)" | dd of=/dev/vda bs=512 seek=$i conv=fsync '
    "2>/dev/null; echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; "
    "done) >/dev/null 2>&1 & true"
)


@dataclass
class Site:
    lab: Lab
    agents: list[LabAgent]
    center: LabCenter
    shared: Path

    def agent(self, n: int) -> LabAgent:
        return self.agents[n - 1]


@pytest.fixture(scope="module")
def site(appliance: Appliance) -> Iterator[Site]:
    """Three hosts in cluster /dc/cl, each with its own datastore ``local`` and the
    datastore ``shared`` they all see; the VMs the tests move, made beforehand."""
    lab = Lab()
    shared = Path(tempfile.mkdtemp(prefix="tvshared", dir="/tmp"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, shared, True)
        stack.callback(lab.close)
        agents = []
        for _ in range(3):
            host = TestHost(appliance)
            stack.callback(host.close)
            agent = LabAgent(host, lab.add_node())
            stack.callback(agent.close)
            host.add_datastore("shared", shared)
            agents.append(agent)
        h1 = agents[0].host
        h1.create("counter", start=False, disk_mib=16, datastore="shared")
        h1.create("mirrored", start=False, disk_mib=16)
        h1.create("victim", start=False, disk_mib=16)
        h1.create("apart1", start=False, datastore="shared")
        agents[1].host.create("apart2", start=False, datastore="shared")
        agents[1].host.create("alone", start=False, datastore="shared")
        # Each reserves 60% of a host's CPU: no two fit on one host.
        reserve = {"cpu_reservation_mhz": RESERVED_MHZ}
        for name in ("res1", "res2"):
            agents[1].host.create(name, start=False, datastore="shared", resources=reserve)
        for name in ("m1", "m2", "m3", "m4", "later", "ha1", "ha2"):
            agents[2].host.create(name, start=False, datastore="shared")
        with ThreadPoolExecutor(len(agents)) as pool:
            list(pool.map(LabAgent.start, agents))
        center = LabCenter(lab.center)
        stack.callback(center.close)
        center.start()
        center.login()
        center.cli("datacenter", "create", "dc")
        center.cli("cluster", "create", "/dc", "cl")
        password = str(center.password_file)
        for n, agent in enumerate(agents, 1):
            center.cli("host", "add", agent.url, "--provider", "thinvisor", "--parent", "/dc/cl",
                       "--user", "admin", "--password-file", password,
                       "--fingerprint", agent.fingerprint, "--name", f"host{n}")  # fmt: skip
        yield Site(lab, agents, center, shared)


def _start_writing(site: Site, vm: str) -> None:
    agent = site.agent(1)
    before = agent.host.serial_log(vm).count(b"THINVISOR-APPLIANCE-READY")
    site.center.cli("vm", "start", f"/dc/cl/host1/{vm}")
    agent.host.wait_ready(vm, count=before + 1)
    agent.host.sh(vm, WRITER)
    _wait_count(agent, vm, 5)


def _count(agent: LabAgent, vm: str) -> int:
    return int(agent.host.sh(vm, "cat /tmp/count 2>/dev/null || echo 0").strip())


def _uptime(agent: LabAgent, vm: str) -> float:
    return float(agent.host.sh(vm, "cut -d' ' -f1 /proc/uptime").strip())


def _wait_count(agent: LabAgent, vm: str, at_least: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        count = _count(agent, vm)
        if count >= at_least:
            return count
        time.sleep(0.2)
    raise AssertionError(f"{vm}: the guest's counter did not reach {at_least}")


def _migrate(site: Site, vm: str, to: str, *args: str, code: int = 0) -> Any:
    if code:
        return site.center.cli("vm", "migrate", vm, to, *args, code=code)
    return site.center.json("vm", "migrate", vm, to, *args)


def _safe_memory_copy(qemu_log: Path) -> str:
    """How a migration left to choose copies the memory of the VM whose QEMU log this
    is: paused where QEMU emulates the CPU and is older than 9.0 (its TCG loses writes
    between passes), live elsewhere."""
    import subprocess

    argv = qemu_log.read_text().split("starting QEMU", 1)[1].splitlines()[0]
    said = subprocess.run(
        ["qemu-system-x86_64", "--version"], check=True, capture_output=True, text=True
    )
    major = int(said.stdout.split("version ", 1)[1].split(".")[0])
    return "paused" if "accel=tcg" in argv and major < 9 else "live"


def _stop_and_check_disk(agent: LabAgent, vm: str) -> int:
    """Stop the writer and the VM; check its disk holds 1..n in order with a growing
    uptime; n."""
    agent.host.sh(vm, "touch /tmp/stop; sleep 0.5")
    count = _count(agent, vm)
    agent.host.run(agent.host.service.stop(vm))
    entry = Inventory(agent.host.config).get(vm)
    assert entry.spec is not None
    data = _raw(agent.host, entry.paths.resolve(entry.spec.disks[0].path))
    uptimes = []
    for i in range(1, count + 1):
        line = data[i * SECTOR : (i + 1) * SECTOR].split(b"\n", 1)[0].decode()
        number, uptime = line.split()
        assert int(number) == i, f"sector {i} holds {line!r}"
        uptimes.append(float(uptime))
    assert uptimes == sorted(uptimes), "the guest's uptime went back: it restarted"
    return count


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie not yet reaped by init does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _raw(host: TestHost, image: Path) -> bytes:
    import subprocess

    raw = host.root / "check.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def test_live_migration_on_shared_storage_loses_no_write(site: Site) -> None:
    _start_writing(site, "counter")
    source, dest = site.agent(1), site.agent(2)
    uptime_before = _uptime(source, "counter")
    count_before = _count(source, "counter")
    source_pid = source.host.pid("counter")

    # Asked live, it is live even where QEMU would pause it by itself (TCG before 9.0).
    result = _migrate(site, "/dc/cl/host1/counter", "host2", "--memory-copy", "live")

    assert result["mode"] == "shared"
    assert result["memory_copy"] == "live"
    assert result["downtime_ms"] < 1000
    assert source_pid is not None and not _alive(source_pid)
    assert Inventory(source.host.config).find("counter") is None
    assert dest.host.pid("counter") is not None
    # The guest goes on counting where it was, and has not rebooted.
    assert _wait_count(dest, "counter", count_before + 10) > count_before
    assert _uptime(dest, "counter") > uptime_before
    vms = {vm["name"]: vm for vm in site.center.json("vm", "list")}
    assert vms["counter"]["path"] == "/dc/cl/host2/counter"
    assert vms["counter"]["power_state"] == "running"
    assert _stop_and_check_disk(dest, "counter") > count_before


def test_live_migration_mirrors_disks_without_shared_storage(site: Site) -> None:
    _start_writing(site, "mirrored")
    source, dest = site.agent(1), site.agent(3)
    count_before = _count(source, "mirrored")
    source_dir = Inventory(source.host.config).get("mirrored").paths.vm_dir
    expected_copy = _safe_memory_copy(source_dir / "logs" / "qemu.log")

    result = _migrate(site, "/dc/cl/host1/mirrored", "host3", "--datastore", "local")

    assert result["mode"] == "mirror"
    assert result["memory_copy"] == expected_copy
    if expected_copy == "live":
        assert result["downtime_ms"] < 1000
    else:  # paused for the whole copy: the downtime is the copy's time
        assert result["downtime_ms"] > 0
    assert not source_dir.exists()
    entry = Inventory(dest.host.config).get("mirrored")
    assert entry.paths.vm_dir.is_relative_to(dest.host.datastore)
    assert _wait_count(dest, "mirrored", count_before + 10) > count_before
    # Every block written before and during the move is on the destination's disk.
    assert _stop_and_check_disk(dest, "mirrored") > count_before


def _slow_move(site: Site, vm: str, to: str) -> str:
    """Start moving ``vm`` at 4 MiB/s; its task's id once it is sending memory."""
    task = site.center.json("vm", "migrate", vm, to, "--bandwidth", "4", "--no-wait")
    deadline = time.monotonic() + 60
    while "migrating memory" not in str(_task(site, task["id"]).get("message")):
        assert time.monotonic() < deadline, "the migration did not reach its memory phase"
        time.sleep(0.1)
    return str(task["id"])


def test_a_destination_dying_mid_way_leaves_the_vm_running_on_the_source(site: Site) -> None:
    _start_writing(site, "victim")
    source, dest = site.agent(1), site.agent(2)
    # Memory the guest cannot share as zero pages, sent slowly: the move takes a while.
    source.host.sh("victim", "dd if=/dev/urandom of=/tmp/fill bs=1M count=40 2>/dev/null")
    # Aborted on request first: the guest runs on where it was.
    task_id = _slow_move(site, "/dc/cl/host1/victim", "host2")
    site.center.cli("task", "cancel", task_id)
    cancelled = _wait_task(site, task_id)
    assert cancelled["state"] == "error" and cancelled["error"]["error"] == "cancelled"
    count = _count(source, "victim")
    assert _wait_count(source, "victim", count + 5) > count
    assert Inventory(dest.host.config).find("victim") is None
    # Then the destination dies mid-way.
    task = {"id": _slow_move(site, "/dc/cl/host1/victim", "host2")}
    dest.kill()
    try:
        finished = _wait_task(site, task["id"])
        assert finished["state"] == "error"
        count = _count(source, "victim")
        assert _wait_count(source, "victim", count + 5) > count  # it runs on, at the source
        assert source.host.pid("victim") is not None
    finally:
        dest.start()
    # The restarted destination threw the half-arrived VM away.
    assert Inventory(dest.host.config).find("victim") is None
    assert not (dest.host.config.run_dir / "vms" / "victim" / "qemu.pid").exists()
    vms = {vm["name"]: vm for vm in site.center.json("vm", "list")}
    assert vms["victim"]["path"] == "/dc/cl/host1/victim"
    site.center.cli("vm", "stop", "/dc/cl/host1/victim")


def _task(site: Site, task_id: str) -> dict[str, Any]:
    tasks = site.center.json("tasks", "--limit", "50")
    return next(t for t in tasks if t["id"] == task_id)


def _wait_task(site: Site, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        task = _task(site, task_id)
        if task["state"] in ("success", "error"):
            return task
        time.sleep(0.25)
    raise AssertionError(f"task {task_id} did not finish")


def _vm_hosts(site: Site) -> dict[str, str]:
    return {vm["name"]: vm["host"] for vm in site.center.json("vm", "list")}


def _start(site: Site, n: int, vm: str) -> None:
    agent = site.agent(n)
    before = agent.host.serial_log(vm).count(b"THINVISOR-APPLIANCE-READY")
    site.center.cli("vm", "start", f"/dc/cl/host{n}/{vm}")
    agent.host.wait_ready(vm, count=before + 1)


def test_anti_affinity_keeps_two_vms_apart(site: Site) -> None:
    _start(site, 1, "apart1")
    _start(site, 2, "apart2")
    site.center.cli("rule", "create", "/dc/cl", "apart", "--kind", "anti-affinity",
                    "/dc/cl/host1/apart1", "/dc/cl/host2/apart2")  # fmt: skip
    error = _migrate(site, "/dc/cl/host2/apart2", "host1", code=1)
    assert "apart" in error and "anti-affinity" in error
    assert _vm_hosts(site)["apart2"] == "host2"
    # Elsewhere it may go.
    _migrate(site, "/dc/cl/host2/apart2", "host3")
    assert _vm_hosts(site)["apart2"] == "host3"


def test_maintenance_mode_spreads_a_hosts_vms_over_the_others(site: Site) -> None:
    host3 = site.agent(3).host
    for vm in ("m1", "m2", "m3", "m4"):
        site.center.cli("vm", "start", f"/dc/cl/host3/{vm}", "--no-wait")
    for vm in ("m1", "m2", "m3", "m4"):
        host3.wait_ready(vm)
    # apart2 came here too: its rule keeps it off host1.
    site.center.cli("host", "maintenance", "/dc/cl/host3", "on")

    hosts = _vm_hosts(site)
    moved = [hosts[vm] for vm in ("m1", "m2", "m3", "m4")]
    assert set(moved) == {"host1", "host2"}, moved  # spread, never all onto one
    assert hosts["apart2"] == "host2"
    assert [h["maintenance"] for h in site.center.json("host", "list")
            if h["name"] == "host3"] == [True]  # fmt: skip
    for vm in ("m1", "m2", "m3", "m4"):
        n = int(hosts[vm].removeprefix("host"))
        assert site.agent(n).host.sh(vm, "echo still-$((40+2))").strip().endswith("still-42")
    # Nothing new starts on a host in maintenance: powered on, it is placed elsewhere.
    started = site.center.json("vm", "start", "/dc/cl/host3/later")
    assert started["moved"]["from"].startswith("/dc/cl/host3/")
    assert started["power_state"] == "running"
    hosts = _vm_hosts(site)
    assert hosts["later"] in ("host1", "host2")
    site.center.cli("host", "maintenance", "/dc/cl/host3", "off")
    for vm in ("m1", "m2", "m3", "m4", "later", "apart1", "apart2"):
        site.center.cli("vm", "stop", f"/dc/cl/{hosts[vm]}/{vm}")


def _host_info(agent: LabAgent) -> Any:
    def read() -> Any:
        with agent.client() as c:
            return c.get("/host").json()

    return in_namespace(agent.node.ns.name, read)


def test_placement_weighs_what_hosts_and_vms_reserve_and_the_cpu_load(site: Site) -> None:
    # What placement weighs reaches the center from the agents.
    info = _host_info(site.agent(2))
    hosts = {h["name"]: h for h in site.center.json("host", "list")}
    assert hosts["host2"]["core_mhz"] == info["core_mhz"] > 0
    assert hosts["host2"]["reserved_memory_mib"] == info["host_reservation"]["memory_mib"]
    vms = {vm["name"]: vm for vm in site.center.json("vm", "list")}
    assert vms["res1"]["reserved_cpu_mhz"] == vms["res2"]["reserved_cpu_mhz"] == RESERVED_MHZ
    deadline = time.monotonic() + 60  # the agent's CPU load: from its second sample on
    while (load := _host_info(site.agent(2))["cpu_load"]) is None:
        assert time.monotonic() < deadline, "the agent never said its CPU load"
        time.sleep(1)
    assert 0 <= load <= 1
    # res1 takes 60% of host2's CPU: res2, powered on there, is placed elsewhere first
    # (without the center knowing, host2's admission control would refuse it).
    _start(site, 2, "res1")
    started = site.center.json("vm", "start", "/dc/cl/host2/res2")
    assert started["moved"]["from"] == "/dc/cl/host2/res2"
    assert started["power_state"] == "running"
    where = _vm_hosts(site)["res2"]
    assert where in ("host1", "host3")
    site.agent(int(where.removeprefix("host"))).host.wait_ready("res2")
    site.center.cli("vm", "stop", f"/dc/cl/{where}/res2")
    site.center.cli("vm", "stop", "/dc/cl/host2/res1")


def test_ha_restarts_a_crashed_hosts_vms_but_not_an_isolated_hosts(site: Site) -> None:
    center = site.center
    # The shortest timeout HA allows (15 s by default), to keep the test short.
    center.cli("ha", "cluster", "/dc/cl", "on", "--timeout", "5")
    _start(site, 3, "ha1")
    _start(site, 3, "ha2")
    center.cli("ha", "vm", "/dc/cl/host3/ha1", "--priority", "high")
    _start(site, 2, "alone")
    crashed, isolated = site.agent(3), site.agent(2)
    qemus = [crashed.host.pid("ha1"), crashed.host.pid("ha2")]
    alone_pid = isolated.host.pid("alone")
    ready_before = {vm: crashed.host.serial_log(vm).count(b"READY") for vm in ("ha1", "ha2")}
    # host2 loses the center's network only (it still writes to the shared datastore);
    # host3 crashes: its agent and its QEMUs are killed at once.
    site.lab.center.ns.run("ip", "link", "set", "lab1", "down")
    crashed.kill()
    for pid in qemus:
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    try:
        deadline = time.monotonic() + 60
        while {_vm_hosts(site).get(vm) for vm in ("ha1", "ha2")} != {"host1"}:
            assert time.monotonic() < deadline, f"not restarted within 60 s: {_vm_hosts(site)}"
            time.sleep(1)
        survivor = site.agent(1)
        for vm in ("ha1", "ha2"):
            survivor.host.wait_for(vm, b"READY", count=ready_before[vm] + 1)
        # The isolated host's VM still runs there, and nowhere else.
        assert _alive(alone_pid or 0)
        assert Inventory(survivor.host.config).find("alone") is None
        assert _vm_hosts(site)["alone"] == "host2"
        events = center.cli("events", "--kind", "ha.", "--limit", "50")
        assert "isolated" in events and "host2" in events
    finally:
        site.lab.center.ns.run("ip", "link", "set", "lab1", "up")
        crashed.start()
    # The crashed host, back, no longer lists what was restarted elsewhere.
    assert Inventory(crashed.host.config).find("ha1") is None
    center.cli("ha", "cluster", "/dc/cl", "off")
