"""Crash-safe file writes: temporary file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from thinvisor.errors import InvalidConfig


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    raw = data.encode() if isinstance(data, str) else data
    atomic_write_with(path, lambda f: f.write(raw), mode)


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """``atomic_write`` for content that ``write`` puts into the open temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def tail(path: Path, max_bytes: int = 65536) -> bytes:
    """The last ``max_bytes`` of a file, or nothing when it does not exist."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read()
    except FileNotFoundError:
        return b""


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (made if missing) between processes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """``path``, a directory only its owner may enter (made so where it is not): a
    center's state holds its users' password hashes, its TLS key and the key that opens
    the hosts' passwords."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise InvalidConfig(f"state_dir: cannot make {path} private: {exc.strerror}") from None
    return path
