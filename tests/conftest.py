"""Fixtures every tier may use: the center's real peers (``tests/peers``), each started
once per session by the first test that asks for it."""

from __future__ import annotations

pytest_plugins = [
    "tests.peers.postgres",
    "tests.peers.peer_fake",
    "tests.peers.peer_thinvisor",
    "tests.peers.peer_libvirt",
    "tests.peers.peer_vsphere",
]
