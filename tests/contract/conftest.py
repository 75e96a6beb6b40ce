"""The contract suite's peers: every test in ``tests/contract`` runs once per provider.

Each kind's peer is a fixture ``<kind>_peer`` in its own module under ``tests/peers``
(``peer_<kind>.py``, loaded by ``tests/conftest.py``), started once per session and
yielding a ``Peer``.
"""

from __future__ import annotations

import pytest

from tests.peers.contract import Peer

KINDS = ["fake", "thinvisor", "libvirt", "vsphere"]


@pytest.fixture(params=KINDS)
def peer(request: pytest.FixtureRequest) -> Peer:
    """One provider's peer; the test runs once per kind."""
    found: Peer = request.getfixturevalue(f"{request.param}_peer")
    return found
