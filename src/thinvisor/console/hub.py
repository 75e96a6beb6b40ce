"""Serial console multiplexing: one QEMU connection per serial port, any number of viewers.

QEMU serves a serial port's unix socket to one client at a time, so the agent holds that
one connection and fans the guest's output out to every viewer; what any viewer sends
goes to the guest. The connection opens with the first viewer and closes with the last.

QEMU blocks the guest's serial output while its client does not read, so the hub always
reads: each viewer has a bounded buffer, and a viewer that lets it overflow is dropped
rather than allowed to stall the guest and the other viewers.

History comes from the serial log, which QEMU writes whether or not anybody is attached.
A viewer subscribes to the live output first and reads the log after, so no byte is lost
at the seam; a few may arrive twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Self

from thinvisor.errors import QemuError
from thinvisor.fs import tail
from thinvisor.host.engine.paths import VmPaths

HISTORY_BYTES = 64 * 1024
VIEWER_BUFFER_BYTES = 1024 * 1024
READ_SIZE = 64 * 1024

ENDED_CLOSED = "the serial console closed"
ENDED_TOO_SLOW = "the viewer fell too far behind and was dropped"
ENDED_DETACHED = "the viewer detached"

_Key = tuple[str, str]


class ConsoleSession:
    """One viewer of a serial port: ``history``, then live output by ``async for``.

    Use it as an async context manager (``async with hub.attach(...) as session``). The
    iteration ends when the console closes (the VM stopped) or when the viewer is dropped
    for falling behind; ``end_reason`` then says which.
    """

    def __init__(self, hub: ConsoleHub, vm: str, port: str, paths: VmPaths):
        self.vm = vm
        self.port = port
        self.history = b""
        self.end_reason: str | None = None
        self._hub = hub
        self._paths = paths
        self._line: _Line | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._wakeup = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._line = await self._hub._join(self, self._paths)
        try:
            log = self._paths.serial_log(self.port)
            self.history = await asyncio.to_thread(tail, log, self._hub.history_bytes)
        except BaseException:
            await self._hub._leave(self)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._hub._leave(self)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        """Everything the guest wrote since the last call (waits for something)."""
        while not self._chunks:
            if self.end_reason is not None:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._queued = 0
        return data

    async def send(self, data: bytes) -> None:
        """Write ``data`` to the guest's serial port."""
        if self._line is None:
            raise QemuError(f"vm {self.vm!r}: not attached to {self.port}")
        await self._line.send(data)

    def _push(self, chunk: bytes) -> bool:
        """Queue guest output; False (and the session ends) when the buffer overflows."""
        if self.end_reason is not None:
            return False
        if self._queued + len(chunk) > self._hub.viewer_buffer:
            self._chunks.clear()
            self._queued = 0
            self._end(ENDED_TOO_SLOW)
            return False
        self._chunks.append(chunk)
        self._queued += len(chunk)
        self._wakeup.set()
        return True

    def _end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        self._wakeup.set()


class _Line:
    """The one connection to a serial port's socket, and the viewers it feeds."""

    def __init__(
        self,
        key: _Key,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_closed: Callable[[_Line], None],
    ):
        self.key = key
        self.viewers: set[ConsoleSession] = set()
        self.closed = False
        self._reader = reader
        self._writer = writer
        self._on_closed = on_closed
        self._task = asyncio.create_task(self._read(), name=f"console-{key[0]}-{key[1]}")

    def add(self, viewer: ConsoleSession) -> None:
        if self.closed:
            viewer._end(ENDED_CLOSED)
        else:
            self.viewers.add(viewer)

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise QemuError(f"vm {self.key[0]!r}: {ENDED_CLOSED}")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise QemuError(f"vm {self.key[0]!r}: cannot write to {self.key[1]}: {exc}") from exc

    async def close(self) -> None:
        if self._task is not asyncio.current_task():
            self._task.cancel()
            # wait(), not ``await task``: our own cancellation must not be swallowed.
            await asyncio.wait([self._task])
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _read(self) -> None:
        try:
            while chunk := await self._reader.read(READ_SIZE):
                for viewer in list(self.viewers):
                    if not viewer._push(chunk):
                        self.viewers.discard(viewer)
        except OSError:
            pass  # a reset is an end like any other
        finally:
            self.closed = True
            for viewer in self.viewers:
                viewer._end(ENDED_CLOSED)
            self._on_closed(self)
            self._writer.close()


class ConsoleHub:
    """Serial consoles shared between viewers: at most one QEMU connection per port."""

    def __init__(
        self,
        *,
        history_bytes: int = HISTORY_BYTES,
        viewer_buffer: int = VIEWER_BUFFER_BYTES,
        connect_timeout: float = 5.0,
    ):
        self.history_bytes = history_bytes
        self.viewer_buffer = viewer_buffer
        self.connect_timeout = connect_timeout
        self._lines: dict[_Key, _Line] = {}
        self._locks: collections.defaultdict[_Key, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )

    def attach(self, vm: str, port: str, paths: VmPaths) -> ConsoleSession:
        """A session on ``vm``'s serial ``port``; enter it to connect and read history.

        Entering raises ``QemuError`` when the port's socket cannot be reached (the VM
        is not running, or has no such port).
        """
        return ConsoleSession(self, vm, port, paths)

    def viewers(self, vm: str, port: str) -> int:
        """How many viewers share ``vm``'s ``port`` now."""
        line = self._lines.get((vm, port))
        return len(line.viewers) if line is not None else 0

    def is_connected(self, vm: str, port: str) -> bool:
        """Whether the hub holds a connection to ``vm``'s ``port``."""
        line = self._lines.get((vm, port))
        return line is not None and not line.closed

    async def _join(self, viewer: ConsoleSession, paths: VmPaths) -> _Line:
        key = (viewer.vm, viewer.port)
        async with self._locks[key]:
            line = self._lines.get(key)
            if line is None or line.closed:
                line = await self._connect(key, paths)
                self._lines[key] = line
            line.add(viewer)
            return line

    async def _connect(self, key: _Key, paths: VmPaths) -> _Line:
        sock = paths.serial_socket(key[1])
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(sock)), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise QemuError(f"vm {key[0]!r}: cannot attach to {key[1]}: {exc}") from exc
        return _Line(key, reader, writer, self._forget)

    async def _leave(self, viewer: ConsoleSession) -> None:
        key = (viewer.vm, viewer.port)
        line = viewer._line
        if line is None:
            return
        viewer._line = None
        viewer._end(ENDED_DETACHED)
        async with self._locks[key]:
            line.viewers.discard(viewer)
            if line.viewers:
                return
            self._forget(line)
            await line.close()

    def _forget(self, line: _Line) -> None:
        if self._lines.get(line.key) is line:
            del self._lines[line.key]
