"""Many running appliance VMs: a fleet per contender, booted a few at a time.

Under TCG every boot costs CPU (the guest's ~2 s of uptime is emulated), so VMs are
started at most ``BOOTING`` at a time: the next starts when one reaches its ready line.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.api_thinvisor import HEADLESS, MEMORY_MIB, login, token_client
from bench.harness import wait_until
from bench.hosts import ThinvisorHost, gone, ready_uptime, rss_kib

BOOTING = 2  # one per core of the development machines
READY_TIMEOUT_S = 180.0


class Fleet(Protocol):
    """One contender's VMs by name: made, started, stopped, removed; their QEMU pids."""

    running: dict[str, int]

    def create(self, name: str) -> None: ...

    def start(self, name: str) -> None: ...

    def serial_log(self, name: str) -> Path: ...

    def stop(self, name: str) -> None: ...

    def delete(self, name: str) -> None: ...

    def manager_rss_kib(self) -> int: ...

    def clear(self) -> None: ...


class ThinvisorFleet:
    """Appliance VMs of ``MEMORY_MIB`` (``appliance: true``; q35, one vCPU, headless as
    libvirt's domains here) on a thinvisor host, driven through its REST API with an API
    token."""

    def __init__(self, host: ThinvisorHost) -> None:
        self.host = host
        self.client = token_client(host, login(host))
        self.running: dict[str, int] = {}
        self.defined: list[str] = []

    def create(self, name: str) -> None:
        body = {"name": name, "memory_mib": MEMORY_MIB, "appliance": True, "graphics": HEADLESS}
        self.host.wait_task(self.client, self.client.post("/vms", json=body))
        self.defined.append(name)

    def start(self, name: str) -> None:
        response = self.client.post(f"/vms/{name}/start")
        response.raise_for_status()
        self.running[name] = response.json()["pid"]

    def serial_log(self, name: str) -> Path:
        return self.host.serial_log(name)

    def stop(self, name: str) -> None:
        pid = self.running.pop(name, None)
        self.client.post(f"/vms/{name}/stop").raise_for_status()
        if pid is not None:
            wait_until(lambda: gone(pid), 30, f"{name}'s QEMU gone")

    def delete(self, name: str) -> None:
        self.client.delete(f"/vms/{name}").raise_for_status()
        self.defined.remove(name)

    def manager_rss_kib(self) -> int:
        """The agent's resident set."""
        return rss_kib(self.host.pid)

    def clear(self) -> None:
        """Stop and delete every VM of the fleet; what fails is left to the host's close."""
        each(self.stop, list(self.running))
        each(self.delete, list(self.defined))


def each(action: Callable[[str], None], names: list[str], workers: int = 8) -> None:
    """``action`` on every name, several at once; failures are ignored (callers clean up
    the rest another way)."""

    def quietly(name: str) -> None:
        with contextlib.suppress(Exception):
            action(name)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(quietly, names))


def launch(fleet: Fleet, name: str, create: bool) -> str | None:
    """Create (when asked) and start one VM; None, or why it did not start (after
    removing what was made)."""
    try:
        if create:
            fleet.create(name)
        fleet.start(name)
    except Exception as exc:
        if create:
            each(fleet.delete, [name])
        return f"{name} did not start: {exc}"
    return None


def qemu_rss_kib(fleet: Fleet) -> list[int]:
    return [rss_kib(pid) for pid in fleet.running.values()]


@dataclass
class Boot:
    """How a staggered boot ended: the VMs that reached their ready line, and why it
    stopped early (None when every VM asked for was booted)."""

    ready: list[str]
    stopped_by: str | None = None
    wall_s: float = 0.0


def boot(
    fleet: Fleet,
    names: Iterable[str],
    *,
    create: bool = True,
    refuse: Callable[[], str | None] = lambda: None,
    timeout: float = READY_TIMEOUT_S,
) -> Boot:
    """Create and start ``names`` at most ``BOOTING`` at a time, each when an earlier one
    is ready. Before each start ``refuse()`` may give a reason to start no more. A VM that
    cannot be started, or is not ready within ``timeout``, ends the boot (it is deleted)."""
    result = Boot([])
    started = time.monotonic()
    todo = list(names)
    booting: dict[str, float] = {}
    while todo or booting:
        while todo and len(booting) < BOOTING and result.stopped_by is None:
            result.stopped_by = refuse()
            if result.stopped_by is None:
                name = todo.pop(0)
                result.stopped_by = launch(fleet, name, create)
                if result.stopped_by is None:
                    booting[name] = time.monotonic()
        if result.stopped_by is not None:
            todo.clear()
        for name, since in list(booting.items()):
            if ready_uptime(fleet.serial_log(name)) is not None:
                result.ready.append(name)
                del booting[name]
            elif time.monotonic() - since > timeout:
                result.stopped_by = f"{name} was not ready within {timeout:g} s"
                del booting[name]
                each(fleet.stop, [name])
                each(fleet.delete, [name])
        time.sleep(0.05)
    result.wall_s = time.monotonic() - started
    return result
