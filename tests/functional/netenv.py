"""A host agent whose VM networking lives in a network namespace the test creates.

The agent's API stays on the machine's loopback; bridges, TAPs, nftables, dnsmasq and
QEMU live in the namespace (``[network] namespace``), so the machine's own networking is
never touched. At teardown every process still in the namespace (QEMU, dnsmasq: all
started by the test's agent) is killed by pid, and the namespace is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from pyroute2 import netns

from thinvisor.host.inventory import Inventory

from .agentenv import TestAgent
from .hostenv import TestHost
from .serialconsole import SerialConsole


class NetNamespace:
    """A named network namespace (``/run/netns/<name>``) with its loopback up."""

    __test__ = False

    def __init__(self) -> None:
        self.name = f"tvt{secrets.token_hex(4)}"
        netns.create(self.name)
        self.path = Path("/run/netns") / self.name
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the namespace (``ip netns exec``)."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc

    def links(self) -> dict[str, dict[str, Any]]:
        """Every interface in the namespace, by name (``ip -d -j link``)."""
        data = json.loads(self.run("ip", "-d", "-j", "link", "show").stdout)
        return {link["ifname"]: link for link in data}

    def pids(self) -> list[int]:
        """The processes whose network namespace is this one."""
        inode = os.stat(self.path).st_ino
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.stat(entry / "ns" / "net").st_ino == inode:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def close(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        netns.remove(self.name)


class NetAgent(TestAgent):
    """A ``TestAgent`` whose VMs' networking lives in ``netns``."""

    __test__ = False

    def __init__(self, host: TestHost, ns: NetNamespace):
        with host.config_file.open("a") as f:
            f.write(f'[network]\nnamespace = "{ns.name}"\n')
        super().__init__(host)
        self.netns = ns
        self.consoles: dict[str, SerialConsole] = {}

    def create_vm(self, client: httpx.Client, name: str, *networks: str, **extra: Any) -> None:
        """An appliance VM with one NIC on each of ``networks``, started."""
        nics = [{"network": n} for n in networks]
        body = {"name": name, "appliance": True, "memory_mib": 128, "nics": nics, **extra}
        task = self.wait_task(client, client.post("/vms", json=body))
        assert task["state"] == "success", task
        response = client.post(f"/vms/{name}/start")
        assert response.status_code == 200, response.text

    def console(self, name: str) -> SerialConsole:
        """The serial console of a running VM, once it has printed its ready line."""
        if name not in self.consoles:
            paths = Inventory(self.host.config).get(name).paths
            console = SerialConsole(paths.serial_socket("serial0"), paths.serial_log("serial0"))
            console.connect()
            self.consoles[name] = console
        return self.consoles[name]

    def wait_ready(self, *names: str) -> None:
        for name in names:
            self.host.wait_ready(name)

    def close(self) -> None:
        for console in self.consoles.values():
            console.close()
        super().close()
