"""The libvirt provider's peer: the session's libvirtd (``tests.peers.libvirtd``) with an
appliance domain that has a qcow2 disk, so that internal snapshots work.

libvirt over the local unix socket takes no password, so ``wrong_password`` is None;
``unreachable`` is libvirt's TCP transport on a port where nothing listens.
"""

from __future__ import annotations

import pytest

from tests.peers.contract import Peer
from tests.peers.libvirtd import LibvirtDaemon, libvirtd
from thinvisor.providers.base import Connection

VM = "ct-libvirt-vm"
UNREACHABLE = "qemu+tcp://127.0.0.1:9/system"

__all__ = ["libvirt_peer", "libvirtd"]


@pytest.fixture(scope="session")
def libvirt_peer(libvirtd: LibvirtDaemon) -> Peer:
    """libvirtd with the appliance domain ``ct-libvirt-vm`` defined (stopped)."""
    vm = libvirtd.define_appliance(VM)

    def ready(vm_id: str) -> None:
        libvirtd.wait_ready(vm_id)

    return Peer(
        kind="libvirt",
        connection=Connection(libvirtd.uri),
        vm=vm.domain.UUIDString(),
        network=libvirtd.network,
        unreachable=Connection(UNREACHABLE),
        ready=ready,
    )
