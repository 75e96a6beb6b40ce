"""Entering the network namespace the host's VM networking lives in (``[network]
namespace``).

A thread's network namespace is inherited by the threads and processes it creates, so
the agent enters it once, early, after binding its API sockets and before any worker
thread, QEMU or dnsmasq is started.
"""

from __future__ import annotations

import os

from pyroute2 import netns

from thinvisor.errors import InvalidConfig


def namespace_path(namespace: str) -> str:
    """The file of a namespace given by name (``/run/netns/<name>``) or by path."""
    return namespace if namespace.startswith("/") else f"/run/netns/{namespace}"


def enter(namespace: str | None) -> None:
    """Move the calling thread into ``namespace``; nothing when it is None.

    A namespace given by name is created when missing (``/run/netns`` does not survive
    a reboot, and the agent rebuilds the switches in it); one given by path must exist.
    """
    if namespace is None:
        return
    path = namespace_path(namespace)
    if not os.path.exists(path):
        if namespace.startswith("/"):
            raise InvalidConfig(f"network.namespace: {path} does not exist")
        try:
            netns.create(namespace)
        except OSError as exc:
            raise InvalidConfig(f"network.namespace: cannot create {path}: {exc}") from exc
    try:
        netns.setns(path, flags=0)
    except OSError as exc:
        raise InvalidConfig(f"network.namespace: cannot enter {path}: {exc}") from exc
