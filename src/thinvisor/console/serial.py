"""Serial consoles: QEMU serves each serial port on a private unix socket.

QEMU logs everything the guest writes to the port whether or not anybody is attached,
so the log file is the history and the socket is the live, two-way line. QEMU serves one
client at a time on the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import selectors
import socket
import sys
import termios
import time
import tty
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from thinvisor.errors import QemuError
from thinvisor.fs import tail

DETACH_KEY = b"\x1d"  # Ctrl-], as in telnet and virsh console
DETACH_KEY_NAME = "Ctrl-]"
_counter = itertools.count(1)


class SerialConsole:
    """A scripted session on a serial console (a shell prompt on the other side)."""

    def __init__(self, sock: Path, *, connect_timeout: float = 10.0):
        self.sock = sock
        self.connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = b""

    async def __aenter__(self) -> Self:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.sock)), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise QemuError(f"cannot attach to the serial console {self.sock}: {exc}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def send(self, text: str) -> None:
        assert self._writer is not None, "not attached"
        self._writer.write(text.encode())
        await self._writer.drain()

    async def expect(self, pattern: str | re.Pattern[bytes], timeout: float = 30.0) -> bytes:
        """Read until ``pattern`` matches; return everything up to the end of the match."""
        assert self._reader is not None, "not attached"
        regex = re.compile(pattern.encode()) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while not (m := regex.search(self._buffer)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{regex.pattern!r} not seen on {self.sock}")
            try:
                chunk = await asyncio.wait_for(self._reader.read(4096), remaining)
            except TimeoutError:
                continue
            if not chunk:
                raise QemuError(f"serial console {self.sock} closed")
            self._buffer += chunk
        seen, self._buffer = self._buffer[: m.end()], self._buffer[m.end() :]
        return seen

    async def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command in the guest; its exit status and output."""
        n = next(_counter)
        # The quotes keep the terminal's echo of the command from matching the markers.
        await self.send(f"echo TV-B''EGIN-{n}; {command}; echo TV-E''ND-{n}-$?\n")
        await self.expect(rf"TV-BEGIN-{n}\r?\n", timeout)
        seen = await self.expect(rf"TV-END-{n}-(\d+)", timeout)
        m = re.search(rb"TV-END-\d+-(\d+)$", seen)
        assert m is not None
        output = seen[: m.start()].decode(errors="replace").replace("\r\n", "\n")
        return int(m.group(1)), output


def history(log: Path, lines: int) -> bytes:
    """The last ``lines`` lines of a serial log."""
    if lines <= 0:
        return b""
    data = tail(log, 64 * 1024)
    return b"\n".join(data.split(b"\n")[-lines - 1 :])


def attach(sock: Path, stdin: BinaryIO, stdout: BinaryIO, *, linger: float = 0.5) -> None:
    """Connect a terminal (or pipes) to a serial console until detach or end of input.

    On a terminal, the detach key ends the session. With piped input, the session ends
    ``linger`` seconds after the input does, so the guest's answer is not lost.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock))
    except OSError as exc:
        raise QemuError(f"cannot attach to the serial console {sock}: {exc}") from exc
    in_fd, out_fd = stdin.fileno(), stdout.fileno()
    is_tty = os.isatty(in_fd)
    saved = termios.tcgetattr(in_fd) if is_tty else None
    try:
        if is_tty:
            tty.setraw(in_fd)
        _pump(conn, in_fd, out_fd, linger=linger, detach=is_tty)
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        conn.close()


def _pump(conn: socket.socket, in_fd: int, out_fd: int, *, linger: float, detach: bool) -> None:
    sel = selectors.DefaultSelector()
    sel.register(conn, selectors.EVENT_READ)
    sel.register(in_fd, selectors.EVENT_READ)
    input_done_at: float | None = None
    while True:
        timeout = None if input_done_at is None else input_done_at + linger - time.monotonic()
        if timeout is not None and timeout <= 0:
            return
        for key, _ in sel.select(timeout):
            if key.fileobj is conn:
                data = conn.recv(65536)
                if not data:
                    return
                os.write(out_fd, data)
            else:
                data = os.read(in_fd, 4096)
                if not data:
                    sel.unregister(in_fd)
                    input_done_at = time.monotonic()
                    continue
                if detach and DETACH_KEY in data:
                    data = data.split(DETACH_KEY, 1)[0]
                    if data:
                        conn.sendall(data)
                    return
                conn.sendall(data)


def is_terminal() -> bool:
    return sys.stdin.isatty()
