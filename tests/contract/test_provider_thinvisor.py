"""What the thinvisor provider promises beyond the contract: its event streams resume
where the last one stopped, so that a reconnecting center misses nothing and sees
nothing twice."""

from __future__ import annotations

import asyncio
import contextlib

from tests.contract.test_providers import SMALL_MIB, connected, run_async, unique
from tests.peers.contract import Peer
from thinvisor.errors import NotFound
from thinvisor.providers.base import ChangeEvent, ChangeKind, CreateVm, Provider, Reconfigure

WAIT_S = 15.0


async def next_about(provider: Provider, vm_id: str) -> ChangeEvent:
    """The first event about ``vm_id`` of a new stream, which is closed again."""
    stream = provider.events()
    try:
        async with asyncio.timeout(WAIT_S):
            async for event in stream:
                if event.vm_id == vm_id:
                    return event
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    raise AssertionError("the event stream ended")


@run_async
async def test_events_resume_after_the_last_one_seen(thinvisor_peer: Peer) -> None:
    async with connected(thinvisor_peer) as provider:
        vm = await provider.create(CreateVm(unique("ct-resume"), memory_mib=SMALL_MIB))
        try:
            # Made after connect, before any stream: the first stream replays it.
            created = await next_about(provider, vm.id)
            assert created.kind == ChangeKind.VM_CHANGED and created.peer_kind == "vm.created"
            # Changed while no stream is open: the next stream starts there, not before.
            await provider.reconfigure(vm.id, Reconfigure(memory_mib=2 * SMALL_MIB))
            changed = await next_about(provider, vm.id)
            assert changed.peer_kind == "vm.reconfigured"
            assert changed.vm is not None and changed.vm.memory_mib == 2 * SMALL_MIB
            await provider.delete(vm.id)
            removed = await next_about(provider, vm.id)
            assert (removed.kind, removed.vm) == (ChangeKind.VM_REMOVED, None)
        finally:
            with contextlib.suppress(NotFound):
                await provider.delete(vm.id)
