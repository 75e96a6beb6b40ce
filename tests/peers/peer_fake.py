"""The fake provider's peer: an in-memory host with a stopped VM and a template."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers.contract import Peer
from thinvisor.providers.base import Connection
from thinvisor.providers.fake import fake_host, remove_fake_host

ADDRESS = "fake://contract"


@pytest.fixture(scope="session")
def fake_peer() -> Iterator[Peer]:
    """A fake host at ``fake://contract`` holding ``appliance`` and ``tpl-appliance``."""
    host = fake_host(ADDRESS, username="admin", password="secret", fingerprint="AA:BB")
    host.add_vm("appliance", memory_mib=64)
    host.add_vm("tpl-appliance", memory_mib=64, template=True)
    try:
        yield Peer(
            kind="fake",
            connection=Connection(ADDRESS, "admin", "secret", fingerprint="AA:BB"),
            vm="appliance",
            template="tpl-appliance",
            network="network1",
            wrong_password=Connection(ADDRESS, "admin", "wrong", fingerprint="AA:BB"),
            unreachable=Connection("fake://nowhere", "admin", "secret"),
        )
    finally:
        remove_fake_host(ADDRESS)
