"""Entering the network namespace the host's VM networking lives in (``[network]
namespace``).

A thread's network namespace is inherited by the threads and processes it creates, so
the agent enters it once, early, after binding its API sockets and before any worker
thread, QEMU or dnsmasq is started.
"""

from __future__ import annotations

import os
import socket
import threading

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
    global _outside  # noqa: PLW0603 (one per process, set once before any thread starts)
    path = namespace_path(namespace)
    if not os.path.exists(path):
        if namespace.startswith("/"):
            raise InvalidConfig(f"network.namespace: {path} does not exist")
        try:
            netns.create(namespace)
        except OSError as exc:
            raise InvalidConfig(f"network.namespace: cannot create {path}: {exc}") from exc
    outside = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.setns(path, flags=0)
    except OSError as exc:
        os.close(outside)
        raise InvalidConfig(f"network.namespace: cannot enter {path}: {exc}") from exc
    _outside = outside


# The namespace the agent was started in (where its API listens), once it has left it.
_outside: int | None = None


def outside_socket(family: int) -> socket.socket:
    """A TCP socket in the namespace the agent was started in: connections to other
    hosts (a live migration's) leave from there, not from the VMs' namespace."""
    if _outside is None:
        return socket.socket(family, socket.SOCK_STREAM)
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:  # setns moves this thread only; it ends right after
        try:
            netns.setns(_outside, flags=0)
            made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=make, name="outside-socket")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]
