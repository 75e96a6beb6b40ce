"""The migration port without QEMU: tickets and what is refused before anything moves,
and channels that are refused (a certificate not pinned, a token not issued, a channel
out of turn), over real TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import AlreadyExists, InvalidArgument
from thinvisor.host.engine import tunnel
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.engine.tunnel import TunnelError
from thinvisor.host.hostinfo import HostFacts
from thinvisor.host.incoming import IncomingRequest
from thinvisor.host.inventory import set_owner
from thinvisor.host.migration import MigrationService, downtime_steps, memory_copy_of
from thinvisor.host.service import CreateOptions, HostService
from thinvisor.model import VmSpec
from thinvisor.tls import ensure_certificate

FACTS = HostFacts(cpus=4, memory_total_mib=8192, memory_available_mib=4096, cpu_model="t")


def _service(root: Path, shared: Path) -> HostService:
    config = HostConfig(
        qemu_binary=str(root / "no-qemu-in-unit-tests"),
        run_dir=root / "run",
        cache_dir=root / "cache",
        state_dir=root / "state",
        datastores=[
            DatastoreConfig(name="local", path=root / "ds"),
            DatastoreConfig(name="shared", path=shared),
        ],
    )
    return HostService(config, accel=lambda: AccelChoice("tcg", "test"), facts=lambda: FACTS)


class Port:
    """A destination's migration port on loopback, and a source host beside it."""

    def __init__(self, tmp_path: Path) -> None:
        shared = tmp_path / "shared"
        self.source = _service(tmp_path / "a", shared)
        self.dest = _service(tmp_path / "b", shared)
        cert, key = tmp_path / "b.crt", tmp_path / "b.key"
        self.fingerprint = ensure_certificate(cert, key, ["localhost"])
        self.cert, self.key = cert, key
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.migration = MigrationService(self.dest, self.port, self.fingerprint)

    def request(self, name: str = "vm1", **fields: Any) -> IncomingRequest:
        spec = VmSpec.model_validate({"name": name, "memory_mib": 64})
        return IncomingRequest(vm=spec.model_dump(mode="json"), **fields)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[Port]:
    p = Port(tmp_path)
    await p.migration.start(p.sock, p.cert, p.key)
    try:
        yield p
    finally:
        await p.migration.close()


def on_port(tmp_path: Path, body: Callable[[Port], Awaitable[None]]) -> None:
    """``body`` with a destination's migration port serving on loopback."""

    async def main() -> None:
        async with serving(tmp_path) as p:
            await body(p)

    asyncio.run(main())


def test_downtime_escalates_to_the_limit_in_four_steps() -> None:
    assert downtime_steps(300) == [75, 150, 225, 300]
    assert downtime_steps(20) == [10, 15, 20]


def test_memory_is_copied_live_unless_tcg_before_qemu_9_would_lose_writes() -> None:
    assert memory_copy_of("auto", kvm=True, qemu=(7, 2)) == "live"
    assert memory_copy_of("auto", kvm=False, qemu=(7, 2)) == "paused"
    assert memory_copy_of("auto", kvm=False, qemu=(8, 2)) == "paused"
    assert memory_copy_of("auto", kvm=False, qemu=(9, 0)) == "live"
    assert memory_copy_of("auto", kvm=False, qemu=(10, 1)) == "live"
    # What the operator asks for stands.
    assert memory_copy_of("live", kvm=False, qemu=(7, 2)) == "live"
    assert memory_copy_of("paused", kvm=True, qemu=(10, 1)) == "paused"


def test_a_ticket_for_a_vm_not_seen_here_is_for_mirrored_disks(tmp_path: Path) -> None:
    async def body(port: Port) -> None:
        ticket = await port.migration.prepare(port.request())
        assert ticket.mode == "mirror" and ticket.port == port.port
        assert ticket.fingerprint == port.fingerprint and len(ticket.token) >= 32
        # Nothing is made yet but the record an agent dying now would clean up.
        assert not (port.dest.config.datastores[0].path / "vm1").exists()
        assert len(list((port.dest.config.state_dir / "migrations").iterdir())) == 1

    on_port(tmp_path, body)


def test_a_vm_on_a_shared_datastore_moves_its_owner_only(tmp_path: Path) -> None:
    async def body(port: Port) -> None:
        await port.source.create_vm(VmSpec(name="vm1", memory_mib=64), CreateOptions("shared"))
        spec = port.source.inventory.get("vm1").spec
        assert spec is not None
        request = IncomingRequest(vm=spec.model_dump(mode="json"))
        assert (await port.migration.prepare(request)).mode == "shared"
        # The destination does not list it before the switch-over.
        assert port.dest.inventory.find("vm1") is None
        set_owner(port.source.inventory.get("vm1").paths.vm_dir, port.dest.inventory.host_id)
        assert port.dest.inventory.find("vm1") is not None
        assert port.source.inventory.find("vm1") is None

    on_port(tmp_path, body)


def test_bad_tickets_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async def body(port: Port) -> None:
        await port.dest.create_vm(VmSpec(name="here", memory_mib=64))
        with pytest.raises(AlreadyExists):
            await port.migration.prepare(port.request("here"))
        with pytest.raises(InvalidArgument) as info:
            await port.migration.prepare(port.request(mode="shared"))
        assert info.value.field == "mode"
        with pytest.raises(InvalidArgument) as info:
            await port.migration.prepare(IncomingRequest(vm={"name": "x", "memory_mib": 8192}))
        assert info.value.field == "memory_mib"
        await port.migration.prepare(port.request("twice"))
        with pytest.raises(AlreadyExists):
            await port.migration.prepare(port.request("twice"))
        assert len(list((port.dest.config.state_dir / "migrations").iterdir())) == 1
        # Two requests for one VM at once: one ticket, one refusal, one record more.
        both = [port.migration.prepare(port.request("race")) for _ in range(2)]
        answers = await asyncio.gather(*both, return_exceptions=True)
        assert sorted(type(a).__name__ for a in answers) == ["AlreadyExists", "Ticket"]
        assert len(list((port.dest.config.state_dir / "migrations").iterdir())) == 2

    on_port(tmp_path, body)


def test_channels_need_the_pinned_certificate_and_an_issued_token(tmp_path: Path) -> None:
    async def body(port: Port) -> None:
        ticket = await port.migration.prepare(port.request())
        wrong = "AA:" * 31 + "AA"
        with pytest.raises(TunnelError, match="not the destination's"):
            await tunnel.open_channel("127.0.0.1", port.port, wrong, ticket.token, "control")
        with pytest.raises(TunnelError, match="unknown token"):
            await tunnel.open_channel("127.0.0.1", port.port, port.fingerprint, "x" * 43, "control")
        with pytest.raises(TunnelError, match="has not started"):
            await tunnel.open_channel(
                "127.0.0.1", port.port, port.fingerprint, ticket.token, "memory"
            )
        control = await tunnel.open_channel(
            "127.0.0.1", port.port, port.fingerprint, ticket.token, "control"
        )
        with pytest.raises(TunnelError, match="control channel is open"):
            await tunnel.open_channel(
                "127.0.0.1", port.port, port.fingerprint, ticket.token, "control"
            )
        # An operation out of turn is refused, and ends the migration: its token is void.
        await tunnel.send_message(control, {"op": "finish"})
        reply = await tunnel.read_message(control, timeout=10)
        assert not reply["ok"] and "not expected" in reply["error"]
        await asyncio.sleep(0.1)
        with pytest.raises(TunnelError, match="unknown token"):
            await tunnel.open_channel(
                "127.0.0.1", port.port, port.fingerprint, ticket.token, "control"
            )
        assert list((port.dest.config.state_dir / "migrations").iterdir()) == []
        control[1].close()

    on_port(tmp_path, body)


def test_a_file_named_outside_the_vms_directory_is_refused(tmp_path: Path) -> None:
    async def body(port: Port) -> None:
        ticket = await port.migration.prepare(port.request())
        control = await tunnel.open_channel(
            "127.0.0.1", port.port, port.fingerprint, ticket.token, "control"
        )
        await tunnel.send_message(control, {"op": "file", "name": "../escape", "size": 1})
        reply = await tunnel.read_message(control, timeout=10)
        assert not reply["ok"] and "plain name" in reply["error"]
        assert not (port.dest.config.datastores[0].path / "escape").exists()
        assert not (port.dest.config.datastores[0].path / "vm1").exists()
        control[1].close()

    on_port(tmp_path, body)
