"""The vsphere provider beyond the contract suite: addresses, certificate pinning, the
endpoint as one host, placement of new VMs, gating, snapshot trees and the event stream.

Every test but the address ones talks to govmomi's vCenter simulator (``tests.peers.vcsim``),
one per module, with the model's VMs as they start: powered on. The tests make their own
VMs and remove them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tests.peers.vcsim import Vcsim, running
from thinvisor.errors import (
    CertificateMismatch,
    InvalidArgument,
    InvalidState,
    NotFound,
    Unreachable,
)
from thinvisor.providers.base import (
    ChangeEvent,
    ChangeKind,
    Connection,
    CreateVm,
    PowerAction,
    PowerState,
    Reconfigure,
    VmRecord,
)
from thinvisor.providers.vsphere import VsphereProvider, _endpoint

T = TypeVar("T")

USER = "admin@vsphere.local"
PASSWORD = "unit-secret"
TIMEOUT_S = 30
RUNNING_VM = "DC0_H0_VM0"  # the model powers its VMs on


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


@pytest.fixture(scope="module")
def sim() -> Iterator[Vcsim]:
    with running(USER, PASSWORD) as started:
        yield started


def connection(sim: Vcsim, fingerprint: str | None = "pinned") -> Connection:
    pin = sim.fingerprint if fingerprint == "pinned" else fingerprint
    return Connection(sim.address, USER, PASSWORD, pin)


@contextlib.asynccontextmanager
async def connected(sim: Vcsim) -> AsyncIterator[VsphereProvider]:
    provider = VsphereProvider(connection(sim))
    await provider.connect()
    try:
        yield provider
    finally:
        await provider.close()


@contextlib.asynccontextmanager
async def new_vm(provider: VsphereProvider, **spec: Any) -> AsyncIterator[VmRecord]:
    """A VM made for the test, removed (stopped first) afterwards."""
    vm = await provider.create(CreateVm(f"unit-{secrets.token_hex(3)}", **spec))
    try:
        yield vm
    finally:
        with contextlib.suppress(InvalidState):
            await provider.power(vm.id, PowerAction.STOP)
        with contextlib.suppress(NotFound):
            await provider.delete(vm.id)


async def by_name(provider: VsphereProvider, name: str) -> VmRecord:
    return next(vm for vm in (await provider.snapshot()).vms if vm.name == name)


# --- Addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("https://vcenter.example", ("vcenter.example", 443)),
        ("https://vcenter.example:8443/sdk", ("vcenter.example", 8443)),
        ("esxi1:9443", ("esxi1", 9443)),
        ("https://[::1]:8989/", ("::1", 8989)),
    ],
)
def test_endpoint_is_parsed(address: str, expected: tuple[str, int]) -> None:
    assert _endpoint(address) == expected


@pytest.mark.parametrize(
    "address", ["http://vcenter", "https://vcenter/ui", "https://vcenter:99999", "https://"]
)
def test_bad_endpoint_names_the_address(address: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^address: "):
        _endpoint(address)


# --- Certificates -----------------------------------------------------------------------


def test_no_pinned_fingerprint_reports_the_one_seen(sim: Vcsim) -> None:
    provider = VsphereProvider(connection(sim, fingerprint=None))
    with pytest.raises(CertificateMismatch) as caught:
        run(provider.connect())
    assert (caught.value.seen, caught.value.pinned) == (sim.fingerprint, None)
    run(provider.close())


def test_another_fingerprint_is_refused(sim: Vcsim) -> None:
    other = ":".join(["AB"] * 32)
    provider = VsphereProvider(connection(sim, fingerprint=other))
    with pytest.raises(CertificateMismatch, match=other):
        run(provider.connect())


def test_fingerprint_case_does_not_matter(sim: Vcsim) -> None:
    provider = VsphereProvider(connection(sim, fingerprint=sim.fingerprint.lower()))
    run(provider.connect())
    run(provider.close())


# --- The endpoint as one host -----------------------------------------------------------


def test_host_sums_the_endpoints_hosts(sim: Vcsim) -> None:
    async def check() -> None:
        async with connected(sim) as provider:
            host = await provider.connect()
            snap = await provider.snapshot()
        # The model: a standalone host and a cluster of three, 2 threads and 4 GiB each.
        assert (host.vendor, host.version, host.cpus) == ("vsphere", "6.5.0", 8)
        assert 4 * 4000 < host.memory_mib <= 4 * 4096
        assert host.name == "127.0.0.1"  # the simulator's instance name
        assert snap.host == host
        assert {d.name for d in snap.datastores} == {"LocalDS_0"}
        assert {"VM Network", "DC0_DVPG0"} <= {n.name for n in snap.networks}
        assert all(vm.datastores == ("LocalDS_0",) for vm in snap.vms)
        assert all(vm.id.startswith("vm-") and vm.uuid for vm in snap.vms)

    run(check())


def test_calls_before_connect_are_unreachable(sim: Vcsim) -> None:
    with pytest.raises(Unreachable, match="not connected"):
        run(VsphereProvider(connection(sim)).snapshot())


# --- Creating ---------------------------------------------------------------------------


def test_create_on_a_distributed_port_group_with_a_disk(sim: Vcsim) -> None:
    async def check() -> None:
        async with (
            connected(sim) as provider,
            new_vm(provider, cpus=2, memory_mib=96, disk_mib=8, network="DC0_DVPG0") as vm,
        ):
            assert (vm.cpus, vm.memory_mib, vm.power_state) == (2, 96, PowerState.STOPPED)
            assert vm.networks == ("DC0_DVPG0",)
            assert vm.datastores == ("LocalDS_0",)

    run(check())


def test_create_refuses_an_unknown_network_and_makes_nothing(sim: Vcsim) -> None:
    async def check() -> None:
        async with connected(sim) as provider:
            before = len((await provider.snapshot()).vms)
            with pytest.raises(InvalidArgument, match=r"^network: .*'nowhere'"):
                await provider.create(CreateVm("unit-nonet", network="nowhere"))
            with pytest.raises(InvalidArgument, match=r"^cpus: "):
                await provider.create(CreateVm("unit-nocpu", cpus=0))
            assert len((await provider.snapshot()).vms) == before

    run(check())


def test_template_clones_keep_the_templates_disks(sim: Vcsim) -> None:
    async def check() -> None:
        async with connected(sim) as provider, new_vm(provider) as template_vm:
            with pytest.raises(InvalidArgument, match=r"^template: .*not a template"):
                await provider.create(CreateVm("unit-x", template=template_vm.id))
            with pytest.raises(InvalidArgument, match=r"^disk_mib: "):
                await provider.create(CreateVm("unit-x", template="vm-1", disk_mib=8))

    run(check())


def test_template_clone_moves_its_nic_to_the_network_asked(sim: Vcsim) -> None:
    async def check() -> None:
        async with connected(sim) as provider, new_vm(provider, network="VM Network") as source:
            await asyncio.to_thread(_mark_template, provider, source.id)
            spec = CreateVm("unit-tplnet", cpus=2, template=source.id, network="DC0_DVPG0")
            made = await provider.create(spec)
            try:
                assert made.networks == ("DC0_DVPG0",) and made.cpus == 2
            finally:
                await provider.delete(made.id)

    run(check())


def _mark_template(provider: VsphereProvider, vm_id: str) -> None:
    session = provider._live()
    session._vm(vm_id).MarkAsTemplate()


# --- Gating -----------------------------------------------------------------------------


def test_a_running_vm_cannot_be_reconfigured_cloned_or_deleted(sim: Vcsim) -> None:
    async def check() -> None:
        async with connected(sim) as provider:
            vm = await by_name(provider, RUNNING_VM)
            assert vm.power_state == PowerState.RUNNING
            with pytest.raises(InvalidState, match="cannot reconfigure while running"):
                await provider.reconfigure(vm.id, Reconfigure(cpus=2))
            with pytest.raises(InvalidState, match="cannot clone while running"):
                await provider.clone(vm.id, "unit-clone")
            with pytest.raises(InvalidState, match="cannot delete while running"):
                await provider.delete(vm.id)
            assert await by_name(provider, RUNNING_VM) == vm

    run(check())


def test_reset_and_shutdown_of_a_running_vm(sim: Vcsim) -> None:
    async def check() -> None:
        async with connected(sim) as provider, new_vm(provider) as vm:
            with pytest.raises(InvalidState, match="cannot reset while stopped"):
                await provider.power(vm.id, PowerAction.RESET)
            await provider.power(vm.id, PowerAction.START)
            reset = await provider.power(vm.id, PowerAction.RESET)
            assert reset.power_state == PowerState.RUNNING
            await provider.power(vm.id, PowerAction.SHUTDOWN)
            assert (await by_name(provider, vm.name)).power_state == PowerState.STOPPED

    run(check())


# --- Snapshots --------------------------------------------------------------------------


def test_snapshot_tree_has_parents_and_one_current(sim: Vcsim) -> None:
    async def check() -> None:
        async with connected(sim) as provider, new_vm(provider) as vm:
            first = await provider.create_snapshot(vm.id, "first")
            second = await provider.create_snapshot(vm.id, "second")
            listed = {s.id: s for s in await provider.snapshots(vm.id)}
            assert listed[second.id].parent == first.id and listed[first.id].parent is None
            assert [s.id for s in listed.values() if s.current] == [second.id]
            reverted = await provider.revert_snapshot(vm.id, first.id)
            assert reverted.current and reverted.created
            await provider.delete_snapshot(vm.id, second.id)
            assert [(s.id, s.current) for s in await provider.snapshots(vm.id)] == [
                (first.id, True)
            ]
            with pytest.raises(NotFound, match="no snapshot"):
                await provider.revert_snapshot(vm.id, second.id)
            await provider.delete_snapshot(vm.id, first.id)
            assert await provider.snapshots(vm.id) == []

    run(check())


# --- Events -----------------------------------------------------------------------------


async def _collect(provider: VsphereProvider, into: list[ChangeEvent]) -> None:
    async for event in provider.events():
        into.append(event)


async def _next(events: AsyncIterator[ChangeEvent]) -> ChangeEvent:
    return await anext(events)


async def _close(events: AsyncIterator[ChangeEvent]) -> None:
    assert isinstance(events, AsyncGenerator)
    await events.aclose()


async def _wait_for(seen: list[ChangeEvent], kind: ChangeKind, vm_id: str) -> ChangeEvent:
    while True:
        for event in seen:
            if event.kind == kind and event.vm_id == vm_id:
                return event
        await asyncio.sleep(0.05)


def test_events_see_vms_come_and_go(sim: Vcsim) -> None:
    async def check() -> None:
        seen: list[ChangeEvent] = []
        async with connected(sim) as provider:
            stream = asyncio.create_task(_collect(provider, seen))
            async with new_vm(provider) as vm:
                created = await _wait_for(seen, ChangeKind.VM_CHANGED, vm.id)
                assert created.vm == vm and created.message.endswith("created")
            removed = await _wait_for(seen, ChangeKind.VM_REMOVED, vm.id)
            assert removed.message == f"{vm.name}: removed"
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream
        assert not [t for t in threading.enumerate() if t.name.startswith("vsphere-events")]

    run(check())


async def _stop(stream: asyncio.Task[None]) -> None:
    stream.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stream


def test_a_stream_continues_where_the_last_one_stopped(sim: Vcsim) -> None:
    async def check() -> None:
        async with connected(sim) as provider:
            # Made before any stream: their changes come in one answer, of which the
            # first stream takes a single event; the next stream must have the rest.
            async with new_vm(provider) as first, new_vm(provider) as second:
                events = provider.events()
                seen = [await _next(events)]
                await _close(events)
                stream = asyncio.create_task(_collect(provider, seen))
                try:
                    for vm in (first, second):
                        await _wait_for(seen, ChangeKind.VM_CHANGED, vm.id)
                finally:
                    await _stop(stream)
            # And what happens while no stream runs waits for the next one.
            stream = asyncio.create_task(_collect(provider, seen))
            try:
                await _wait_for(seen, ChangeKind.VM_REMOVED, second.id)
            finally:
                await _stop(stream)

    run(check())


def test_streams_at_the_same_time_both_follow_changes(sim: Vcsim) -> None:
    async def check() -> None:
        one: list[ChangeEvent] = []
        other: list[ChangeEvent] = []
        async with connected(sim) as provider:
            streams = [asyncio.create_task(_collect(provider, seen)) for seen in (one, other)]
            try:
                await asyncio.sleep(0.5)  # the second stream makes its own collector
                async with new_vm(provider) as vm:
                    for seen in (one, other):
                        await _wait_for(seen, ChangeKind.VM_CHANGED, vm.id)
            finally:
                for stream in streams:
                    await _stop(stream)
        assert not [t for t in threading.enumerate() if t.name.startswith("vsphere-events")]

    run(check())


def test_events_end_unreachable_when_the_endpoint_goes() -> None:
    async def check(own: Vcsim) -> None:
        async with connected(own) as provider:
            events = provider.events()
            waiting = asyncio.create_task(_next(events))
            await asyncio.sleep(0.5)
            own.stop()
            with pytest.raises(Unreachable):
                await waiting
            with pytest.raises(Unreachable):
                await provider.ping()
            await _close(events)

    with running(USER, PASSWORD) as own:
        run(check(own))


def test_closing_the_provider_ends_its_event_streams(sim: Vcsim) -> None:
    async def check() -> None:
        provider = VsphereProvider(connection(sim))
        await provider.connect()
        events = provider.events()
        waiting = asyncio.create_task(_next(events))
        await asyncio.sleep(0.5)
        started = asyncio.get_running_loop().time()
        await provider.close()
        with pytest.raises(Unreachable, match="closed"):
            await waiting
        assert asyncio.get_running_loop().time() - started < 5, "the stream outlived close()"
        await _close(events)

    run(check())
