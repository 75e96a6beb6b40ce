"""The libvirt provider against a real libvirtd, beyond the contract suite: a lost
connection, managed save, what create, clone and delete do to the pool's volumes, and
actions refused in the wrong power state. ``libvirtd`` is the session's daemon
(``tests.peers.libvirtd``, a plugin of ``tests/conftest.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import socket
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from tests.peers.libvirtd import LibvirtDaemon
from thinvisor.errors import InvalidState, NotFound, Unreachable, Unsupported
from thinvisor.providers import libvirt as libvirt_provider
from thinvisor.providers.base import (
    ChangeKind,
    Connection,
    ConsoleKind,
    CreateVm,
    PowerAction,
    PowerState,
    Reconfigure,
)
from thinvisor.providers.libvirt import LibvirtProvider

pytestmark = pytest.mark.functional

P = ParamSpec("P")
LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"
EVENT_WAIT_S = 15.0


def run_async(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    @functools.wraps(test)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


class SocketProxy:
    """A unix socket forwarding to libvirtd's, whose connections the test can cut."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "libvirt-sock"
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(self.path))
        self.server.listen()
        self.server.settimeout(0.1)
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stopping = threading.Event()
        self._spawn(self._accept)

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path}"

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(LIBVIRT_SOCKET)
            self.sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """End every connection made through the proxy, as a dying host would."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopping.set()
        self.cut()
        for thread in self.threads:
            thread.join(10)
        for sock in [*self.sockets, self.server]:
            sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def proxy(libvirtd: LibvirtDaemon) -> Iterator[SocketProxy]:
    with tempfile.TemporaryDirectory(prefix="tvlvp") as directory:
        p = SocketProxy(Path(directory))
        try:
            yield p
        finally:
            p.close()


@run_async
async def test_lost_connection_ends_events_and_is_reopened(proxy: SocketProxy) -> None:
    provider = LibvirtProvider(Connection(proxy.uri))
    try:
        await provider.connect()
        stream = provider.events()
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)  # subscribed
        proxy.cut()
        with pytest.raises(Unreachable, match="connection to libvirt was lost"):
            await asyncio.wait_for(first, EVENT_WAIT_S)
        await provider.ping()  # a new connection through the proxy
        proxy.close()  # nothing listens any more
        proxy.cut()
        with pytest.raises(Unreachable):
            await provider.ping()
    finally:
        await provider.close()


@contextlib.asynccontextmanager
async def connected(daemon: LibvirtDaemon) -> Any:
    provider = LibvirtProvider(Connection(daemon.uri))
    try:
        await provider.connect()
        yield provider
    finally:
        await provider.close()


@run_async
async def test_suspend_saves_and_start_restores(libvirtd: LibvirtDaemon) -> None:
    name = f"ft-save-{secrets.token_hex(2)}"
    vm_id = libvirtd.define_appliance(name).domain.UUIDString()
    async with connected(libvirtd) as provider:
        try:
            await provider.power(vm_id, PowerAction.START)
            await asyncio.to_thread(libvirtd.wait_ready, vm_id)
            await _check_refused_while_running(provider, vm_id)
            saved = await provider.power(vm_id, PowerAction.SUSPEND)
            assert saved.power_state == PowerState.SUSPENDED
            assert not libvirtd.vm(vm_id).domain.isActive()
            with pytest.raises(InvalidState):
                await provider.reconfigure(vm_id, Reconfigure(cpus=2))
            restored = await provider.power(vm_id, PowerAction.START)
            assert restored.power_state == PowerState.RUNNING
            await provider.power(vm_id, PowerAction.SUSPEND)
            dropped = await provider.power(vm_id, PowerAction.STOP)
            assert dropped.power_state == PowerState.STOPPED
            assert not libvirtd.vm(vm_id).domain.hasManagedSaveImage(0)
        finally:
            with contextlib.suppress(InvalidState):
                await provider.power(vm_id, PowerAction.STOP)


@run_async
async def test_the_host_cpu_load_is_measured_between_two_snapshots(
    libvirtd: LibvirtDaemon,
) -> None:
    async with connected(libvirtd) as provider:
        first = await provider.snapshot()
        assert first.host.cpu_load is None  # nothing to measure against yet
        assert first.host.core_mhz > 0
        await asyncio.sleep(0.5)
        load = (await provider.snapshot()).host.cpu_load
        assert load is not None and 0.0 <= load <= 1.0


async def _check_refused_while_running(provider: LibvirtProvider, vm_id: str) -> None:
    for call in (
        provider.reconfigure(vm_id, Reconfigure(memory_mib=128)),
        provider.clone(vm_id, "ft-never"),
        provider.delete(vm_id),
    ):
        with pytest.raises(InvalidState, match="while running"):
            await call
    vnc = await provider.console(vm_id, ConsoleKind.VNC)
    assert vnc.url.startswith("vnc://127.0.0.1:59")
    with pytest.raises(Unsupported, match="pty"):
        await provider.console(vm_id, ConsoleKind.SERIAL)


def _volumes(daemon: LibvirtDaemon) -> set[str]:
    return {p.name for p in daemon.pool_path.iterdir()}


@run_async
async def test_volumes_follow_create_clone_and_delete(libvirtd: LibvirtDaemon) -> None:
    name = f"ft-vol-{secrets.token_hex(2)}"
    async with connected(libvirtd) as provider:
        before = _volumes(libvirtd)
        spec = CreateVm(name, memory_mib=64, disk_mib=8, network=libvirtd.network)
        vm = await provider.create(spec)
        clone = None
        try:
            assert vm.datastores == (libvirtd.pool,) and vm.networks == (libvirtd.network,)
            assert _volumes(libvirtd) - before == {f"{name}.qcow2"}
            with pytest.raises(InvalidState, match="open a vnc console while stopped"):
                await provider.console(vm.id, ConsoleKind.VNC)
            clone = await provider.clone(vm.id, f"{name}-copy")
            assert _volumes(libvirtd) - before == {f"{name}.qcow2", f"{name}-copy.qcow2"}
            assert clone.datastores == vm.datastores and clone.networks == vm.networks
            await provider.delete(clone.id)
            assert _volumes(libvirtd) - before == {f"{name}.qcow2"}
        finally:
            for made in (clone, vm):
                if made is not None:
                    with contextlib.suppress(NotFound):
                        await provider.delete(made.id)
        assert _volumes(libvirtd) == before


@run_async
async def test_events_missed_past_the_backlog_ask_for_a_resync(
    libvirtd: LibvirtDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libvirt_provider, "BACKLOG_MAX", 1)
    async with connected(libvirtd) as provider:
        vm = await provider.create(CreateVm(f"ft-lost-{secrets.token_hex(2)}", memory_mib=64))
        await provider.delete(vm.id)  # defined, undefined: one event too many
        for _ in range(100):
            if provider._overflowed:  # the second event has come
                break
            await asyncio.sleep(0.1)
        stream = provider.events()
        first = await asyncio.wait_for(anext(stream), EVENT_WAIT_S)
        assert first.kind == ChangeKind.RESYNC and "more than 1 events" in first.message
        again = await provider.create(CreateVm(f"ft-more-{secrets.token_hex(2)}", memory_mib=64))
        try:
            event = await asyncio.wait_for(anext(stream), EVENT_WAIT_S)
            assert (event.kind, event.vm_id, event.peer_kind) == (
                ChangeKind.VM_CHANGED,
                again.id,
                "defined.added",
            )
        finally:
            await provider.delete(again.id)
            await stream.aclose()
