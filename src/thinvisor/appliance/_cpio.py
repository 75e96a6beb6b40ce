"""A deterministic writer for the "newc" cpio format, the one the kernel unpacks.

The same entries always give the same bytes: entries are sorted by path, parent
directories are added implicitly, and owners, timestamps and inode numbers are fixed.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``path`` is relative (no leading slash); ``data`` holds a
    regular file's content or a symlink's target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class CpioArchive:
    """Collects entries by path; the last one added for a path wins."""

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self.add(CpioEntry(path, stat.S_IFDIR | perm))

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self.add(CpioEntry(path, stat.S_IFREG | perm, data))

    def add_symlink(self, path: str, target: str) -> None:
        self.add(CpioEntry(path, stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self.add(CpioEntry(path, stat.S_IFCHR | perm, rdev=(major, minor)))

    def entries(self) -> list[CpioEntry]:
        return [self._entries[path] for path in sorted(self._entries)]

    def get(self, path: str) -> CpioEntry:
        return self._entries[_normalise(path)]

    def to_bytes(self) -> bytes:
        """The archive, trailer included."""
        return write_newc(self._entries.values())

    def add(self, entry: CpioEntry) -> None:
        path = _normalise(entry.path)
        parent = path.rpartition("/")[0]
        if parent and parent not in self._entries:
            self.add_dir(parent)
        self._entries[path] = CpioEntry(path, entry.mode, entry.data, entry.rdev)


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries`` sorted by path, then the trailer."""
    members = sorted(entries, key=lambda e: e.path)
    out = bytearray()
    for ino, entry in enumerate(members, start=1):
        out += _member(entry, ino)
    out += _header(_TRAILER, ino=0, mode=0, nlink=1, size=0, rdev=(0, 0))
    return bytes(out)


def _member(entry: CpioEntry, ino: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    data = entry.data if stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode) else b""
    head = _header(
        entry.path, ino=ino, mode=entry.mode, nlink=nlink, size=len(data), rdev=entry.rdev
    )
    return head + data + _pad(len(data))


def _header(
    name: str, *, ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int]
) -> bytes:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    head = _MAGIC + b"".join(b"%08X" % value for value in fields) + raw_name
    return head + _pad(len(head))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _normalise(path: str) -> str:
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad archive path: {path!r}")
    return "/".join(parts)
