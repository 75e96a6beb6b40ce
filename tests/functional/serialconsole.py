"""Typing shell commands on a guest's serial console and reading the answers back.

The console is a QEMU chardev unix socket whose output QEMU also writes to a log file:
commands go into the socket, answers are read from the log.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

TIMEOUT = 60.0


def _no_check() -> None:
    return None


class SerialConsole:
    """One connection to a guest's serial socket; ``check`` raises if the guest died."""

    def __init__(
        self, socket_path: Path, log_path: Path, check: Callable[[], None] = _no_check
    ) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.check = check
        self.sock: socket.socket | None = None
        self._markers = itertools.count(1)

    def connect(self, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                break
            except OSError:
                sock.close()
                self.check()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock = sock
        # Drain the socket so that QEMU never blocks on it; the log file is what we read.
        threading.Thread(target=self._drain, args=(sock,), daemon=True).start()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def log(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except FileNotFoundError:
            return b""

    def wait_for(
        self, pattern: re.Pattern[bytes], start: int = 0, timeout: float = TIMEOUT
    ) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.log(), start)
            if match:
                return match
            self.check()
            time.sleep(0.1)
        raise AssertionError(f"{pattern.pattern!r} not seen; serial log:\n{self.log()!r}")

    def run(self, command: str, *, timeout: float = TIMEOUT) -> str:
        """Run a shell command on the serial console and return its output.

        The markers are echoed through arithmetic expansion, so that the terminal's echo
        of the typed line does not match them. The command is typed again if no answer
        comes, so it must be harmless to repeat.
        """
        n = next(self._markers)
        line = f"echo B{n}x$((1+1)); {command}; echo E{n}x$((1+1))\n"
        pattern = re.compile(rf"B{n}x2\r?\n(.*?)E{n}x2".encode(), re.DOTALL)
        start = len(self.log())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send(line)
            retry = min(deadline, time.monotonic() + 10)
            while time.monotonic() < retry:
                match = pattern.search(self.log(), start)
                if match:
                    return match.group(1).decode(errors="replace").replace("\r\n", "\n")
                self.check()
                time.sleep(0.1)
        raise AssertionError(f"no answer to {command!r}; serial log:\n{self.log()!r}")

    def send(self, text: str) -> None:
        assert self.sock is not None
        self.sock.sendall(text.encode())
