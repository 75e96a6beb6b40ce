"""thinvisor's side of the API benchmarks: its REST API as a client program uses it (an
API token, TLS, HTTP/1.1 keep-alive), and its CIM server through pywbem."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
from pywbem import WBEMConnection

from bench.hosts import USER, ThinvisorHost, appliance

# The appliance VMs the issue asks for (the appliance boots in 60 MiB at the least).
MEMORY_MIB = 64
HEADLESS = {"kind": "none"}  # as libvirt's domains here: a serial console, no graphics
IMAGES = "images"  # the datastore folder that holds the one kernel and initrd all VMs boot


def login(host: ThinvisorHost) -> str:
    """An API token for the host's user (``POST /auth/login``)."""
    with host.client() as basic:
        body = {"user": USER, "password": host.password, "label": "bench"}
        response = basic.post("/auth/login", json=body)
        response.raise_for_status()
    token: str = response.json()["token"]
    return token


def token_client(host: ThinvisorHost, token: str) -> httpx.Client:
    """A client that sends an API token (HTTPS, HTTP/1.1 kept alive)."""
    return httpx.Client(
        base_url=host.base,
        verify=host.ssl_context(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )


class ThinvisorApi:
    """A thinvisor host's REST API, authenticated with an API token as ``thinvisor login``
    does (HTTP Basic would cost an argon2id hash per request, measured on its own)."""

    def __init__(self, host: ThinvisorHost) -> None:
        self.host = host
        self.token = login(host)
        self.client = self.session()
        self.boot = self._stage_boot()

    def session(self) -> httpx.Client:
        """A new client with its own connection (HTTP/1.1, kept alive)."""
        return token_client(self.host, self.token)

    def _stage_boot(self) -> dict[str, Any]:
        """The appliance's kernel and initrd, once, in the datastore: kernel boot for all."""
        image = appliance()
        folder = self.host.datastore / IMAGES
        folder.mkdir(exist_ok=True)
        kernel = Path(shutil.copy2(image.kernel, folder / "vmlinuz"))
        initrd = Path(shutil.copy2(image.initrd, folder / "initrd.img"))
        return {
            "kind": "kernel",
            "kernel": str(kernel),
            "initrd": str(initrd),
            "cmdline": image.cmdline,
        }

    def define(self, name: str) -> None:
        """Create a VM and follow its task to the end, as a client does."""
        body = {"name": name, "memory_mib": MEMORY_MIB, "boot": self.boot, "graphics": HEADLESS}
        self.host.wait_task(self.client, self.client.post("/vms", json=body))

    def delete(self, name: str) -> None:
        self.client.delete(f"/vms/{name}").raise_for_status()

    def list_all(self) -> int:
        response = self.client.get("/vms")
        response.raise_for_status()
        return len(response.json())

    def read(self, name: str) -> dict[str, Any]:
        response = self.client.get(f"/vms/{name}")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def manager_pids(self) -> list[int]:
        """The agent: the one process that manages the VMs."""
        return [self.host.pid]

    def reader(self) -> ThinvisorReader:
        return ThinvisorReader(self.session())

    def close(self) -> None:
        self.client.close()


class ThinvisorReader:
    """One concurrent client: ``GET /vms/{vm}`` on its own connection."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def read(self, name: str) -> None:
        self.client.get(f"/vms/{name}").raise_for_status()

    def close(self) -> None:
        self.client.close()


def basic_client(host: ThinvisorHost) -> httpx.Client:
    """A client sending the user's password with every request (HTTP Basic)."""
    return host.client()


def cim_connection(host: ThinvisorHost) -> WBEMConnection:
    """pywbem against the agent's CIM server: HTTPS with the host's certificate, Basic auth."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        os.environ.pop(var, None)  # requests prefers these to the CA file it is given
    return WBEMConnection(
        f"https://127.0.0.1:{host.cim_port}",
        (USER, host.password),
        default_namespace="root/cimv2",
        ca_certs=str(host.cert),
        timeout=300,
    )


def cim_enumerate(conn: WBEMConnection) -> int:
    """EnumerateInstances of TV_ComputerSystem (the host and every VM): how many."""
    return len(conn.EnumerateInstances("TV_ComputerSystem"))
