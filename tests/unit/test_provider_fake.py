"""The fake provider's own promises, which tests of the center rely on: hosts shared by
address, the test helpers, event streams fed from any thread and ended when the host
goes away, and the power state machine (the contract suite covers the rest)."""

from __future__ import annotations

import asyncio
import functools
import secrets
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any, ParamSpec

import pytest

from thinvisor.errors import (
    AlreadyExists,
    Busy,
    CredentialsRefused,
    InvalidArgument,
    InvalidState,
    NotFound,
    ProviderError,
    Unreachable,
)
from thinvisor.providers import fake, open_provider
from thinvisor.providers.base import (
    ChangeEvent,
    ChangeKind,
    Connection,
    CreateVm,
    DatastoreRecord,
    MigrationOptions,
    PowerAction,
    PowerState,
    Provider,
    Reconfigure,
)
from thinvisor.providers.fake import TRANSITIONS, FakeHost, fake_host, remove_fake_host

P = ParamSpec("P")
S = PowerState
WAIT_S = 5.0


def run_async(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    @functools.wraps(test)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


@pytest.fixture
def host() -> Iterator[FakeHost]:
    """A fake host of the test's own, with one stopped VM ``vm1`` and a template."""
    address = f"fake://unit-{secrets.token_hex(4)}"
    h = fake_host(address, vms=["vm1"], templates=["tpl"])
    yield h
    remove_fake_host(address)


def provider(host: FakeHost, **changes: Any) -> Provider:
    fields = {"address": host.address, "username": "admin", "password": "secret", **changes}
    return open_provider("fake", Connection(**fields))


async def next_event(stream: Any) -> ChangeEvent:
    event: ChangeEvent = await asyncio.wait_for(anext(stream), WAIT_S)
    return event


@run_async
async def test_providers_on_one_address_share_the_host(host: FakeHost) -> None:
    first, second = provider(host), provider(host)
    vm = host.vm_named("vm1")
    await first.power(vm.id, PowerAction.START)
    assert {v.name: v.power_state for v in (await second.snapshot()).vms} == {
        "vm1": S.RUNNING,
        "tpl": S.STOPPED,
    }
    host.add_vm("made-on-host", memory_mib=512)
    assert "made-on-host" in {v.name for v in (await second.snapshot()).vms}


@run_async
async def test_credentials_are_checked_on_every_call(host: FakeHost) -> None:
    p = provider(host)
    await p.connect()
    host.password = "rotated"
    with pytest.raises(CredentialsRefused):
        await p.snapshot()
    await provider(host, password="rotated").snapshot()


@run_async
async def test_unreachable_host_fails_every_call_and_ends_streams(host: FakeHost) -> None:
    p = provider(host)
    stream = p.events()
    pending = asyncio.ensure_future(next_event(stream))
    host.set_reachable(False)
    with pytest.raises(Unreachable):
        await pending
    for call in (p.connect(), p.snapshot(), p.ping()):
        with pytest.raises(Unreachable):
            await call
    host.set_reachable(True)
    await p.ping()


@run_async
async def test_removed_host_is_unreachable(host: FakeHost) -> None:
    remove_fake_host(host.address)
    with pytest.raises(Unreachable):
        await provider(host).connect()


@run_async
async def test_changes_made_in_another_thread_reach_the_stream(host: FakeHost) -> None:
    stream = provider(host).events()
    pending = asyncio.ensure_future(next_event(stream))
    vm_id = host.vm_named("vm1").id
    thread = threading.Thread(target=host.set_power, args=(vm_id, S.RUNNING))
    thread.start()
    thread.join()
    event = await pending
    assert (event.kind, event.vm_id) == (ChangeKind.VM_CHANGED, vm_id)
    assert event.vm is not None and event.vm.power_state == S.RUNNING


@run_async
async def test_close_ends_only_the_providers_own_streams(host: FakeHost) -> None:
    mine, other = provider(host), provider(host)
    my_stream, other_stream = mine.events(), other.events()
    my_next = asyncio.ensure_future(next_event(my_stream))
    other_next = asyncio.ensure_future(next_event(other_stream))
    await mine.close()
    with pytest.raises(StopAsyncIteration):
        await my_next
    host.remove_vm(host.vm_named("vm1").id)
    event = await other_next
    assert event.kind == ChangeKind.VM_REMOVED


@run_async
async def test_streams_miss_nothing_since_connect(host: FakeHost) -> None:
    p = provider(host)
    await p.connect()
    vm_id = host.vm_named("vm1").id
    host.set_power(vm_id, S.RUNNING)  # before any stream: the first one has it
    first = p.events()
    assert (await next_event(first)).vm == host.vm(vm_id).record()
    await first.aclose()  # type: ignore[attr-defined]
    host.set_power(vm_id, S.PAUSED)  # between streams: the next one has it
    event = await next_event(p.events())
    assert event.vm is not None and event.vm.power_state == S.PAUSED


@run_async
async def test_a_provider_that_reads_nothing_is_told_to_resync(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake, "MAX_PENDING", 3)
    p = provider(host)
    await p.connect()
    for state in (S.RUNNING, S.PAUSED, S.RUNNING, S.STOPPED):
        host.set_power(host.vm_named("vm1").id, state)
    stream = p.events()
    assert (await next_event(stream)).kind == ChangeKind.RESYNC
    event = await next_event(stream)
    assert event.vm is not None and event.vm.power_state == S.STOPPED


@pytest.mark.parametrize("action", list(PowerAction))
@pytest.mark.parametrize("state", [S.STOPPED, S.RUNNING, S.PAUSED, S.SUSPENDED])
@run_async
async def test_power_state_machine(host: FakeHost, action: PowerAction, state: S) -> None:
    vm = host.add_vm("sm", power_state=state)
    allowed, after = TRANSITIONS[action]
    p = provider(host)
    if state in allowed:
        assert (await p.power(vm.id, action)).power_state == (after or state)
    else:
        with pytest.raises(InvalidState, match=f"cannot {action.value} while {state.value}"):
            await p.power(vm.id, action)
        assert host.vm(vm.id).power_state == state


def test_the_state_machine_is_the_hosts() -> None:
    """The fake's table says what a thinvisor host allows (README's action table)."""
    assert TRANSITIONS[PowerAction.START][0] == {S.STOPPED, S.SUSPENDED}
    assert TRANSITIONS[PowerAction.STOP][0] == {S.RUNNING, S.PAUSED, S.SUSPENDED}
    assert TRANSITIONS[PowerAction.SUSPEND] == (frozenset({S.RUNNING, S.PAUSED}), S.SUSPENDED)


@run_async
async def test_refusals_change_nothing(host: FakeHost) -> None:
    p = provider(host)
    vm, template = host.vm_named("vm1"), host.vm_named("tpl")
    with pytest.raises(InvalidState, match="a template"):
        await p.power(template.id, PowerAction.START)
    await p.power(vm.id, PowerAction.START)
    for refused in (
        p.delete(vm.id),
        p.clone(vm.id, "copy"),
        p.reconfigure(vm.id, Reconfigure(memory_mib=512)),
    ):
        with pytest.raises(InvalidState):
            await refused
    with pytest.raises(AlreadyExists):
        await p.create(CreateVm("vm1"))
    with pytest.raises(InvalidArgument, match="network"):
        await p.create(CreateVm("new", network="no-such-network"))
    with pytest.raises(InvalidArgument, match="template"):
        await p.create(CreateVm("new", template=vm.id))
    with pytest.raises(NotFound):
        await p.create(CreateVm("new", template="vm-0"))
    assert {v.name for v in (await p.snapshot()).vms} == {"vm1", "tpl"}
    assert host.vm(vm.id).memory_mib == 256


@run_async
async def test_snapshot_tree(host: FakeHost) -> None:
    p = provider(host)
    vm = host.vm_named("vm1")
    base = await p.create_snapshot(vm.id, "base")
    await p.power(vm.id, PowerAction.START)
    live = await p.create_snapshot(vm.id, "live")
    top = await p.create_snapshot(vm.id, "top")
    assert (live.parent, live.memory, top.parent) == (base.id, True, live.id)
    await p.power(vm.id, PowerAction.STOP)
    await p.revert_snapshot(vm.id, live.id)  # it holds memory: the VM runs again
    assert host.vm(vm.id).power_state == S.RUNNING
    await p.delete_snapshot(vm.id, live.id)  # its child moves up; current goes to its parent
    tree = {s.name: s for s in await p.snapshots(vm.id)}
    assert tree["top"].parent == base.id
    assert tree["base"].current and not tree["top"].current
    await p.revert_snapshot(vm.id, base.id)  # no memory: stopped
    assert host.vm(vm.id).power_state == S.STOPPED


@run_async
async def test_maintenance_is_a_host_change(host: FakeHost) -> None:
    p = provider(host)
    stream = p.events()
    pending = asyncio.ensure_future(next_event(stream))
    assert (await p.set_maintenance(True)).maintenance
    event = await pending
    assert event.kind == ChangeKind.HOST_CHANGED
    assert event.host is not None and event.host.maintenance
    assert event.user == "admin"


# --- live migration -----------------------------------------------------------------------


@pytest.fixture
def other() -> Iterator[FakeHost]:
    """A second fake host, with no VM and a datastore of its own besides datastore1."""
    address = f"fake://unit-{secrets.token_hex(4)}"
    h = fake_host(address)
    h.datastores.append(DatastoreRecord("local2", "local2", 1 << 40, 1 << 39))
    yield h
    remove_fake_host(address)


async def migrate(
    source: FakeHost, destination: FakeHost, vm_id: str, **options: Any
) -> dict[str, Any]:
    """Migrate as the center does: the spec from the source, a ticket from the destination."""
    chosen = MigrationOptions(**options)
    sender, receiver = provider(source), provider(destination)
    ticket = await receiver.prepare_incoming(await sender.migration_spec(vm_id), chosen)
    return await sender.migrate(vm_id, ticket, chosen)


@run_async
async def test_a_migration_moves_the_running_vm_with_its_id(
    host: FakeHost, other: FakeHost
) -> None:
    vm = host.vm_named("vm1")
    snap = await provider(host).create_snapshot(vm.id, "before")
    host.set_power(vm.id, S.RUNNING)
    out_stream, in_stream = provider(host).events(), provider(other).events()
    steps: list[int] = []
    sender, receiver = provider(host), provider(other)
    ticket = await receiver.prepare_incoming(await sender.migration_spec(vm.id), MigrationOptions())
    assert (ticket.address, ticket.mode) == (other.address, "shared")
    assert ticket.token not in repr(ticket)
    result = await sender.migrate(vm.id, ticket, MigrationOptions(), lambda p, _: steps.append(p))
    assert (result["vm"], result["mode"], result["destination"]) == ("vm1", "shared", other.address)
    assert result["transferred_bytes"] == 256 << 20 and result["total_ms"] >= result["downtime_ms"]
    assert steps == sorted(steps) and steps[0] == 0 and len(steps) == fake.MIGRATION_STEPS
    assert vm.id not in host.vms
    moved = other.vm(vm.id)
    assert (moved.name, moved.power_state, moved.uuid) == ("vm1", S.RUNNING, vm.uuid)
    assert [s.id for s in await receiver.snapshots(vm.id)] == [snap.id]
    gone, came = await next_event(out_stream), await next_event(in_stream)
    while gone.kind != ChangeKind.VM_REMOVED:  # the snapshot's and the power's first
        gone = await next_event(out_stream)
    assert (gone.vm_id, gone.peer_kind) == (vm.id, "vm.migrated")
    assert (came.kind, came.vm_id, came.peer_kind) == (ChangeKind.VM_CHANGED, vm.id, "vm.migrated")


@run_async
async def test_disks_the_destination_does_not_see_are_mirrored(
    host: FakeHost, other: FakeHost
) -> None:
    vm = host.add_vm("far", power_state=S.RUNNING, datastores=("nfs-only-here",))
    result = await migrate(host, other, vm.id, datastore="local2")
    assert result["mode"] == "mirror" and other.vm(vm.id).datastores == ("local2",)
    near = host.add_vm("near", power_state=S.RUNNING, datastores=("elsewhere",))
    await migrate(host, other, near.id)  # the destination's first datastore
    assert other.vm(near.id).datastores == ("datastore1",)


@run_async
async def test_bad_migrations_are_refused_and_change_nothing(
    host: FakeHost, other: FakeHost
) -> None:
    vm = host.vm_named("vm1")
    sender, receiver = provider(host), provider(other)
    with pytest.raises(InvalidState, match="cannot migrate while stopped"):
        await migrate(host, other, vm.id)
    host.set_power(vm.id, S.RUNNING)
    other.add_vm("vm1")
    with pytest.raises(AlreadyExists):
        await migrate(host, other, vm.id)
    other.remove_vm(other.vm_named("vm1").id)
    with pytest.raises(InvalidArgument, match=r"datastore: .* has no datastore 'nope'"):
        await migrate(host, other, vm.id, datastore="nope")
    wired = host.add_vm("wired", power_state=S.RUNNING, networks=("vlan-only-here",))
    with pytest.raises(InvalidArgument, match="network"):
        await migrate(host, other, wired.id)
    ticket = await receiver.prepare_incoming(await sender.migration_spec(vm.id), MigrationOptions())
    forged = replace(ticket, token="0" * 32)
    with pytest.raises(InvalidArgument, match=r"ticket: .* expects no vm 'vm1'"):
        await sender.migrate(vm.id, forged, MigrationOptions())
    with pytest.raises(InvalidArgument, match="ticket"):  # for another VM
        await sender.migrate(wired.id, ticket, MigrationOptions())
    await sender.migrate(vm.id, ticket, MigrationOptions())
    assert vm.id in other.vms
    with pytest.raises(NotFound):
        await sender.migrate(vm.id, ticket, MigrationOptions())
    assert set(other.vms) == {vm.id} and "wired" in {v.name for v in host.vms.values()}


@run_async
async def test_a_ticket_lets_one_vm_in_once(host: FakeHost, other: FakeHost) -> None:
    first = host.add_vm("first", power_state=S.RUNNING)
    sender, receiver = provider(host), provider(other)
    ticket = await receiver.prepare_incoming(
        await sender.migration_spec(first.id), MigrationOptions()
    )
    await sender.migrate(first.id, ticket, MigrationOptions())
    back = provider(other)
    with pytest.raises(InvalidArgument, match="ticket"):  # used: even the same VM again
        await back.migrate(first.id, replace(ticket, address=host.address), MigrationOptions())


@run_async
async def test_a_failed_or_cancelled_migration_leaves_the_vm_running_where_it_was(
    host: FakeHost, other: FakeHost
) -> None:
    vm = host.add_vm("app", power_state=S.RUNNING)
    host.fail_migrations(ProviderError("the switch-over failed"))
    with pytest.raises(ProviderError, match="the switch-over failed"):
        await migrate(host, other, vm.id)
    assert host.vm(vm.id).power_state == S.RUNNING and not other.vms
    host.fail_migrations(None)
    host.slow_migrations(30)
    moving = asyncio.ensure_future(migrate(host, other, vm.id))
    await asyncio.sleep(0.05)
    moving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await moving
    assert host.vm(vm.id).power_state == S.RUNNING and not other.vms
    host.slow_migrations(0)
    sender, chosen = provider(host), MigrationOptions()
    ticket = await provider(other).prepare_incoming(await sender.migration_spec(vm.id), chosen)
    other.set_reachable(False)  # gone before the switch-over
    with pytest.raises(Unreachable):
        await sender.migrate(vm.id, ticket, chosen)
    assert host.vm(vm.id).power_state == S.RUNNING


# --- high availability ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@run_async
async def test_hosts_sharing_a_datastore_see_each_others_heartbeats(
    host: FakeHost, other: FakeHost
) -> None:
    clock = Clock()
    host.clock = other.clock = clock
    assert (await provider(host).connect()).host_id == host.host_id
    mine = {host.host_id, other.host_id}

    async def ages(reader: FakeHost, datastore: str = "datastore1") -> dict[str, float]:
        beats = await provider(reader).datastore_heartbeats(datastore)
        return {b.host_id: b.age_s for b in beats if b.host_id in mine}

    assert await ages(host) == {host.host_id: 0.0, other.host_id: 0.0}
    assert await ages(other, "local2") == {other.host_id: 0.0}  # its own datastore only
    with pytest.raises(NotFound, match="datastore 'local2' does not exist"):
        await provider(host).datastore_heartbeats("local2")
    other.isolate()  # no answer, but it goes on writing
    clock.now += 20
    assert await ages(host) == {host.host_id: 0.0, other.host_id: 0.0}
    other.crash()  # no answer, no heartbeat
    clock.now += 16
    assert await ages(host) == {host.host_id: 0.0, other.host_id: 16.0}
    with pytest.raises(Unreachable):
        await provider(other).ping()
    other.restore()
    assert (await ages(other))[other.host_id] == 0.0


@run_async
async def test_the_centers_heartbeat_is_recorded_and_a_fence_said_once(host: FakeHost) -> None:
    p = provider(host)
    assert await p.ha_heartbeat(15.0) is False
    host.fenced = True
    assert await p.ha_heartbeat(20.0) is True
    assert await p.ha_heartbeat(20.0) is False
    assert (host.center_timeout_s, host.center_heartbeats) == (20.0, 3)


@run_async
async def test_recover_takes_a_dead_hosts_vm_over_and_starts_it(
    host: FakeHost, other: FakeHost
) -> None:
    vm = other.add_vm("app", power_state=S.RUNNING, memory_mib=64)
    local = other.add_vm("local", power_state=S.RUNNING, datastores=("local2",))
    other.crash()
    assert other.vm(vm.id).power_state == S.STOPPED  # off with its host
    stream = provider(host).events()
    record = await provider(host).recover("app", "datastore1")
    assert (record.id, record.power_state, record.memory_mib) == (vm.id, S.RUNNING, 64)
    assert host.vm(vm.id).power_state == S.RUNNING and vm.id not in other.vms
    event = await next_event(stream)
    assert (event.kind, event.vm_id, event.peer_kind) == (
        ChangeKind.VM_CHANGED,
        vm.id,
        "vm.recovered",
    )
    other.restore()  # back, without the VM another host owns now
    assert "app" not in {v.name for v in (await provider(other).snapshot()).vms}
    with pytest.raises(NotFound, match="datastore 'local2' does not exist"):  # not shared
        await provider(host).recover("local", "local2")
    with pytest.raises(NotFound, match="datastore datastore1 holds no vm 'ghost'"):
        await provider(host).recover("ghost", "datastore1")
    assert local.id in other.vms
    with pytest.raises(AlreadyExists):  # this host's already
        await provider(host).recover("app", "datastore1")
    with pytest.raises(NotFound, match="datastore 'nope' does not exist"):
        await provider(host).recover("app", "nope")
    template = other.add_vm("tpl2", template=True)
    with pytest.raises(InvalidState, match="a template"):
        await provider(host).recover("tpl2", "datastore1")
    host.maintenance = True
    with pytest.raises(Busy, match="maintenance mode"):
        await provider(host).recover(template.name, "datastore1")
