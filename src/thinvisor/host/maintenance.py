"""Maintenance mode, as on ESXi: a host with no VM running, where none may start.

The center evacuates a host first (moves or stops its VMs), then puts it in maintenance
mode; entering is refused while a VM still runs or is paused, or while one is on its way
here. In maintenance, powering on, resuming and incoming migrations are refused. The
mode is a file in the state directory, written atomically, so that it survives an
agent restart and every process of the host (the agent, a local CLI command) obeys it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from thinvisor.errors import Busy, InvalidConfig, QemuError
from thinvisor.fs import atomic_write
from thinvisor.host.context import current_user
from thinvisor.host.engine import process
from thinvisor.host.events import EventLog
from thinvisor.host.state import PowerState

if TYPE_CHECKING:
    from thinvisor.host.service import HostService

STATE_NAME = "maintenance.json"
# The records of incoming migrations (``thinvisor.host.incoming.RECORDS``): one per VM
# on its way here, gone once it has arrived or was abandoned.
INCOMING_RECORDS = "migrations"
# How long entering waits for an operation on a VM (a start, say) to end.
LOCK_WAIT_S = 30.0


def in_maintenance(state_dir: Path) -> bool:
    """Whether the host whose state directory is ``state_dir`` is in maintenance mode."""
    path = state_dir / STATE_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise InvalidConfig(f"{STATE_NAME}: {exc}") from exc
    return isinstance(data, dict) and data.get("maintenance") is True


def check_not_in_maintenance(state_dir: Path, what: str) -> None:
    """Refuse ``what`` (``"vm 'web1': cannot power on"``, say) in maintenance mode."""
    if in_maintenance(state_dir):
        raise Busy(f"{what}: the host is in maintenance mode")


def save(state_dir: Path, on: bool) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"maintenance": on, "since": time.time()}
    atomic_write(state_dir / STATE_NAME, json.dumps(data) + "\n", mode=0o600)


def arriving(state_dir: Path) -> list[str]:
    """The VMs on their way here by migration (their records), by name."""
    names = []
    for record in sorted((state_dir / INCOMING_RECORDS).glob("*.json")):
        try:
            names.append(str(json.loads(record.read_text())["vm"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(set(names))


def _listed(names: list[str]) -> str:
    return ", ".join(names)


class Maintenance:
    """Entering and leaving maintenance mode for the agent."""

    def __init__(self, service: HostService, events: EventLog) -> None:
        self.service = service
        self.events = events

    @property
    def state_dir(self) -> Path:
        return self.service.config.state_dir

    @property
    def active(self) -> bool:
        return in_maintenance(self.state_dir)

    async def set(self, on: bool) -> bool:
        """Enter (``on``) or leave maintenance mode; the mode now. Doing it twice is
        harmless; entering is refused with ``Busy`` while a VM runs or is paused."""
        if on == self.active:
            return on
        if on:
            await self._enter()
        else:
            save(self.state_dir, False)
            self._emit("host.maintenance_exited", "the host left maintenance mode")
        return on

    async def _enter(self) -> None:
        # The mode is written first: a start that takes a VM's lock after this refuses,
        # and one holding it now has ended by the time its VM is looked at below.
        save(self.state_dir, True)
        try:
            running = await self._running()
            if running:
                raise Busy(f"{_listed(running)} still run: move or stop them first")
            coming = arriving(self.state_dir)
            if coming:
                raise Busy(f"{_listed(coming)} still on the way here: let them arrive first")
        except BaseException:
            save(self.state_dir, False)
            raise
        self._emit("host.maintenance_entered", "the host entered maintenance mode")

    async def _running(self) -> list[str]:
        """The VMs that run or are paused, each looked at holding its lock."""
        running = []
        inventory = self.service.inventory
        for entry in inventory.entries():
            async with inventory.lock(entry.name, timeout=LOCK_WAIT_S):
                alive = process.running_pid(entry.paths) is not None
                if alive and entry.spec is not None:
                    try:
                        state, _, _ = await self.service.state_of(entry)
                    except QemuError:  # QEMU runs but does not say how: it runs
                        state = PowerState.RUNNING
                    alive = state in (PowerState.RUNNING, PowerState.PAUSED)
            if alive:
                running.append(entry.name)
        return running

    def _emit(self, kind: str, message: str) -> None:
        self.events.emit(kind, message, object="host", user=current_user.get())
