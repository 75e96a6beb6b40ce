"""Disk images through qemu-img. Blocking work runs in a subprocess, off the event loop."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinvisor.errors import ImageError, InvalidArgument

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_DISK_BYTES = 64 << 40


def parse_size(text: str, field: str = "size") -> int:
    """``"10G"``, ``"512M"``, ``"1.5GiB"`` or a byte count, to bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(field, f"{text!r} is not a size like 512M or 10G")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise InvalidArgument(field, "must be greater than zero")
    if size > MAX_DISK_BYTES:
        raise InvalidArgument(field, "must be at most 64T")
    return size


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None


async def _qemu_img(binary: str, *args: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ImageError(f"cannot run {binary}: {exc}") from exc
    out, err = await proc.communicate()
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip().splitlines()
        raise ImageError(f"qemu-img {args[0]}: {detail[-1] if detail else 'failed'}")
    return out.decode()


class Images:
    """qemu-img, with thinvisor's defaults."""

    def __init__(self, binary: str = "qemu-img"):
        self.binary = binary

    async def create(self, path: Path, fmt: str, size: int) -> None:
        """A new thin image; refuses to overwrite an existing file."""
        if path.exists():
            raise ImageError(f"{path} already exists")
        await _qemu_img(self.binary, "create", "-q", "-f", fmt, str(path), str(size))

    async def info(self, path: Path) -> ImageInfo:
        data: dict[str, Any] = json.loads(
            await _qemu_img(self.binary, "info", "--output=json", "-U", str(path))
        )
        return ImageInfo(
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data.get("actual-size", 0)),
            backing_file=data.get("backing-filename"),
        )

    async def convert(self, source: Path, dest: Path, fmt: str) -> None:
        """Copy ``source`` (any format qemu-img reads) into a new image ``dest``."""
        if dest.exists():
            raise ImageError(f"{dest} already exists")
        await _qemu_img(self.binary, "convert", "-q", "-O", fmt, str(source), str(dest))

    async def resize(self, path: Path, fmt: str, size: int) -> None:
        """Grow an image that no QEMU has open (running VMs use QMP block_resize)."""
        await _qemu_img(self.binary, "resize", "-q", "-f", fmt, str(path), str(size))
