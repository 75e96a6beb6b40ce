"""A private network of namespaces for tests of the center and its hosts.

The lab is a bridge in a namespace of its own (where the center runs) and, for each
node, a namespace of its own joined to the bridge by a veth pair with its own address.
Both ends of every veth are made inside the lab's namespaces (``ip -n``): the machine's
own network is never touched. Closing the lab kills what still runs in its namespaces (by
pid) and removes them, which removes the bridge and every veth with them.

Processes of the test itself reach into a namespace with ``in_namespace``: a thread that
enters it (``setns`` affects that thread only) and runs a function there.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import netns

from tests.functional.netenv import NetNamespace

T = TypeVar("T")


@dataclass(frozen=True)
class LabNode:
    ns: NetNamespace
    address: str


class Lab:
    """A bridge at ``<prefix>.1`` in the center's namespace; nodes from ``<prefix>.11`` up."""

    __test__ = False

    def __init__(self) -> None:
        self.prefix = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        self.center = LabNode(NetNamespace(), f"{self.prefix}.1")
        self.nodes: list[LabNode] = []
        self.center.ns.run("ip", "link", "add", "br0", "type", "bridge")
        self.center.ns.run("ip", "addr", "add", f"{self.center.address}/24", "dev", "br0")
        self.center.ns.run("ip", "link", "set", "br0", "up")

    def add_node(self) -> LabNode:
        """A new namespace with its own address on the lab's bridge."""
        node = LabNode(NetNamespace(), f"{self.prefix}.{11 + len(self.nodes)}")
        port = f"lab{len(self.nodes)}"
        _ip(self.center.ns.name, "link", "add", port, "type", "veth",
            "peer", "name", "eth0", "netns", node.ns.name)  # fmt: skip
        _ip(self.center.ns.name, "link", "set", port, "master", "br0", "up")
        node.ns.run("ip", "addr", "add", f"{node.address}/24", "dev", "eth0")
        node.ns.run("ip", "link", "set", "eth0", "up")
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in [*self.nodes, self.center]:
            node.ns.close()


def _ip(namespace: str, *argv: str) -> None:
    subprocess.run(["ip", "-n", namespace, *argv], check=True, capture_output=True, timeout=30)


def in_namespace(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by a thread inside the network namespace ``name``; its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            netns.setns(name)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"in {name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
