"""The serial console hub against a fake QEMU serial port: a unix socket server that
logs what it writes, serves one client at a time and records what it receives."""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from thinvisor.console.hub import (
    ENDED_CLOSED,
    ENDED_TOO_SLOW,
    ConsoleHub,
    ConsoleSession,
)
from thinvisor.errors import QemuError
from thinvisor.host.engine.paths import VmPaths

T = TypeVar("T")
PORT = "serial0"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


class FakeSerialPort:
    """What QEMU does with a serial chardev: log every byte, send it to the client."""

    def __init__(self, paths: VmPaths):
        self.paths = paths
        self.received = bytearray()
        self.connections = 0
        self.clients: list[asyncio.StreamWriter] = []
        self.max_clients = 0
        self.disconnected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._log = paths.serial_log(PORT).open("ab", buffering=0)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve, str(self.paths.serial_socket(PORT))
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.clients.append(writer)
        self.max_clients = max(self.max_clients, len(self.clients))
        try:
            while data := await reader.read(4096):
                self.received += data
        except OSError:
            pass
        finally:
            self.clients.remove(writer)
            writer.close()
            self.disconnected.set()

    async def emit(self, data: bytes) -> None:
        """The guest writes ``data``: to the client if there is one, then to the log."""
        for writer in self.clients:
            writer.write(data)
        self._log.write(data)
        for writer in self.clients:
            await writer.drain()

    async def hang_up(self) -> None:
        """QEMU exits: the client's connection closes."""
        for writer in list(self.clients):
            writer.close()
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._log.close()


@contextlib.asynccontextmanager
async def serial_port(history: bytes = b"") -> AsyncIterator[FakeSerialPort]:
    with tempfile.TemporaryDirectory(prefix="tvhub", dir="/tmp") as tmp:
        paths = VmPaths(vm_dir=Path(tmp) / "vm", run_dir=Path(tmp) / "run")
        paths.logs_dir.mkdir(parents=True)
        paths.run_dir.mkdir()
        paths.serial_log(PORT).write_bytes(history)
        port = FakeSerialPort(paths)
        await port.start()
        try:
            yield port
        finally:
            await port.close()


async def read_until(session: ConsoleSession, wanted: bytes, seen: bytes = b"") -> bytes:
    while wanted not in seen:
        seen += await anext(session)
    return seen


async def eventually(check: Callable[[], bool]) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def drained(session: ConsoleSession) -> bytes:
    return b"".join([chunk async for chunk in session])


def test_history_then_live_output_and_input() -> None:
    async def go() -> None:
        async with (
            serial_port(b"booting\nlogin: ") as port,
            ConsoleHub().attach("vm1", PORT, port.paths) as session,
        ):
            assert session.history == b"booting\nlogin: "
            await port.emit(b"live output\n")
            assert await read_until(session, b"live output\n") == b"live output\n"
            await session.send(b"root\n")
            await eventually(lambda: bytes(port.received) == b"root\n")

    run(go())


def test_history_is_the_last_64_kib() -> None:
    async def go() -> None:
        old, recent = b"o" * 10_000, bytes(range(256)) * 256
        async with (
            serial_port(old + recent) as port,
            ConsoleHub().attach("vm1", PORT, port.paths) as session,
        ):
            assert session.history == recent

    run(go())


def test_two_viewers_share_one_connection() -> None:
    async def go() -> None:
        hub = ConsoleHub()
        async with serial_port() as port:
            async with (
                hub.attach("vm1", PORT, port.paths) as one,
                hub.attach("vm1", PORT, port.paths) as two,
            ):
                assert hub.viewers("vm1", PORT) == 2
                await port.emit(b"hello both\n")
                assert await read_until(one, b"both\n") == b"hello both\n"
                assert await read_until(two, b"both\n") == b"hello both\n"
                await one.send(b"from one\n")
                await two.send(b"from two\n")
                await eventually(lambda: port.received.count(b"\n") == 2)
            assert port.connections == 1
            assert port.max_clients == 1

    run(go())


def test_a_slow_viewer_is_dropped_and_the_others_keep_up() -> None:
    async def go() -> None:
        hub = ConsoleHub(viewer_buffer=4096)
        async with (
            serial_port() as port,
            hub.attach("vm1", PORT, port.paths) as fast,
            hub.attach("vm1", PORT, port.paths) as slow,
        ):
            seen = b""
            for n in range(20):
                await port.emit(b"%04d" % n + b"x" * 996)
                seen = await read_until(fast, b"%04d" % n, seen)
            while len(seen) < 20_000:
                seen += await anext(fast)
            assert len(seen) == 20_000
            assert await drained(slow) == b""  # dropped, its backlog discarded
            assert slow.end_reason == ENDED_TOO_SLOW
            assert hub.viewers("vm1", PORT) == 1
            await port.emit(b"still here\n")
            assert await read_until(fast, b"here\n") == b"still here\n"
            assert fast.end_reason is None

    run(go())


def test_the_connection_closes_when_the_last_viewer_leaves() -> None:
    async def go() -> None:
        hub = ConsoleHub()
        async with serial_port() as port:
            async with hub.attach("vm1", PORT, port.paths):
                async with hub.attach("vm1", PORT, port.paths):
                    pass
                assert hub.is_connected("vm1", PORT)
                assert not port.disconnected.is_set()
            assert not hub.is_connected("vm1", PORT)
            await asyncio.wait_for(port.disconnected.wait(), 5)
            assert port.clients == []
            # The next viewer opens a new connection.
            async with hub.attach("vm1", PORT, port.paths):
                await eventually(lambda: port.connections == 2)
            assert port.max_clients == 1

    run(go())


def test_sessions_end_when_qemu_closes_the_socket() -> None:
    async def go() -> None:
        hub = ConsoleHub()
        async with (
            serial_port() as port,
            hub.attach("vm1", PORT, port.paths) as one,
            hub.attach("vm1", PORT, port.paths) as two,
        ):
            await port.emit(b"powering off\n")
            await port.hang_up()
            # What was read before the end is still delivered.
            assert await drained(one) == b"powering off\n"
            assert await drained(two) == b"powering off\n"
            assert one.end_reason == two.end_reason == ENDED_CLOSED
            assert not hub.is_connected("vm1", PORT)
            with pytest.raises(QemuError):
                await one.send(b"anyone?\n")

    run(go())


def test_attaching_to_a_stopped_vm_fails() -> None:
    async def go() -> None:
        hub = ConsoleHub()
        async with serial_port(b"old output\n") as port:
            await port.close()
            port.paths.serial_socket(PORT).unlink(missing_ok=True)
            with pytest.raises(QemuError, match="cannot attach to serial0"):
                async with hub.attach("vm1", PORT, port.paths):
                    pass
            assert hub.viewers("vm1", PORT) == 0

    run(go())


def test_no_bytes_are_lost_between_history_and_live_output() -> None:
    """A viewer joining while the guest writes sees every line (a few maybe twice)."""

    async def go() -> None:
        hub = ConsoleHub()
        async with serial_port() as port:

            async def guest() -> None:
                for n in range(400):
                    await port.emit(b"line-%04d\n" % n)
                    if n % 10 == 0:
                        await asyncio.sleep(0.001)
                await port.emit(b"END\n")

            async def viewer(delay: float) -> bytes:
                await asyncio.sleep(delay)
                async with hub.attach("vm1", PORT, port.paths) as session:
                    return await read_until(session, b"END\n", session.history)

            async with hub.attach("vm1", PORT, port.paths):  # keeps the line open
                writer = asyncio.create_task(guest())
                seen = await asyncio.gather(*(viewer(d) for d in (0.0, 0.01, 0.03, 0.05)))
                await writer
        for data in seen:
            numbers = sorted({int(n) for n in re.findall(rb"line-(\d{4})\n", data)})
            assert numbers == list(range(400))

    run(go())


def test_leaving_twice_is_harmless() -> None:
    async def go() -> None:
        hub = ConsoleHub()
        async with serial_port() as port:
            session = hub.attach("vm1", PORT, port.paths)
            async with session:
                pass
            await session.__aexit__(None, None, None)
            assert not hub.is_connected("vm1", PORT)

    run(go())
