"""A datastore added to a real ``thinvisor host serve``: an appliance VM with a disk on it,
its space as the guest writes, browsing and copying files with the ``thinvisor`` command
logged in to the agent, and removal refused while the VM is there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from thinvisor.console.serial import SerialConsole
from thinvisor.host.inventory import Inventory

from .agentenv import PASSWORD, TestAgent
from .hostenv import THINVISOR, TestHost

pytestmark = pytest.mark.functional

DISK_BYTES = 64 << 20
WRITTEN_MIB = 8


def remote(host: TestHost, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    """The real ``thinvisor`` with the test's own login and no host configuration: every
    command goes to the agent."""
    env = {k: v for k, v in os.environ.items() if k != "THINVISOR_LOCAL"}
    env["XDG_CONFIG_HOME"] = str(host.root / "xdg")
    env["THINVISOR_CONFIG"] = "/nonexistent.toml"
    proc = subprocess.run(
        [THINVISOR, *args], check=False, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == code, f"thinvisor {' '.join(args)}: {proc.stderr.strip()}"
    return proc


def log_in(host: TestHost, agent: TestAgent) -> None:
    password_file = host.root / "login.pw"
    password_file.write_text(PASSWORD + "\n")
    url = f"https://127.0.0.1:{agent.port}"
    remote(host, "login", url, "--user", "admin", "--password-file", str(password_file), "--yes")


def guest(host: TestHost, name: str, command: str) -> tuple[int, str]:
    """Run a shell command in the guest over its serial console."""
    sock = Inventory(host.config).get(name).paths.serial_socket("serial0")

    async def go() -> tuple[int, str]:
        async with SerialConsole(sock) as console:
            return await console.run(command, 120)

    result: tuple[int, str] = host.run(go())
    return result


def storage_of(c: httpx.Client, vm: str) -> dict[str, Any]:
    response = c.get(f"/vms/{vm}/storage")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def datastore(c: httpx.Client, name: str) -> dict[str, Any]:
    response = c.get(f"/datastores/{name}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def add_and_create(host: TestHost, agent: TestAgent, c: httpx.Client, ds2: Path) -> None:
    response = c.post("/datastores", json={"name": "ds2", "path": str(ds2)})
    assert response.status_code == 201, response.text
    added = response.json()
    assert (added["origin"], added["accessible"], added["shared"]) == ("added", True, False)
    assert added["filesystem"] and added["capacity_bytes"] >= added["free_bytes"] > 0
    body = {"name": "big", "memory_mib": 128, "appliance": True, "cdrom": {},
            "disks": [{"size": DISK_BYTES}], "datastore": "ds2"}  # fmt: skip
    task = agent.wait_task(c, c.post("/vms", json=body))
    assert task["state"] == "success", task
    assert task["result"]["vm_dir"] == str(ds2 / "big")
    # Every process of the host sees the added datastore: the fixtures' inventory too.
    assert Inventory(host.config).get("big").datastore == "ds2"


def check_space_before_writes(c: httpx.Client, ds2: Path) -> dict[str, Any]:
    """The disk's whole size provisioned, little of it used; the disk's numbers."""
    usage = storage_of(c, "big")
    [disk] = usage["disks"]
    assert (disk["datastore"], disk["format"], disk["provisioning"]) == ("ds2", "qcow2", "thin")
    assert disk["path"] == str(ds2 / "big" / "disk0.qcow2")
    assert disk["virtual_size_bytes"] == DISK_BYTES == usage["provisioned_bytes"]
    assert [f["path"] for f in disk["chain"]] == [disk["path"]]
    assert 0 < disk["used_bytes"] < DISK_BYTES
    assert usage["used_bytes"] > disk["used_bytes"]  # the kernel and initrd are there too
    shown = datastore(c, "ds2")
    assert shown["provisioned_bytes"] == DISK_BYTES
    [vm] = shown["vms"]
    assert (vm["name"], vm["provisioned_bytes"]) == ("big", DISK_BYTES)
    assert vm["used_bytes"] == shown["vm_used_bytes"] == usage["used_bytes"]
    assert datastore(c, "local")["vms"] == []
    return disk


def browse_with_the_cli(host: TestHost, ds2: Path) -> None:
    listed = json.loads(remote(host, "datastore", "list", "--json").stdout)
    by_name = {d["name"]: d for d in listed}
    assert set(by_name) == {"local", "ds2"}
    assert (by_name["ds2"]["origin"], by_name["ds2"]["path"]) == ("added", str(ds2))
    assert by_name["ds2"]["provisioned_bytes"] == DISK_BYTES
    top = remote(host, "datastore", "ls", "ds2").stdout
    assert "big/" in top and "dir" in top
    listing = remote(host, "datastore", "ls", "ds2/big", "--json").stdout
    files = {e["name"]: e for e in json.loads(listing)}
    assert {"vm.toml", "disk0.qcow2", "vmlinuz", "initrd.img"} <= set(files)
    assert files["disk0.qcow2"]["kind"] == "file"
    iso = host.root / "tools.iso"
    iso.write_bytes(os.urandom(3 << 20))
    remote(host, "datastore", "upload", str(iso), "ds2/iso/")
    assert (ds2 / "iso" / "tools.iso").read_bytes() == iso.read_bytes()
    back = host.root / "back"
    back.mkdir()
    remote(host, "datastore", "download", "ds2/iso/tools.iso", str(back))
    assert (back / "tools.iso").read_bytes() == iso.read_bytes()
    remote(host, "datastore", "rm", "ds2/iso/tools.iso")
    remote(host, "datastore", "rm", "ds2/iso")


def test_a_vm_on_an_added_datastore(host: TestHost, agent: TestAgent) -> None:
    ds2 = host.root / "ds2"
    ds2.mkdir()
    with agent.client() as c:
        add_and_create(host, agent, c, ds2)
        disk = check_space_before_writes(c, ds2)
        # The guest writes to its disk: the space used grows by what it wrote.
        assert c.post("/vms/big/start").status_code == 200
        host.wait_ready("big")
        write = f"dd if=/dev/urandom of=/dev/vda bs=1M count={WRITTEN_MIB} conv=fsync 2>/dev/null"
        assert guest(host, "big", write)[0] == 0
        grown = storage_of(c, "big")["disks"][0]
        assert grown["used_bytes"] >= disk["used_bytes"] + (WRITTEN_MIB << 20)
        assert grown["virtual_size_bytes"] == DISK_BYTES
        # Removal is refused while the VM is there, running or not.
        refused = c.delete("/datastores/ds2")
        assert refused.status_code == 409, refused.text
        assert "vm 'big'" in refused.json()["message"]

    # The thinvisor command, logged in to the agent, browses and copies files.
    log_in(host, agent)
    browse_with_the_cli(host, ds2)
    err = remote(host, "datastore", "remove", "ds2", code=1).stderr
    assert err.startswith("error: datastore 'ds2' is in use (vm 'big': its directory is there)")
    err = remote(host, "datastore", "remove", "local", code=1).stderr
    assert "defined in host.toml" in err

    # It outlives the agent: a new agent reads it back.
    agent.stop()
    agent.start()
    with agent.client() as c:
        assert datastore(c, "ds2")["origin"] == "added"
        assert c.post("/vms/big/stop").json()["state"] == "stopped"
        assert c.delete("/vms/big").status_code == 204
    remote(host, "datastore", "remove", "ds2")
    names = [d["name"] for d in json.loads(remote(host, "datastore", "list", "--json").stdout)]
    assert names == ["local"]
    assert ds2.is_dir()  # removing a datastore deletes no file
    with agent.client() as c:
        assert c.get("/datastores/ds2").status_code == 404
        kinds = [e["kind"] for e in c.get("/events", params={"object": "datastore/ds2"}).json()]
        assert kinds == ["datastore.added", "datastore.file_uploaded", "datastore.file_deleted",
                         "datastore.file_deleted", "datastore.removed"]  # fmt: skip
