"""Disk images through qemu-img. Blocking work runs in a subprocess, off the event loop."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinvisor.errors import ImageError, InsufficientResources, InvalidArgument, ThinvisorError

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


Report = Callable[[float], None]  # percent done, 0-100
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_NO_SPACE = ("No space left on device", "Disk quota exceeded")


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    # The image's own path as qemu-img opened it (absolute for the images of a chain).
    filename: str = ""
    backing_format: str | None = None

    @property
    def backing_path(self) -> Path | None:
        """The backing file's path, resolved against the image's directory."""
        if not self.backing_file:
            return None
        return Path(self.filename).parent / self.backing_file


def _image_info(data: dict[str, Any]) -> ImageInfo:
    return ImageInfo(
        format=str(data["format"]),
        virtual_size=int(data["virtual-size"]),
        actual_size=int(data.get("actual-size", 0)),
        backing_file=data.get("backing-filename"),
        filename=str(data.get("filename", "")),
        backing_format=data.get("backing-filename-format"),
    )


def _failure(args: Sequence[str], stderr: bytes) -> ThinvisorError:
    detail = stderr.decode(errors="replace").strip().splitlines()
    last = detail[-1] if detail else "failed"
    if any(text in last for text in _NO_SPACE):
        return InsufficientResources(f"the datastore is full (qemu-img {args[0]}: {last})")
    return ImageError(f"qemu-img {args[0]}: {last}")


async def _qemu_img(
    binary: str, *args: str, progress: Report | None = None, ok: tuple[int, ...] = (0,)
) -> str:
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
    try:
        if progress is None:
            out, err = await proc.communicate()
        else:
            out, err = await _with_progress(proc, progress)
    except BaseException:
        # Cancelled (a task ended with the agent): qemu-img must not write on unseen.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode not in ok:
        raise _failure(args, err)
    return out.decode()


async def _with_progress(proc: asyncio.subprocess.Process, report: Report) -> tuple[bytes, bytes]:
    """Read ``qemu-img -p``'s "(12.50/100%)" updates from stdout as they come."""
    assert proc.stdout is not None and proc.stderr is not None
    err_task = asyncio.create_task(proc.stderr.read())
    while chunk := await proc.stdout.read(256):
        found = _PROGRESS_RE.findall(chunk)
        if found:
            report(float(found[-1]))
    await proc.wait()
    return b"", await err_task


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
        return _image_info(data)

    async def chain(self, path: Path) -> list[ImageInfo]:
        """The image and its backing files, top first (readable while a VM runs)."""
        out = await _qemu_img(
            self.binary, "info", "--output=json", "--backing-chain", "-U", str(path.absolute())
        )
        data = json.loads(out)
        return [_image_info(d) for d in (data if isinstance(data, list) else [data])]

    async def convert(
        self,
        source: Path,
        dest: Path,
        fmt: str,
        *,
        options: Sequence[str] = (),
        source_format: str | None = None,
        progress: Report | None = None,
    ) -> None:
        """Copy ``source`` (any format qemu-img reads; a backing chain is flattened) into a
        new image ``dest``. ``options`` are ``-o`` options of the target format
        (``preallocation=full``, ``subformat=streamOptimized``). On failure the partial
        ``dest`` is removed."""
        if dest.exists():
            raise ImageError(f"{dest} already exists")
        args = ["convert", "-p" if progress else "-q", "-O", fmt]
        if source_format:
            args += ["-f", source_format]
        if options:
            args += ["-o", ",".join(options)]
        try:
            await _qemu_img(self.binary, *args, str(source), str(dest), progress=progress)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    async def create_overlay(self, path: Path, backing: str, backing_format: str) -> None:
        """A new qcow2 image on top of ``backing`` (a path relative to ``path``'s directory,
        or absolute). The backing file is not opened, so a running VM may hold it."""
        if path.exists():
            raise ImageError(f"{path} already exists")
        base = Path(backing) if Path(backing).is_absolute() else path.parent / backing
        size = (await self.info(base)).virtual_size
        await _qemu_img(
            self.binary, "create", "-q", "-f", "qcow2", "-u",
            "-b", backing, "-F", backing_format, str(path), str(size),
        )  # fmt: skip

    async def rebase(self, path: Path, backing: str | None, backing_format: str | None) -> None:
        """Make ``backing`` (None: no backing file) the backing file of qcow2 ``path``,
        copying into ``path`` whatever the new chain would otherwise read differently."""
        args = ["rebase", "-q", "-f", "qcow2", "-b", backing or ""]
        if backing and backing_format:
            args += ["-F", backing_format]
        await _qemu_img(self.binary, *args, str(path))

    async def check(self, path: Path, fmt: str = "qcow2") -> dict[str, Any]:
        """``qemu-img check``'s findings (leaked clusters are harmless: exit status 3);
        ImageError when the image is corrupt."""
        args = ("check", "--output=json", "-f", fmt, str(path))
        result: dict[str, Any] = json.loads(await _qemu_img(self.binary, *args, ok=(0, 3)))
        return result

    async def resize(self, path: Path, fmt: str, size: int) -> None:
        """Grow an image that no QEMU has open (running VMs use QMP block_resize)."""
        await _qemu_img(self.binary, "resize", "-q", "-f", fmt, str(path), str(size))
