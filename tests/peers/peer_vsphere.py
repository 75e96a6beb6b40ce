"""The vsphere provider's peer: govmomi's vCenter simulator on loopback.

The simulator's model is a vCenter with one datacenter, a standalone host and a cluster
of three, and two VMs per host or pool, all powered on. The fixture prepares it with a
plain pyVmomi client (not the provider under test): it powers off one VM for the suite
and turns another into a template. The simulator accepts only the one user it was
started with, and presents a certificate of its own whose fingerprint is pinned.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import pyVim.connect
import pyVim.task
import pyVmomi

from tests.peers.contract import Peer
from tests.peers.vcsim import Vcsim, running
from thinvisor.providers.base import Connection

USERNAME = "administrator@vsphere.local"
PASSWORD = "thinvisor-vcsim"
VM = "DC0_H0_VM0"
TEMPLATE = "DC0_H0_VM1"
NETWORK = "VM Network"
MEMORY_MIB = 128

vim: Any = pyVmomi.vim
wait_for_task: Any = pyVim.task.WaitForTask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def prepare(sim: Vcsim) -> None:
    """Power off ``VM`` and ``TEMPLATE``, give them ``MEMORY_MIB``, mark ``TEMPLATE`` a template."""
    parts = urlsplit(sim.address)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a loopback simulator the test started itself
    connect: Any = pyVim.connect.SmartConnect
    si = connect(
        host=parts.hostname, port=parts.port, user=USERNAME, pwd=PASSWORD, sslContext=context
    )
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        vms = {vm.name: vm for vm in view.view}
        for name in (VM, TEMPLATE):
            wait_for_task(vms[name].PowerOffVM_Task())
            # The model's VMs have 32 MiB; the suite expects room for a small guest.
            wait_for_task(vms[name].ReconfigVM_Task(spec=vim.vm.ConfigSpec(memoryMB=MEMORY_MIB)))
        vms[TEMPLATE].MarkAsTemplate()
    finally:
        disconnect: Any = pyVim.connect.Disconnect
        disconnect(si)


@pytest.fixture(scope="session")
def vsphere_peer() -> Iterator[Peer]:
    """The simulator, with ``DC0_H0_VM0`` stopped and ``DC0_H0_VM1`` a template."""
    with running(USERNAME, PASSWORD) as sim:
        prepare(sim)
        yield Peer(
            kind="vsphere",
            connection=Connection(sim.address, USERNAME, PASSWORD, sim.fingerprint),
            vm=VM,
            template=TEMPLATE,
            network=NETWORK,
            wrong_password=Connection(sim.address, USERNAME, "wrong", sim.fingerprint),
            unreachable=Connection(
                f"https://127.0.0.1:{_free_port()}", USERNAME, PASSWORD, sim.fingerprint
            ),
        )
