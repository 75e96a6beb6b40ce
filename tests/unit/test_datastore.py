"""Datastore storage logic: safe paths, listings, streamed uploads, deletes."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from thinvisor.errors import AlreadyExists, InvalidArgument, NotFound
from thinvisor.storage import datastore as ds
from thinvisor.storage.datastore import TooLarge

P = ParamSpec("P")


def run_async(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """A coroutine test run to completion in a fresh event loop."""

    @functools.wraps(test)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    (root / "iso").mkdir(parents=True)
    (root / "iso" / "boot.iso").write_bytes(b"x" * 1000)
    (root / "vm1").mkdir()
    (root / "vm1" / "vm.toml").write_text('name = "vm1"\n')
    (root / "vm1" / "disk0.qcow2").write_bytes(b"d" * 5000)
    return root


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ds.UPLOAD_INFIX in p.name)


async def stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


# safe_path


@pytest.mark.parametrize(
    "relpath",
    [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "iso/../..",
        "..",
        "iso/\0x",
        ".hidden",
        "iso/.x",
        "a" * 239,
        "a/" * 2100,
    ],
)
def test_safe_path_refuses_escapes(root: Path, relpath: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ds.safe_path(root, relpath)
    assert info.value.field == "path"


def test_safe_path_refuses_symlink_leaving_the_datastore(root: Path) -> None:
    (root / "etc").symlink_to("/etc")
    (root / "iso" / "passwd").symlink_to("/etc/passwd")
    for relpath in ("etc", "etc/passwd", "iso/passwd", "etc/newfile"):
        with pytest.raises(InvalidArgument, match="outside the datastore"):
            ds.safe_path(root, relpath)


@run_async
async def test_longest_name_uploads(root: Path) -> None:
    name = "é" * (ds.NAME_MAX // 2)
    await ds.upload(root, name, stream([b"x"]), max_bytes=10)
    assert (root / name).read_bytes() == b"x"


def test_safe_path_refuses_a_symlink_loop(root: Path) -> None:
    (root / "loop").symlink_to("loop")
    with pytest.raises(InvalidArgument, match="cannot be resolved"):
        ds.safe_path(root, "loop/x")


def test_safe_path_accepts_paths_inside(root: Path) -> None:
    (root / "images").symlink_to("iso")
    assert ds.safe_path(root, "") == root
    assert ds.safe_path(root, "iso/boot.iso") == root / "iso" / "boot.iso"
    assert ds.safe_path(root, "iso//new\\name") == root / "iso" / "new\\name"
    assert ds.safe_path(root, "images/boot.iso") == root / "images" / "boot.iso"


def test_safe_path_follows_a_symlinked_root(root: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(root)
    assert ds.safe_path(link, "iso/boot.iso") == link / "iso" / "boot.iso"


# listings and info


def test_list_dir(root: Path) -> None:
    (root / ".creating-vm2").mkdir()
    (root / "iso" / "link").symlink_to("boot.iso")
    top = ds.list_dir(root, "")
    assert [(e.name, e.kind, e.path) for e in top] == [("iso", "dir", "iso"), ("vm1", "dir", "vm1")]
    iso = {e.name: e for e in ds.list_dir(root, "iso")}
    assert iso["boot.iso"].kind == "file"
    assert iso["boot.iso"].size == 1000
    assert iso["boot.iso"].path == "iso/boot.iso"
    assert iso["boot.iso"].modified.endswith("Z")
    assert iso["link"].kind == "link"


def test_list_dir_errors(root: Path) -> None:
    with pytest.raises(NotFound):
        ds.list_dir(root, "nothing")
    with pytest.raises(InvalidArgument, match="not a directory"):
        ds.list_dir(root, "iso/boot.iso")


def test_datastore_info(root: Path, tmp_path: Path) -> None:
    info = ds.datastore_info("local", root)
    assert info.accessible
    assert info.capacity_bytes and info.free_bytes is not None
    assert info.capacity_bytes >= info.free_bytes
    assert info.vm_used_bytes is not None
    assert info.vm_used_bytes >= 5000  # the VM's files, not the ISO directory
    missing = ds.datastore_info("gone", tmp_path / "missing")
    assert not missing.accessible
    assert missing.capacity_bytes is None


# write_stream


@run_async
async def test_write_stream(root: Path) -> None:
    seen: list[int] = []
    target = root / "iso" / "new.iso"
    n = await ds.write_stream(
        target, stream([b"a" * 10, b"b" * 20]), max_bytes=100, progress=seen.append
    )
    assert n == 30
    assert target.read_bytes() == b"a" * 10 + b"b" * 20
    assert seen == [10, 30]
    assert target.stat().st_mode & 0o777 == 0o644
    assert leftovers(root / "iso") == []


@run_async
async def test_write_stream_large_batches(root: Path) -> None:
    data = os.urandom(3 * ds.WRITE_BATCH + 123)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    target = root / "iso" / "big"
    assert await ds.write_stream(target, stream(chunks), max_bytes=len(data)) == len(data)
    assert target.read_bytes() == data


@run_async
async def test_write_stream_refuses_too_much_and_leaves_nothing(root: Path) -> None:
    received: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            received.append(1)
            yield b"z" * 4096

    target = root / "iso" / "huge.iso"
    with pytest.raises(TooLarge) as info:
        await ds.write_stream(target, endless(), max_bytes=10_000)
    assert info.value.http_status == 413
    assert len(received) == 3  # stopped as soon as the limit was passed
    assert not target.exists()
    assert leftovers(root / "iso") == []


@run_async
async def test_write_stream_refuses_to_overwrite(root: Path) -> None:
    target = root / "iso" / "boot.iso"
    with pytest.raises(AlreadyExists):
        await ds.write_stream(target, stream([b"new"]), max_bytes=100)
    assert target.read_bytes() == b"x" * 1000
    await ds.write_stream(target, stream([b"new"]), max_bytes=100, overwrite=True)
    assert target.read_bytes() == b"new"
    assert leftovers(root / "iso") == []


@run_async
async def test_write_stream_loses_a_race_for_the_name(root: Path) -> None:
    target = root / "iso" / "raced"

    async def racing() -> AsyncIterator[bytes]:
        yield b"mine"
        target.write_bytes(b"theirs")

    with pytest.raises(AlreadyExists):
        await ds.write_stream(target, racing(), max_bytes=100)
    assert target.read_bytes() == b"theirs"
    assert leftovers(root / "iso") == []


@run_async
async def test_write_stream_refuses_a_directory(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="is a directory"):
        await ds.write_stream(root / "iso", stream([b"x"]), max_bytes=100, overwrite=True)


@run_async
async def test_write_stream_cleans_up_on_failure_and_cancellation(root: Path) -> None:
    class Broken(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * (2 * ds.WRITE_BATCH)
        raise Broken

    with pytest.raises(Broken):
        await ds.write_stream(root / "iso" / "f", failing(), max_bytes=1 << 30)
    assert leftovers(root / "iso") == []

    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"x" * 100
        started.set()
        await asyncio.Event().wait()
        yield b""

    task = asyncio.create_task(ds.write_stream(root / "iso" / "g", stalled(), max_bytes=1000))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(root / "iso") == []
    assert not (root / "iso" / "g").exists()


# upload, make_dir, delete


@run_async
async def test_upload_creates_parents(root: Path) -> None:
    entry = await ds.upload(root, "images/linux/a.iso", stream([b"abc"]), max_bytes=10)
    assert entry.path == "images/linux/a.iso"
    assert entry.size == 3
    assert (root / "images" / "linux" / "a.iso").read_bytes() == b"abc"


@pytest.mark.parametrize(
    "relpath", ["vm1/disk1.qcow2", "vm1/disk0.qcow2", "vm1/new/x", "newvm/vm.toml", "", "vm1"]
)
@run_async
async def test_upload_refused_into_vm_directories(root: Path, relpath: str) -> None:
    with pytest.raises(InvalidArgument):
        await ds.upload(root, relpath, stream([b"x"]), max_bytes=10, overwrite=True)
    assert (root / "vm1" / "disk0.qcow2").read_bytes() == b"d" * 5000
    assert not (root / "newvm").exists()
    assert sorted(p.name for p in (root / "vm1").iterdir()) == ["disk0.qcow2", "vm.toml"]


@run_async
async def test_upload_refused_through_a_symlink_to_a_vm_directory(root: Path) -> None:
    (root / "sneaky").symlink_to("vm1")
    with pytest.raises(InvalidArgument, match="vm1"):
        await ds.upload(root, "sneaky/x", stream([b"x"]), max_bytes=10)
    assert not (root / "vm1" / "x").exists()


@run_async
async def test_upload_under_a_file_is_refused(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a directory"):
        await ds.upload(root, "iso/boot.iso/x", stream([b"x"]), max_bytes=10)


def test_make_dir(root: Path) -> None:
    entry = ds.make_dir(root, "a/b/c")
    assert (entry.path, entry.kind) == ("a/b/c", "dir")
    assert (root / "a" / "b" / "c").is_dir()
    with pytest.raises(AlreadyExists):
        ds.make_dir(root, "a/b/c")
    with pytest.raises(InvalidArgument):
        ds.make_dir(root, "vm1/logs2")


def test_delete(root: Path) -> None:
    (root / "iso" / "link").symlink_to("boot.iso")
    assert ds.delete(root, "iso/link").kind == "link"
    assert (root / "iso" / "boot.iso").exists()
    with pytest.raises(InvalidArgument, match="not empty"):
        ds.delete(root, "iso")
    assert ds.delete(root, "iso/boot.iso").size == 1000
    assert ds.delete(root, "iso").kind == "dir"
    with pytest.raises(NotFound):
        ds.delete(root, "iso")


@pytest.mark.parametrize("relpath", ["vm1/disk0.qcow2", "vm1/vm.toml", "vm1", "", "../ds/iso"])
def test_delete_refused(root: Path, relpath: str) -> None:
    with pytest.raises(InvalidArgument):
        ds.delete(root, relpath)
    assert (root / "vm1" / "disk0.qcow2").exists()
    assert (root / "iso" / "boot.iso").exists()


def test_open_file(root: Path) -> None:
    path, st = ds.open_file(root, "iso/boot.iso")
    assert path == root / "iso" / "boot.iso"
    assert st.st_size == 1000
    with pytest.raises(NotFound):
        ds.open_file(root, "iso/none")
    with pytest.raises(InvalidArgument):
        ds.open_file(root, "iso")


@run_async
async def test_failed_upload_removes_the_directories_it_made(root: Path) -> None:
    (root / "a").mkdir()
    with pytest.raises(TooLarge):
        await ds.upload(root, "a/b/c/big", stream([b"x" * 20]), max_bytes=10)
    assert sorted(p.name for p in root.iterdir()) == ["a", "iso", "vm1"]
    assert list((root / "a").iterdir()) == []
