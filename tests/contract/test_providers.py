"""The provider contract: every provider kind passes the same tests against its peer.

Each test opens its own provider on the session's peer (a real thinvisor agent, libvirtd,
the vSphere simulator, or the in-memory fake). What a provider claims in
``capabilities`` is exercised for real; what it lacks must raise ``Unsupported``.
Every VM a test makes is removed again; ``peer.vm`` is left stopped, as found.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, ParamSpec

import pytest

from tests.peers.contract import Peer
from thinvisor.errors import (
    CertificateMismatch,
    CredentialsRefused,
    InvalidState,
    NotFound,
    Unreachable,
    Unsupported,
)
from thinvisor.providers.base import (
    Capability,
    ChangeEvent,
    ChangeKind,
    ConsoleKind,
    CreateVm,
    HostRecord,
    InventorySnapshot,
    PowerAction,
    PowerState,
    Provider,
    Reconfigure,
    VmRecord,
)

P = ParamSpec("P")

SMALL_MIB = 64
EVENT_WAIT_S = 20.0
UNREACHABLE_WAIT_S = 10.0
SUBSCRIBE_S = 1.0  # time a fresh event stream is given to subscribe before the action
MISSING_ID = "no-such-vm-0c1d2e"
OTHER_FINGERPRINT = ":".join(["5A"] * 32)


def run_async(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """A coroutine test run to completion in a fresh event loop."""

    @functools.wraps(test)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


@contextlib.asynccontextmanager
async def connected(peer: Peer) -> AsyncIterator[Provider]:
    """A provider of the peer, connected, closed afterwards."""
    provider = peer.provider()
    try:
        await provider.connect()
        yield provider
    finally:
        await provider.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def find_vm(snap: InventorySnapshot, ref: str) -> VmRecord | None:
    """The VM whose id, or else whose name, is ``ref``."""
    by_id = (vm for vm in snap.vms if vm.id == ref)
    by_name = (vm for vm in snap.vms if vm.name == ref)
    return next(by_id, None) or next(by_name, None)


async def resolve(provider: Provider, ref: str) -> VmRecord:
    """The peer's VM (or template) named ``ref`` (an id or a name), as listed now."""
    found = find_vm(await provider.snapshot(), ref)
    assert found is not None, f"{ref!r} is not in the snapshot"
    return found


async def remove_quietly(provider: Provider, vm_id: str) -> None:
    """Clean-up: delete a VM the test made (stopping it first), if it is still there."""
    with contextlib.suppress(NotFound, InvalidState, Unsupported):
        await provider.power(vm_id, PowerAction.STOP)
    with contextlib.suppress(NotFound, Unsupported):
        await provider.delete(vm_id)


def needs(peer: Peer, capability: Capability) -> None:
    if capability not in peer.provider().capabilities:
        pytest.skip(f"the {peer.kind} provider has no {capability.value} (tested as Unsupported)")


# --- Connecting -----------------------------------------------------------------------


@run_async
async def test_connect_reports_host(peer: Peer) -> None:
    async with connected(peer) as provider:
        host = await provider.connect()  # connecting again is harmless
        await provider.ping()
    assert isinstance(host, HostRecord)
    assert host.vendor.split("/")[0] == peer.kind
    assert host.name
    assert host.cpus >= 1
    assert host.memory_mib > 0


def test_capabilities_are_flags(peer: Peer) -> None:
    caps = peer.provider().capabilities
    assert isinstance(caps, frozenset)
    assert caps and all(isinstance(c, Capability) for c in caps)
    assert (peer.template is not None) == (Capability.TEMPLATES in caps)


@run_async
async def test_snapshot_lists_stopped_vm(peer: Peer) -> None:
    async with connected(peer) as provider:
        snap = await provider.snapshot()
    assert snap.host.vendor.split("/")[0] == peer.kind
    vm = find_vm(snap, peer.vm)
    assert vm is not None, f"{peer.vm!r} not in {[v.name for v in snap.vms]}"
    assert vm.power_state == PowerState.STOPPED
    assert not vm.template
    assert vm.cpus >= 1 and vm.memory_mib > 0
    assert len({v.id for v in snap.vms}) == len(snap.vms), "VM ids are not unique"
    stores, networks = {d.name for d in snap.datastores}, {n.name for n in snap.networks}
    for each in snap.vms:  # the center links VMs to these by name
        assert set(each.datastores) <= stores, f"{each.name}: {each.datastores} not in {stores}"
        assert set(each.networks) <= networks, f"{each.name}: {each.networks} not in {networks}"
    if peer.template is not None:
        template = find_vm(snap, peer.template)
        assert template is not None and template.template


@run_async
async def test_close_is_idempotent(peer: Peer) -> None:
    provider = peer.provider()
    await provider.close()  # never connected
    await provider.connect()
    await provider.close()
    await provider.close()


# --- Bad input ------------------------------------------------------------------------


@run_async
async def test_certificate_is_pinned(peer: Peer) -> None:
    """Where the peer has a certificate, one not pinned is refused, naming the one seen."""
    pinned = peer.connection.fingerprint
    if pinned is None:
        pytest.skip(f"the {peer.kind} peer has no certificate to pin")
    for given in (None, OTHER_FINGERPRINT):
        provider = peer.provider(dataclasses.replace(peer.connection, fingerprint=given))
        try:
            with pytest.raises(CertificateMismatch) as caught:
                await provider.connect()
        finally:
            await provider.close()
        assert caught.value.seen.upper() == pinned.upper()
        assert (caught.value.pinned or "").upper() == (given or "").upper()


@run_async
async def test_wrong_password_is_refused(peer: Peer) -> None:
    if peer.wrong_password is None:
        pytest.skip(f"the {peer.kind} peer takes no credentials")
    provider = peer.provider(peer.wrong_password)
    try:
        with pytest.raises(CredentialsRefused):
            await provider.connect()
    finally:
        await provider.close()


@run_async
async def test_unreachable_address_fails_fast(peer: Peer) -> None:
    provider = peer.provider(peer.unreachable)
    started = time.monotonic()
    try:
        with pytest.raises(Unreachable):
            await asyncio.wait_for(provider.connect(), UNREACHABLE_WAIT_S)
        with pytest.raises(Unreachable):
            await asyncio.wait_for(provider.ping(), UNREACHABLE_WAIT_S)
    finally:
        await provider.close()
    assert time.monotonic() - started < UNREACHABLE_WAIT_S


def _calls_on(vm_id: str) -> dict[Capability, Callable[[Provider], Awaitable[object]]]:
    """One call per capability that names a VM."""
    return {
        Capability.POWER: lambda p: p.power(vm_id, PowerAction.START),
        Capability.SUSPEND: lambda p: p.power(vm_id, PowerAction.PAUSE),
        Capability.DELETE: lambda p: p.delete(vm_id),
        Capability.RECONFIGURE: lambda p: p.reconfigure(vm_id, Reconfigure(memory_mib=128)),
        Capability.CLONE: lambda p: p.clone(vm_id, unique("ct-clone")),
        Capability.SNAPSHOT: lambda p: p.snapshots(vm_id),
        Capability.CONSOLE: lambda p: p.console(vm_id, ConsoleKind.SERIAL),
    }


@run_async
async def test_unknown_vm_is_not_found(peer: Peer) -> None:
    async with connected(peer) as provider:
        calls = _calls_on(MISSING_ID)
        tried = [c for c in calls if c in provider.capabilities]
        for capability in tried:
            with pytest.raises(NotFound):
                await calls[capability](provider)
        if Capability.TEMPLATES in provider.capabilities:
            with pytest.raises(NotFound):
                await provider.create(CreateVm(unique("ct-tpl"), template=MISSING_ID))
    if not tried:
        pytest.skip(f"the {peer.kind} provider has no call naming a VM")


# --- What a provider lacks ------------------------------------------------------------


def _every_call(vm_id: str) -> dict[Capability, Callable[[Provider], Awaitable[object]]]:
    calls = _calls_on(vm_id)
    calls[Capability.CREATE] = lambda p: p.create(CreateVm(unique("ct-new"), memory_mib=SMALL_MIB))
    calls[Capability.TEMPLATES] = lambda p: p.create(CreateVm(unique("ct-tpl"), template=vm_id))
    calls[Capability.MAINTENANCE] = lambda p: p.set_maintenance(True)
    return calls


@run_async
async def test_missing_capabilities_raise_unsupported(peer: Peer) -> None:
    async with connected(peer) as provider:
        vm = await resolve(provider, peer.vm)
        for capability, call in _every_call(vm.id).items():
            if capability not in provider.capabilities:
                with pytest.raises(Unsupported, match=capability.value):
                    await call(provider)
        if Capability.EVENTS not in provider.capabilities:
            with pytest.raises(Unsupported, match="events"):
                await anext(aiter(provider.events()))
        after = await resolve(provider, peer.vm)
    assert after.power_state == PowerState.STOPPED, "a refused call changed the VM"


# --- Power, consoles, events ----------------------------------------------------------


async def _check_consoles(provider: Provider, vm_id: str) -> None:
    """Every console kind gives an endpoint of that kind, or is Unsupported; one works."""
    working = []
    for kind in ConsoleKind:
        try:
            endpoint = await provider.console(vm_id, kind)
        except Unsupported:
            continue
        assert endpoint.kind == kind
        assert "://" in endpoint.url, endpoint.url
        if endpoint.url.startswith("wss://"):
            assert endpoint.fingerprint, "a TLS endpoint names the fingerprint to pin"
        working.append(kind)
    assert working, "CONSOLE is claimed but no console kind is offered"


@run_async
async def test_power_cycle(peer: Peer) -> None:
    needs(peer, Capability.POWER)
    async with connected(peer) as provider:
        vm = await resolve(provider, peer.vm)
        try:
            started = await provider.power(vm.id, PowerAction.START)
            assert started.id == vm.id
            assert started.power_state == PowerState.RUNNING
            assert (await resolve(provider, vm.id)).power_state == PowerState.RUNNING
            if peer.ready is not None:
                await asyncio.to_thread(peer.ready, vm.id)
            with pytest.raises(InvalidState):
                await provider.power(vm.id, PowerAction.START)
            if Capability.SUSPEND in provider.capabilities:
                paused = await provider.power(vm.id, PowerAction.PAUSE)
                assert paused.power_state == PowerState.PAUSED
                resumed = await provider.power(vm.id, PowerAction.RESUME)
                assert resumed.power_state == PowerState.RUNNING
            if Capability.CONSOLE in provider.capabilities:
                await _check_consoles(provider, vm.id)
        finally:
            with contextlib.suppress(InvalidState):
                stopped = await provider.power(vm.id, PowerAction.STOP)
        assert stopped.power_state == PowerState.STOPPED
        assert (await resolve(provider, vm.id)).power_state == PowerState.STOPPED


class EventLog:
    """What a provider's event stream says, collected by a task of its own."""

    def __init__(self, provider: Provider) -> None:
        self.seen: list[ChangeEvent] = []
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._collect(provider.events()))

    async def _collect(self, stream: AsyncIterator[ChangeEvent]) -> None:
        try:
            async for event in stream:
                self.seen.append(event)
                self._changed.set()
        except Exception as exc:  # kept for the assertion that waits
            self.error = exc
            self._changed.set()

    async def wait_for(self, what: str, match: Callable[[ChangeEvent], bool]) -> ChangeEvent:
        """The first event so far (or within ``EVENT_WAIT_S``) that ``match``es."""
        deadline = time.monotonic() + EVENT_WAIT_S
        while True:
            found = [e for e in self.seen if match(e)]
            if found:
                return found[0]
            assert self.error is None, f"the event stream failed: {self.error!r}"
            left = deadline - time.monotonic()
            assert left > 0, f"no event {what} in {EVENT_WAIT_S} s; seen: {self.seen}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def names(vm_id: str) -> Callable[[ChangeEvent], bool]:
    """Whether an event is about the VM ``vm_id``."""

    def match(event: ChangeEvent) -> bool:
        return event.vm_id == vm_id or (event.vm is not None and event.vm.id == vm_id)

    return match


@run_async
async def test_events_follow_power_actions(peer: Peer) -> None:
    needs(peer, Capability.EVENTS)
    needs(peer, Capability.POWER)
    async with connected(peer) as provider:
        vm = await resolve(provider, peer.vm)
        log = EventLog(provider)
        try:
            await asyncio.sleep(SUBSCRIBE_S)
            await provider.power(vm.id, PowerAction.START)
            event = await log.wait_for(f"naming {vm.id} after start", names(vm.id))
            assert event.kind == ChangeKind.VM_CHANGED and event.message
            mark = len(log.seen)
            await provider.power(vm.id, PowerAction.STOP)
            event = await log.wait_for(
                f"showing {vm.id} stopped",
                lambda e: (
                    e in log.seen[mark:]
                    and names(vm.id)(e)
                    and e.vm is not None
                    and e.vm.power_state == PowerState.STOPPED
                ),
            )
            assert event.vm == await resolve(provider, vm.id)
        finally:
            await log.close()
            with contextlib.suppress(InvalidState):
                await provider.power(vm.id, PowerAction.STOP)


@run_async
async def test_events_start_at_connect(peer: Peer) -> None:
    """A change made after ``connect()`` but before ``events()`` is streamed: the center
    connects, takes a snapshot, then follows the events, and must miss nothing between."""
    needs(peer, Capability.EVENTS)
    needs(peer, Capability.POWER)
    async with connected(peer) as provider:
        vm = await resolve(provider, peer.vm)
        try:
            await provider.power(vm.id, PowerAction.START)
        finally:
            with contextlib.suppress(InvalidState):
                await provider.power(vm.id, PowerAction.STOP)
        log = EventLog(provider)
        try:
            await log.wait_for(f"naming {vm.id}, made before the stream", names(vm.id))
        finally:
            await log.close()


# --- Creating, cloning, reconfiguring, deleting ---------------------------------------


async def _check_gone(provider: Provider, vm: VmRecord) -> None:
    await provider.delete(vm.id)
    assert find_vm(await provider.snapshot(), vm.id) is None
    with pytest.raises(NotFound):
        await provider.delete(vm.id)


@run_async
async def test_create_from_scratch(peer: Peer) -> None:
    needs(peer, Capability.CREATE)
    name = unique("ct-new")
    spec = CreateVm(name, cpus=1, memory_mib=SMALL_MIB, disk_mib=16, network=peer.network)
    async with connected(peer) as provider:
        vm = await provider.create(spec)
        try:
            assert (vm.name, vm.cpus, vm.memory_mib) == (name, 1, SMALL_MIB)
            assert vm.power_state == PowerState.STOPPED and not vm.template
            if peer.network is not None:
                assert peer.network in vm.networks
            assert find_vm(await provider.snapshot(), vm.id) == vm
        finally:
            await remove_quietly(provider, vm.id)


@run_async
async def test_create_from_template(peer: Peer) -> None:
    needs(peer, Capability.TEMPLATES)
    assert peer.template is not None
    name = unique("ct-tpl")
    async with connected(peer) as provider:
        template = await resolve(provider, peer.template)
        vm = await provider.create(CreateVm(name, memory_mib=SMALL_MIB, template=template.id))
        try:
            assert vm.name == name and vm.id != template.id
            assert not vm.template and vm.power_state == PowerState.STOPPED
            assert vm.memory_mib == SMALL_MIB
            assert find_vm(await provider.snapshot(), vm.id) == vm
            assert (await resolve(provider, template.id)).template, "the template changed"
            if Capability.POWER in provider.capabilities:
                with pytest.raises(InvalidState):
                    await provider.power(template.id, PowerAction.START)
        finally:
            await remove_quietly(provider, vm.id)


@run_async
async def test_clone(peer: Peer) -> None:
    needs(peer, Capability.CLONE)
    name = unique("ct-clone")
    async with connected(peer) as provider:
        source = await resolve(provider, peer.vm)
        vm = await provider.clone(source.id, name)
        try:
            assert vm.name == name and vm.id != source.id
            assert vm.power_state == PowerState.STOPPED
            assert (vm.cpus, vm.memory_mib) == (source.cpus, source.memory_mib)
            assert find_vm(await provider.snapshot(), vm.id) == vm
        finally:
            await remove_quietly(provider, vm.id)


@run_async
async def test_reconfigure_memory(peer: Peer) -> None:
    needs(peer, Capability.RECONFIGURE)
    async with connected(peer) as provider:
        vm = await resolve(provider, peer.vm)
        wanted = vm.memory_mib + SMALL_MIB
        try:
            changed = await provider.reconfigure(vm.id, Reconfigure(memory_mib=wanted))
            assert (changed.memory_mib, changed.cpus) == (wanted, vm.cpus)
            assert (await resolve(provider, vm.id)).memory_mib == wanted
        finally:
            back = await provider.reconfigure(vm.id, Reconfigure(memory_mib=vm.memory_mib))
        assert back.memory_mib == vm.memory_mib


async def make_vm(provider: Provider, peer: Peer) -> VmRecord:
    """A new stopped VM, made whichever way the provider can."""
    name = unique("ct-del")
    if Capability.CREATE in provider.capabilities:
        return await provider.create(CreateVm(name, memory_mib=SMALL_MIB))
    if Capability.CLONE in provider.capabilities:
        return await provider.clone((await resolve(provider, peer.vm)).id, name)
    if Capability.TEMPLATES in provider.capabilities and peer.template is not None:
        template = await resolve(provider, peer.template)
        return await provider.create(CreateVm(name, template=template.id))
    pytest.skip(f"the {peer.kind} provider cannot make a VM to delete")


@run_async
async def test_delete(peer: Peer) -> None:
    needs(peer, Capability.DELETE)
    async with connected(peer) as provider:
        vm = await make_vm(provider, peer)
        try:
            await _check_gone(provider, vm)
        finally:
            await remove_quietly(provider, vm.id)


# --- Snapshots ------------------------------------------------------------------------


@run_async
async def test_snapshots(peer: Peer) -> None:
    needs(peer, Capability.SNAPSHOT)
    async with connected(peer) as provider:
        vm = await resolve(provider, peer.vm)
        before = {s.id for s in await provider.snapshots(vm.id)}
        made = await provider.create_snapshot(vm.id, "ct-one")
        try:
            assert made.name == "ct-one" and made.id not in before
            listed = {s.id: s for s in await provider.snapshots(vm.id)}
            assert listed[made.id].name == "ct-one"
            reverted = await provider.revert_snapshot(vm.id, made.id)
            assert reverted.id == made.id
            assert (await resolve(provider, vm.id)).power_state == PowerState.STOPPED
            with pytest.raises(NotFound):
                await provider.revert_snapshot(vm.id, "no-such-snapshot")
        finally:
            await provider.delete_snapshot(vm.id, made.id)
        assert {s.id for s in await provider.snapshots(vm.id)} == before
        with pytest.raises(NotFound):
            await provider.delete_snapshot(vm.id, made.id)


# --- Consoles and maintenance ---------------------------------------------------------


@run_async
async def test_console_without_power(peer: Peer) -> None:
    """Where POWER is missing the console is checked here (else on the running VM)."""
    needs(peer, Capability.CONSOLE)
    if Capability.POWER in peer.provider().capabilities:
        pytest.skip("checked on the running VM by test_power_cycle")
    async with connected(peer) as provider:
        await _check_consoles(provider, (await resolve(provider, peer.vm)).id)


@run_async
async def test_maintenance(peer: Peer) -> None:
    needs(peer, Capability.MAINTENANCE)
    async with connected(peer) as provider:
        try:
            host = await provider.set_maintenance(True)
            assert host.maintenance
            assert (await provider.snapshot()).host.maintenance
        finally:
            host = await provider.set_maintenance(False)
        assert not host.maintenance
