"""Keeping the center's inventory in step with every host it manages.

One ``HostSync`` per host runs for as long as the host is registered: it connects, takes
a full inventory snapshot, then follows the host's change events (where the provider has
them), takes a snapshot again every ``refresh_interval_s`` and pings the host every
``ping_interval_s``. The first of these to fail (no answer within ``ping_timeout_s``, the
event stream lost, an error) marks the host disconnected: its VMs are shown as unknown,
nothing is deleted. It is then tried again, 1 s later and twice as long each time up to
``reconnect_max_s``; once back, a full snapshot resyncs it (by each VM's provider id, so
nothing is lost or listed twice).

Operations reach the host through ``HostSync.provider()``, which raises ``Disconnected``
while the host is away, so that nothing is attempted against a host the center cannot see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from thinvisor.center.config import SyncConfig
from thinvisor.errors import Disconnected, ThinvisorError
from thinvisor.host.events import EventLog
from thinvisor.providers.base import (
    Capability,
    ChangeEvent,
    ChangeKind,
    HostRecord,
    InventorySnapshot,
    Provider,
    VmRecord,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

RECONNECT_FIRST_S = 1.0
#: How long one full snapshot may take before the host counts as not answering.
SNAPSHOT_TIMEOUT_S = 120.0


class SyncStore(Protocol):
    """What a ``HostSync`` writes: the inventory's sync methods (called in threads)."""

    def apply_snapshot(
        self, host_id: int, snap: InventorySnapshot, begun: float | None = None
    ) -> object: ...
    def apply_vm(self, host_id: int, vm: VmRecord) -> object: ...
    def remove_vm(self, host_id: int, ext_id: str) -> bool: ...
    def set_host_connected(self, host_id: int, record: HostRecord) -> object: ...
    def set_host_disconnected(self, host_id: int, error: str) -> object: ...


class HostSync:
    """Follows one host; ``run()`` until cancelled."""

    def __init__(
        self,
        host_id: int,
        name: str,
        open_provider: Callable[[], Provider],
        store: SyncStore,
        events: EventLog,
        config: SyncConfig,
    ) -> None:
        self.host_id = host_id
        self.name = name
        self._open = open_provider
        self._store = store
        self._events = events
        self._config = config
        self._provider: Provider | None = None
        self.error: str | None = "not connected yet"
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ever = False  # connected at least once
        self._reached = False  # connected in the current attempt
        self._writes: set[asyncio.Future[Any]] = set()

    @property
    def connected(self) -> bool:
        return self._provider is not None

    def provider(self) -> Provider:
        """The connected provider; ``Disconnected`` naming the host and why if none."""
        if self._provider is None:
            raise Disconnected(f"host {self.name!r} is disconnected: {self.error}")
        return self._provider

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the host is connected (``Disconnected`` once ``timeout`` passed)."""
        try:
            await within(timeout, self._connected.wait())
        except TimeoutError:
            raise Disconnected(f"host {self.name!r} is disconnected: {self.error}") from None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"sync {self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop()
        # A write a cancellation left running in its thread ends before the database may
        # be closed.
        await asyncio.gather(*self._writes, return_exceptions=True)

    async def _write(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on the inventory, in a worker thread; ``stop`` waits for it."""
        write = asyncio.ensure_future(asyncio.to_thread(call, *args))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        return await asyncio.shield(write)

    async def run(self) -> None:
        """Connect, follow, and after every loss connect again, backing off."""
        delay = RECONNECT_FIRST_S
        while True:
            self._reached = False
            try:
                await self._session()
            except* (ThinvisorError, TimeoutError, OSError) as group:
                await self._lost(_reason(group))
            if self._reached:
                delay = RECONNECT_FIRST_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._config.reconnect_max_s)

    async def refresh(self) -> None:
        """Take a full snapshot now (after an operation that changed a lot, say)."""
        await self._resync(self.provider())

    async def _resync(self, provider: Provider) -> InventorySnapshot:
        """Take a full snapshot and apply it, saying when it was begun: a VM whose move
        ended meanwhile is where the move left it, whatever the snapshot says."""
        begun = time.monotonic()
        snap = await within(SNAPSHOT_TIMEOUT_S, provider.snapshot())
        await self._write(self._store.apply_snapshot, self.host_id, snap, begun)
        return snap

    async def _session(self) -> None:
        # Opening reads (and decrypts) the host's password from the database: a thread.
        provider = await asyncio.to_thread(self._open)
        try:
            await within(self._config.ping_timeout_s * 2, provider.connect())
            snap = await self._resync(provider)
        except BaseException:
            await _close(provider)
            raise
        self._provider, self.error = provider, None
        self._connected.set()
        verb = "reconnected" if self._ever else "connected"
        self._ever = self._reached = True
        self._emit("host.connected", f"host {self.name!r} {verb}: {len(snap.vms)} VMs")
        loops: list[Callable[[Provider], Coroutine[Any, Any, None]]] = [self._ping, self._refresh]
        if Capability.EVENTS in provider.capabilities:
            loops.append(self._follow)
        async with asyncio.TaskGroup() as group:
            for loop in loops:
                group.create_task(loop(provider))

    async def _ping(self, provider: Provider) -> None:
        while True:
            await asyncio.sleep(self._config.ping_interval_s)
            await within(self._config.ping_timeout_s, provider.ping())

    async def _refresh(self, provider: Provider) -> None:
        while True:
            await asyncio.sleep(self._config.refresh_interval_s)
            await self._resync(provider)

    async def _follow(self, provider: Provider) -> None:
        async for change in provider.events():
            await self._apply(provider, change)
        raise Disconnected("the host's event stream ended")

    async def _apply(self, provider: Provider, change: ChangeEvent) -> None:
        if change.kind is ChangeKind.RESYNC:
            await self._resync(provider)
        elif change.kind is ChangeKind.VM_CHANGED and change.vm is not None:
            await self._write(self._store.apply_vm, self.host_id, change.vm)
        elif change.kind is ChangeKind.VM_REMOVED and change.vm_id is not None:
            await self._write(self._store.remove_vm, self.host_id, change.vm_id)
        elif change.kind is ChangeKind.HOST_CHANGED and change.host is not None:
            await self._write(self._store.set_host_connected, self.host_id, change.host)
        vm = change.vm.name if change.vm is not None else change.vm_id
        self._emit(
            event_kind(change),
            f"{self.name}: {change.message}",
            vm=vm,
            user=change.user,
            peer_kind=change.peer_kind,
        )

    async def _lost(self, reason: str) -> None:
        # Said once per loss (and once if it never answered since the center started).
        first = self.error is None or not self._ever
        self.error = reason
        self._connected.clear()
        await self._drop()
        await self._write(self._store.set_host_disconnected, self.host_id, reason)
        if first:
            log.warning("host %s disconnected: %s", self.name, reason)
            self._emit("host.disconnected", f"host {self.name!r} disconnected: {reason}")

    async def _drop(self) -> None:
        provider, self._provider = self._provider, None
        if provider is not None:
            await _close(provider)

    def _emit(
        self,
        kind: str,
        message: str,
        *,
        vm: str | None = None,
        user: str | None = None,
        peer_kind: str | None = None,
    ) -> None:
        obj = f"host/{self.name}" + (f"/vm/{vm}" if vm else "")
        data = {"host": self.name} | ({"peer_kind": peer_kind} if peer_kind else {})
        self._events.emit(kind, message, object=obj, user=user, data=data)


#: The center's event kind for each kind of change, where the peer's own kind is not one.
_CHANGE_KINDS = {
    ChangeKind.VM_CHANGED: "vm.changed",
    ChangeKind.VM_REMOVED: "vm.removed",
    ChangeKind.HOST_CHANGED: "host.changed",
    ChangeKind.RESYNC: "host.resync",
}


def event_kind(change: ChangeEvent) -> str:
    """The kind of the center's event for a host's change, the same whatever the provider:
    ``vm.*`` for a VM's, ``host.*`` for the host's. A peer's own kind is kept where it
    is such a kind already (a thinvisor host's ``vm.powered_on``); else the change's
    (``vm.changed`` for a vSphere VM's ``modify``). The peer's kind stays in the event's
    data, as ``peer_kind``."""
    peer = change.peer_kind
    if peer and peer.startswith(("vm.", "host.")):
        return peer
    return _CHANGE_KINDS[change.kind]


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or ``TimeoutError`` once ``seconds`` passed.

    Not ``asyncio.wait_for``: on Python 3.11 it returns the result of an awaitable that
    finished just as the caller was cancelled, and the cancellation is lost (a sync that
    then never stops)."""
    async with asyncio.timeout(seconds):
        return await awaitable


def _reason(group: BaseExceptionGroup[BaseException]) -> str:
    """The first failure of a group, as one line."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


async def _close(provider: Provider) -> None:
    try:
        await provider.close()
    except (ThinvisorError, OSError) as exc:
        log.debug("closing %s: %s", provider.connection.address, exc)


class SyncManager:
    """Every host's ``HostSync``, by host id."""

    def __init__(self) -> None:
        self._syncs: dict[int, HostSync] = {}

    def add(self, sync: HostSync) -> None:
        self._syncs[sync.host_id] = sync
        sync.start()

    def get(self, host_id: int) -> HostSync:
        sync = self._syncs.get(host_id)
        if sync is None:
            raise Disconnected(f"host {host_id} is not being followed")
        return sync

    async def remove(self, host_id: int) -> None:
        sync = self._syncs.pop(host_id, None)
        if sync is not None:
            await sync.stop()

    async def close(self) -> None:
        for host_id in list(self._syncs):
            await self.remove(host_id)
