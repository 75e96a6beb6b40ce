"""The thinvisor provider's peer: a real ``thinvisor host serve`` on loopback, holding
an appliance VM and a template made from one (both 64 MiB, stopped)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.functional.agentenv import PASSWORD, TestAgent
from tests.functional.conftest import CACHE_ENV, DEFAULT_TEST_CACHE
from tests.functional.hostenv import READY, TestHost
from tests.peers.contract import Peer
from thinvisor.appliance import build_appliance
from thinvisor.providers.base import Connection
from thinvisor.tls import fingerprint

VM = "appliance"
TEMPLATE = "tpl-appliance"
MEMORY_MIB = 64


def fresh_boots(agent: TestAgent, vm: str) -> int:
    """How often the agent has powered ``vm`` on from stopped (each boot prints one
    ready line on the serial log, which QEMU appends to)."""
    with agent.client() as client:
        answer = client.get("/events", params={"object": f"vm/{vm}", "kind": "vm.powered_on",
                                               "limit": 10_000})  # fmt: skip
    answer.raise_for_status()
    return sum(1 for e in answer.json() if e["message"] == "powered on")


def ready_waiter(agent: TestAgent) -> Callable[[str], None]:
    def ready(vm: str) -> None:
        """Wait for the ready line of the VM's latest boot."""
        agent.host.wait_for(vm, READY.pattern, count=fresh_boots(agent, vm), timeout=60)

    return ready


@pytest.fixture(scope="session")
def thinvisor_peer() -> Iterator[Peer]:
    """An agent with ``appliance`` (a stopped appliance VM) and ``tpl-appliance``."""
    cache = Path(os.environ.get(CACHE_ENV) or DEFAULT_TEST_CACHE)
    host = TestHost(build_appliance(cache))
    agent = TestAgent(host)
    try:
        host.create(VM, start=False, memory_mib=MEMORY_MIB)
        host.create(TEMPLATE, start=False, memory_mib=MEMORY_MIB, template=True)
        agent.start()
        address = f"https://127.0.0.1:{agent.port}"
        pinned = fingerprint(agent.cert)
        yield Peer(
            kind="thinvisor",
            connection=Connection(address, "admin", PASSWORD, pinned),
            vm=VM,
            template=TEMPLATE,
            network="user",
            wrong_password=Connection(address, "admin", "not-" + PASSWORD, pinned),
            ready=ready_waiter(agent),
        )
    finally:
        agent.close()
        host.close()
