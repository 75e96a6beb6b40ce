"""A stopped VM moved by the center between a thinvisor host (a real agent on loopback)
and a libvirt host (the session's libvirtd), and back: its disk's bytes arrive intact,
and the appliance boots to its ready line on each side."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.peers.libvirtd import READY, LibvirtDaemon
from thinvisor.center.agent import CenterAgent
from thinvisor.center.config import CenterApiConfig, CenterConfig, DatabaseConfig, SyncConfig
from thinvisor.center.inventory import HostRow, VmRow
from thinvisor.center.transfer import staging_root
from thinvisor.providers.base import MigrationOptions, PowerState
from thinvisor.tls import fingerprint

from .agentenv import PASSWORD, TestAgent

pytestmark = pytest.mark.functional

NAME = "xfer1"
DISK_MIB = 16
PATTERN = "0x5a"  # written at the start of the disk before the first move
TASK_WAIT_S = 60.0
READY_WAIT_S = 60.0


def seed_image(path: Path) -> None:
    """A qcow2 image of ``DISK_MIB`` whose first 64 KiB hold ``PATTERN``."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{DISK_MIB}M"],
                   check=True)  # fmt: skip
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN} 0 64k", str(path)],
                   check=True, capture_output=True)  # fmt: skip


def same_content(image: Path, reference: Path) -> bool:
    """Whether two images read the same (``qemu-img compare``: 0 same, 1 different)."""
    done = subprocess.run(["qemu-img", "compare", "-U", str(image), str(reference)],
                          check=False, capture_output=True)  # fmt: skip
    return done.returncode == 0


def create_on_thinvisor(agent: TestAgent, seed: Path) -> None:
    """The appliance VM, its one disk imported from ``seed``, stopped."""
    body = {"name": NAME, "memory_mib": 128, "appliance": True,
            "disks": [{"source": str(seed), "format": "qcow2"}]}  # fmt: skip
    with agent.client() as client:
        response = client.post("/vms", json=body)
        if response.status_code == 202:
            task = agent.wait_task(client, response)
            assert task["state"] == "success", task
        else:
            assert response.status_code in (200, 201), response.text


def wait_libvirt_ready(domain: Any, log: Path) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    while time.monotonic() < deadline:
        if log.exists() and READY.search(log.read_bytes()):
            return
        assert domain.isActive(), "the domain stopped before its ready line"
        time.sleep(0.1)
    tail = log.read_bytes()[-2000:] if log.exists() else b""
    qemu_log = Path("/var/log/libvirt/qemu") / f"{NAME}.log"
    said = qemu_log.read_text(errors="replace")[-3000:] if qemu_log.exists() else ""
    raise AssertionError(
        f"no ready line on the libvirt host: {tail!r}\n{domain.XMLDesc(0)}\n{said}"
    )


def logged_serial(xml: str, log: Path) -> str:
    """The domain's definition with its serial console logged to ``log`` (to see the
    guest's ready line; the transfer gives it a plain pty)."""
    root = ET.fromstring(xml)
    serial = root.find("devices/serial")
    assert serial is not None
    ET.SubElement(serial, "log", file=str(log), append="off")
    return ET.tostring(root, encoding="unicode")


async def moved(agent_: CenterAgent, row: VmRow, host: HostRow, **options: Any) -> VmRow:
    """Move the VM through ``CenterService.migrate_vm``; its row on ``host`` after."""
    task = await agent_.service.migrate_vm(row.id, host.id, MigrationOptions(**options))
    done = await agent_.tasks.wait(task.id, TASK_WAIT_S)
    assert done.state == "success", done.error
    assert done.result["mode"] == "transfer" and done.result["disks"] == 1
    assert done.result["kernel"] is True
    found = agent_.inventory.find_vms(NAME)
    assert [(v.host_id, v.power_state) for v in found] == [(host.id, PowerState.STOPPED)]
    assert not any(staging_root(agent_.service).iterdir())
    return found[0]


def test_a_vm_moves_to_libvirt_boots_there_and_comes_back(
    agent: TestAgent, libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    seed = agent.host.datastore / "seed.qcow2"
    seed_image(seed)
    reference = tmp_path / "reference.qcow2"
    seed_image(reference)
    create_on_thinvisor(agent, seed)
    seed.unlink()

    async def scenario() -> None:
        center = CenterAgent(
            CenterConfig(
                state_dir=tmp_path / "center",
                api=CenterApiConfig(tls=False),
                database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'inventory.db'}"),
                sync=SyncConfig(ping_interval_s=1.0, ping_timeout_s=5.0),
            )
        )
        await center.start()
        try:
            await journey(center, agent, libvirtd, reference)
        finally:
            await center.stop()
            center.events.close()

    asyncio.run(scenario())


async def journey(
    center: CenterAgent, agent: TestAgent, libvirtd: LibvirtDaemon, reference: Path
) -> None:
    # New domains get the type most of the host's domains have (as ``create`` gives
    # them): one appliance domain of type qemu says that KVM is not for guests here.
    await asyncio.to_thread(libvirtd.define_appliance, f"{NAME}-peer")
    dc = center.inventory.create_datacenter("dc1")
    tv = await center.service.add_host(
        parent_id=dc.id, provider="thinvisor", address=f"https://127.0.0.1:{agent.port}",
        username="admin", password=PASSWORD, fingerprint=fingerprint(agent.cert), name="tv1",
    )  # fmt: skip
    lv = await center.service.add_host(
        parent_id=dc.id, provider="libvirt", address=libvirtd.uri, name="lv1"
    )
    for host in (tv, lv):
        await center.service.syncs.get(host.id).refresh()
    (row,) = center.inventory.find_vms(NAME)
    assert row.host_id == tv.id
    first_id = row.id

    # To libvirt: the disk lands in the test's pool, a qcow2 holding the same bytes.
    row = await moved(center, row, lv, datastore=libvirtd.pool)
    assert row.id == first_id  # the same inventory object, known by the domain's UUID
    with agent.client() as client:
        assert client.get(f"/vms/{NAME}").status_code == 404
    domain = libvirtd.conn.lookupByUUIDString(row.ext_id)
    xml = domain.XMLDesc(0)
    disk = ET.fromstring(xml).find("devices/disk/source")
    assert disk is not None
    volume = Path(disk.get("file", ""))
    assert volume.parent == libvirtd.pool_path and same_content(volume, reference)
    assert re.search(r"<kernel>[^<]+</kernel>", xml) and "<acpi/>" in xml
    assert ET.fromstring(xml).get("type") == "qemu"

    # It boots there.
    log = libvirtd.host.root / f"{NAME}-serial0.log"
    libvirtd.conn.defineXML(logged_serial(domain.XMLDesc(0), log))
    await asyncio.to_thread(domain.create)
    try:
        await asyncio.to_thread(wait_libvirt_ready, domain, log)
    finally:
        await asyncio.to_thread(domain.destroy)
    await center.service.syncs.get(lv.id).refresh()

    # And back to thinvisor, where it boots again from the kernel that came along.
    row = await moved(center, center.inventory.vm(row.id), tv)
    assert (row.id, row.ext_id) == (first_id, NAME)
    assert not [d for d in libvirtd.conn.listAllDomains(0) if d.name() == NAME]
    with agent.client() as client:
        shown = client.get(f"/vms/{NAME}").json()
        assert shown["spec"]["boot"]["kind"] == "kernel"
        ((datastore_disk,),) = ([d["path"] for d in shown["spec"]["disks"]],)
        local = agent.host.datastore / NAME / datastore_disk
        assert same_content(local, reference)
        started = client.post(f"/vms/{NAME}/start")
        assert started.status_code == 200, started.text
    await asyncio.to_thread(agent.host.wait_ready, NAME)
    with agent.client() as client:
        client.post(f"/vms/{NAME}/stop")
    # It boots from the kernel and initrd in boot-files/; deleted, it leaves none there.
    assert (agent.host.datastore / "boot-files").is_dir()
    task = await center.service.delete_vm(row.id)
    done = await center.tasks.wait(task.id, TASK_WAIT_S)
    assert done.state == "success", done.error
    assert not (agent.host.datastore / "boot-files").exists()
