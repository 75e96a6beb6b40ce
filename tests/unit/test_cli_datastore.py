"""``thinvisor datastore`` on a throwaway local host, and the remote client's datastore
calls against the API's routes (through ASGI, no sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher

from thinvisor.api import storage as storage_api
from thinvisor.api.app import create_app
from thinvisor.auth import Role, UserStore
from thinvisor.cli.datastore import size_text, split_path, upload_path
from thinvisor.cli.remote import Login, RemoteHost
from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from thinvisor.host.agent import HostAgent
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.hostinfo import HostFacts
from thinvisor.host.service import HostService
from thinvisor.model.create import NewDiskSpec, VmCreate

from .clienv import host_env, tv


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "ds").mkdir()
    (tmp_path / "nfs").mkdir()
    return host_env(tmp_path)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("local", ("local", "")),
        ("local/", ("local", "")),
        ("local/iso/boot.iso", ("local", "iso/boot.iso")),
        ("[local] iso/boot.iso", ("local", "iso/boot.iso")),
        ("[datastore 1]", ("datastore 1", "")),
    ],
)
def test_split_path(text: str, parts: tuple[str, str]) -> None:
    assert split_path(text) == parts


@pytest.mark.parametrize("text", ["", "/iso/boot.iso", "[] iso"])
def test_split_path_needs_a_datastore(text: str) -> None:
    with pytest.raises(InvalidArgument, match="does not name a datastore"):
        split_path(text)


def test_upload_path_keeps_the_local_name_for_a_directory() -> None:
    local = Path("/tmp/boot.iso")
    assert upload_path("local", local) == ("local", "boot.iso")
    assert upload_path("local/iso/", local) == ("local", "iso/boot.iso")
    assert upload_path("local/iso/new.iso", local) == ("local", "iso/new.iso")


def test_size_text() -> None:
    assert [size_text(n) for n in (None, 0, 1023, 1536, 20 << 30)] == [
        "-",
        "0 B",
        "1023 B",
        "1.5 KiB",
        "20.0 GiB",
    ]


def test_local_datastore_commands(env: dict[str, str], tmp_path: Path) -> None:
    nfs = tmp_path / "nfs"
    added = json.loads(tv(env, "datastore", "add", "nfs", str(nfs), "--json"))
    assert (added["name"], added["origin"], added["path"]) == ("nfs", "added", str(nfs))
    listed = json.loads(tv(env, "datastore", "list", "--json"))
    assert [(d["name"], d["origin"]) for d in listed] == [("local", "host.toml"), ("nfs", "added")]
    table = tv(env, "datastore", "list")
    assert "PROVISIONED" in table and "nfs" in table and "added" in table
    assert "datastores.toml (added)" in tv(env, "datastore", "show", "nfs")

    iso = tmp_path / "boot.iso"
    iso.write_bytes(b"iso" * 1000)
    assert tv(env, "datastore", "upload", str(iso), "nfs/iso/") == (
        "nfs/iso/boot.iso: uploaded (3000 bytes)\n"
    )
    assert (nfs / "iso" / "boot.iso").read_bytes() == iso.read_bytes()
    assert "already exists" in tv(env, "datastore", "upload", str(iso), "nfs/iso/", code=1)
    tv(env, "datastore", "upload", str(iso), "[nfs] iso/boot.iso", "--overwrite")
    assert tv(env, "datastore", "mkdir", "nfs/images/linux") == "nfs/images/linux: created\n"
    entries = json.loads(tv(env, "datastore", "ls", "nfs", "--json"))
    assert [(e["name"], e["kind"]) for e in entries] == [("images", "dir"), ("iso", "dir")]
    listing = tv(env, "datastore", "ls", "nfs/iso")
    assert "boot.iso" in listing and "file" in listing and "2.9 KiB" in listing
    [one] = json.loads(tv(env, "datastore", "ls", "nfs/iso/boot.iso", "--json"))
    assert (one["path"], one["size"]) == ("iso/boot.iso", 3000)

    out = tmp_path / "out"
    out.mkdir()
    assert tv(env, "datastore", "download", "nfs/iso/boot.iso", str(out)) == (
        f"nfs/iso/boot.iso: downloaded to {out / 'boot.iso'} (3000 bytes)\n"
    )
    assert (out / "boot.iso").read_bytes() == iso.read_bytes()
    assert "already exists" in tv(
        env, "datastore", "download", "nfs/iso/boot.iso", str(out), code=1
    )
    assert "is not a regular file" in tv(env, "datastore", "download", "nfs/iso", str(out), code=1)

    assert "is not empty" in tv(env, "datastore", "rm", "nfs/images", code=1)
    assert tv(env, "datastore", "rm", "nfs/images/linux") == "nfs/images/linux: deleted\n"
    assert tv(env, "datastore", "remove", "nfs") == "nfs: removed; its files were kept\n"
    assert (nfs / "iso" / "boot.iso").exists()
    assert [d["name"] for d in json.loads(tv(env, "datastore", "list", "--json"))] == ["local"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "x", "relative"], "error: path: must be an absolute path\n"),
        (["add", "local", "/tmp"], "error: datastore 'local' already exists\n"),
        (["remove", "local"], "defined in host.toml; remove it there\n"),
        (["remove", "none"], "error: datastore 'none' does not exist\n"),
        (["show", "none"], "error: datastore 'none' does not exist\n"),
        (["ls", "/iso"], "does not name a datastore: give DS/PATH\n"),
        (["ls", "local/../etc"], "error: path: must not contain '..'\n"),
        (["upload", "/nonexistent", "local/x"], "error: local: /nonexistent does not exist\n"),
        (["rm", "local"], "error: path: the datastore's root cannot be changed\n"),
        (["upload", "/", "local/x"], "error: local: / is not a regular file\n"),
        (["download", "local/x", "/tmp"], "error: x does not exist\n"),
    ],
)
def test_local_refusals_are_one_line(env: dict[str, str], args: list[str], message: str) -> None:
    err = tv(env, "datastore", *args, code=1)
    assert err.endswith(message) and err.count("\n") == 1, err


def test_download_needs_a_local_directory(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "ds" / "a.iso").write_bytes(b"iso")
    err = tv(env, "datastore", "download", "local/a.iso", str(tmp_path / "none" / "a.iso"), code=1)
    assert err == f"error: local: {tmp_path / 'none'} is not a directory\n"
    assert not (tmp_path / "none").exists()


def test_remove_names_the_vm_using_the_datastore(env: dict[str, str], tmp_path: Path) -> None:
    tv(env, "datastore", "add", "nfs", str(tmp_path / "nfs"))
    tv(env, "vm", "create", "web1", "--memory", "128", "--datastore", "nfs", "--disk", "16M")
    shown = json.loads(tv(env, "datastore", "show", "nfs", "--json"))
    assert shown["provisioned_bytes"] == 16 << 20
    assert [(v["name"], v["provisioned_bytes"]) for v in shown["vms"]] == [("web1", 16 << 20)]
    err = tv(env, "datastore", "remove", "nfs", code=1)
    assert "datastore 'nfs' is in use (vm 'web1': its directory is there)" in err
    tv(env, "vm", "delete", "web1")
    tv(env, "datastore", "remove", "nfs")


# The remote client against the real routes

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[HostAgent]:
    (tmp_path / "nfs").mkdir()
    config = HostConfig(
        qemu_binary=str(tmp_path / "no-qemu-in-unit-tests"),
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        datastores=[DatastoreConfig(name="local", path=tmp_path / "ds")],
    )
    facts = HostFacts(cpus=4, memory_total_mib=8192, memory_available_mib=4096, cpu_model="test")
    service = HostService(config, accel=lambda: AccelChoice("tcg", "test"), facts=lambda: facts)
    agent = HostAgent(config, service=service)
    agent.users = UserStore(config.state_dir / "users.json", hasher=FAST)
    agent.users.add_user("admin", "password123", Role.ADMIN)
    yield agent
    agent.events.close()


async def _remote(agent: HostAgent) -> RemoteHost:
    _, token = agent.users.create_token("admin", "test")
    host = RemoteHost(Login(url="http://agent", token=token, fingerprint=None, user="admin"))
    await host._client.aclose()
    app = create_app(agent, start_agent=False)
    if not any(getattr(r, "path", "") == "/api/v1/vms/{vm}/storage" for r in app.routes):
        app.include_router(storage_api.router, prefix="/api/v1")
    host._client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://agent/api/v1",
        headers={"Authorization": f"Bearer {token}"},
    )
    return host


def test_remote_datastore_calls_reach_the_routes(agent: HostAgent, tmp_path: Path) -> None:
    nfs = tmp_path / "nfs"
    data = bytes(range(256)) * 8192  # 2 MiB, more than one chunk
    (tmp_path / "up.img").write_bytes(data)

    async def go() -> None:
        async with await _remote(agent) as host:
            stores = host.datastores
            added = await stores.add_datastore("nfs", nfs)
            assert (added.name, added.origin) == ("nfs", "added")
            with pytest.raises(AlreadyExists):
                await stores.add_datastore("nfs", nfs)
            assert [d.name for d in await stores.list_datastores()] == ["local", "nfs"]
            assert (await stores.get_datastore("nfs")).path == str(nfs)
            entry = await stores.upload("nfs", "images/up.img", tmp_path / "up.img")
            assert (entry.path, entry.size) == ("images/up.img", len(data))
            with pytest.raises(AlreadyExists):
                await stores.upload("nfs", "images/up.img", tmp_path / "up.img")
            await stores.upload("nfs", "images/up.img", tmp_path / "up.img", overwrite=True)
            assert (await stores.make_dir("nfs", "iso")).kind == "dir"
            assert [e.name for e in await stores.list_dir("nfs")] == ["images", "iso"]
            [file] = await stores.list_dir("nfs", "images/up.img")
            assert file.size == len(data)
            with pytest.raises(NotFound):
                await stores.list_dir("nfs", "images/none")
            written = await stores.download("nfs", "images/up.img", tmp_path / "down")
            assert written == tmp_path / "down" / "up.img"
            assert written.read_bytes() == data
            with pytest.raises(AlreadyExists):
                await stores.download("nfs", "images/up.img", written)
            with pytest.raises(InvalidArgument, match="is a directory"):
                await stores.download("nfs", "images", tmp_path / "x")
            await stores.delete("nfs", "iso")
            with pytest.raises(NotFound):
                await stores.delete("nfs", "iso")

            await agent.service.create_from(
                VmCreate(name="vm1", datastore="nfs", disks=[NewDiskSpec(size=8 << 20)])
            )
            usage = await stores.vm_storage("vm1")
            assert usage.provisioned_bytes == 8 << 20 and usage.disks[0].datastore == "nfs"
            with pytest.raises(Busy, match="vm 'vm1'"):
                await stores.remove_datastore("nfs")
            await agent.service.delete_vm("vm1")
            await stores.remove_datastore("nfs")
            with pytest.raises(NotFound):
                await stores.get_datastore("nfs")

    (tmp_path / "down").mkdir()
    asyncio.run(go())
