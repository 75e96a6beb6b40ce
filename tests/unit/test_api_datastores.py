"""``/api/v1/datastores`` through FastAPI's TestClient: browse, download, upload, delete."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from starlette.exceptions import StarletteDeprecationWarning

from thinvisor.api.app import create_app
from thinvisor.auth import Role, UserStore
from thinvisor.config import ApiConfig, DatastoreConfig, HostConfig
from thinvisor.host.agent import HostAgent

with warnings.catch_warnings():
    # Starlette prefers httpx2 to the httpx we pin; the test client works with either.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ADMIN = ("admin", "password123")
READER = ("reader", "password123")
LIMIT = 8 << 20
API = "/api/v1/datastores"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[HostAgent]:
    local = tmp_path / "local"
    (local / "iso").mkdir(parents=True)
    (local / "iso" / "boot.iso").write_bytes(b"boot" * 256)
    (local / "vm1").mkdir()
    (local / "vm1" / "vm.toml").write_text('name = "vm1"\n')
    (local / "vm1" / "disk0.qcow2").write_bytes(b"disk")
    config = HostConfig(
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        datastores=[
            DatastoreConfig(name="local", path=local),
            DatastoreConfig(name="empty", path=tmp_path / "empty"),
        ],
        api=ApiConfig(upload_max_bytes=LIMIT),
    )
    agent = HostAgent(config)
    agent.users = UserStore(config.state_dir / "users.json", hasher=FAST)
    agent.users.add_user(*ADMIN, Role.ADMIN)
    agent.users.add_user(*READER, Role.READ_ONLY)
    yield agent
    agent.events.close()


@pytest.fixture
def client(agent: HostAgent) -> Iterator[TestClient]:
    with TestClient(create_app(agent, start_agent=False)) as client:
        client.auth = ADMIN
        yield client


@pytest.fixture
def local(agent: HostAgent) -> Path:
    return agent.config.datastores[0].path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) and the content of its files."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = path.read_bytes() if name in files else None
    return found


def assert_error(response: Any, status: int | tuple[int, ...]) -> None:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    body = response.json()
    assert set(body) >= {"error", "message"}


def chunks(data: bytes, size: int = 256 << 10) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_list_datastores(client: TestClient) -> None:
    response = client.get(API)
    assert response.status_code == 200
    stores = {d["name"]: d for d in response.json()}
    assert stores["local"]["accessible"] is True
    assert stores["local"]["capacity_bytes"] >= stores["local"]["free_bytes"] > 0
    assert stores["local"]["vm_used_bytes"] >= 0
    assert stores["empty"]["accessible"] is False
    assert client.get(f"{API}/local").json()["name"] == "local"
    assert_error(client.get(f"{API}/nowhere"), 404)


def test_browse(client: TestClient) -> None:
    top = client.get(f"{API}/local/files")
    assert top.status_code == 200
    assert top.json()["path"] == ""
    assert [e["name"] for e in top.json()["entries"]] == ["iso", "vm1"]
    iso = client.get(f"{API}/local/files/iso").json()
    assert iso["entries"] == [
        {
            "name": "boot.iso",
            "path": "iso/boot.iso",
            "kind": "file",
            "size": 1024,
            "modified": iso["entries"][0]["modified"],
        }
    ]
    assert_error(client.get(f"{API}/local/files/none"), 404)
    assert_error(client.get(f"{API}/nowhere/files"), 404)


def test_download(client: TestClient) -> None:
    response = client.get(f"{API}/local/files/iso/boot.iso")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == "1024"
    assert response.content == b"boot" * 256


def test_upload_download_round_trip(client: TestClient, agent: HostAgent, local: Path) -> None:
    data = os.urandom(3 << 20)
    response = client.put(f"{API}/local/files/images/linux/big.img", content=chunks(data))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["path"] == "images/linux/big.img"
    assert body["size"] == len(data)
    assert response.headers["location"] == f"{API}/local/files/images/linux/big.img"
    assert (local / "images" / "linux" / "big.img").read_bytes() == data

    task = client.get(f"/api/v1/tasks/{body['task']}").json()
    assert task["state"] == "success"
    assert task["kind"] == "datastore.upload"
    assert task["user"] == "admin"
    assert task["result"]["size"] == len(data)

    download = client.get(f"{API}/local/files/images/linux/big.img")
    assert download.headers["content-length"] == str(len(data))
    assert download.content == data

    uploaded = agent.events.list(kind_prefix="datastore.file_uploaded")
    assert uploaded[-1].user == "admin"
    assert uploaded[-1].data["path"] == "images/linux/big.img"


def test_overwrite(client: TestClient, local: Path) -> None:
    assert_error(client.put(f"{API}/local/files/iso/boot.iso", content=b"new"), 409)
    assert (local / "iso" / "boot.iso").read_bytes() == b"boot" * 256
    response = client.put(f"{API}/local/files/iso/boot.iso?overwrite=true", content=b"new")
    assert response.status_code == 201
    assert (local / "iso" / "boot.iso").read_bytes() == b"new"


def test_too_large_leaves_nothing(client: TestClient, local: Path) -> None:
    before = snapshot(local)
    # Announced too large: refused before the body is read.
    response = client.put(f"{API}/local/files/iso/big", content=b"x" * (LIMIT + 1))
    assert_error(response, 413)
    assert response.json()["error"] == "too_large"
    # Not announced (chunked): refused as the limit is passed.
    big = b"y" * (LIMIT + (1 << 20))
    assert_error(client.put(f"{API}/local/files/iso/big", content=chunks(big)), 413)
    assert_error(client.put(f"{API}/local/files/new/dir/big", content=chunks(big)), 413)
    assert snapshot(local) == before


@pytest.mark.parametrize(
    "path",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "iso%2F..%2F..%2Fx",
        "a/..%2F..%2Fx",
        "escape/passwd",
        "escape",
        "iso/%00x",
        ".hidden",
        "vm1/disk0.qcow2",
        "vm1/new",
        "newvm/vm.toml",
        "x" * 300,
    ],
)
def test_traversal_and_vm_directories_refused(client: TestClient, local: Path, path: str) -> None:
    (local / "escape").symlink_to("/etc")
    before = snapshot(local)
    url = f"{API}/local/files/{path}"
    assert_error(client.put(url, content=b"evil"), (400, 404))
    assert_error(client.delete(url), (400, 404))
    assert_error(client.post(f"{API}/local/dirs/{path}"), (400, 404))
    if not path.startswith("vm1"):
        assert_error(client.get(url), (400, 404))
    assert snapshot(local) == before


def test_dot_segments_do_not_leave_the_api(client: TestClient) -> None:
    # The client normalises '..' away; what is left names no route.
    assert_error(client.get(f"{API}/local/files/../../../../etc/passwd"), 404)


def test_mkdir_and_delete(client: TestClient, agent: HostAgent, local: Path) -> None:
    response = client.post(f"{API}/local/dirs/isos/linux")
    assert response.status_code == 201
    assert response.json()["kind"] == "dir"
    assert (local / "isos" / "linux").is_dir()
    assert_error(client.post(f"{API}/local/dirs/isos/linux"), 409)
    assert_error(client.delete(f"{API}/local/files/isos"), 400)  # not empty
    assert client.delete(f"{API}/local/files/isos/linux").status_code == 204
    assert client.delete(f"{API}/local/files/iso/boot.iso").status_code == 204
    assert not (local / "iso" / "boot.iso").exists()
    assert_error(client.delete(f"{API}/local/files/iso/boot.iso"), 404)
    deleted = agent.events.list(kind_prefix="datastore.file_deleted")
    assert [e.data["path"] for e in deleted] == ["isos/linux", "iso/boot.iso"]
    assert all(e.user == "admin" for e in deleted)


def test_permissions(client: TestClient, local: Path) -> None:
    before = snapshot(local)
    url = f"{API}/local/files/iso/new.iso"
    assert_error(client.put(url, content=b"x", auth=READER), 403)
    assert_error(client.delete(f"{API}/local/files/iso/boot.iso", auth=READER), 403)
    assert_error(client.post(f"{API}/local/dirs/x", auth=READER), 403)
    assert client.get(f"{API}/local/files/iso", auth=READER).status_code == 200
    client.auth = None
    assert_error(client.get(API), 401)
    assert_error(client.put(url, content=b"x"), 401)
    assert snapshot(local) == before


def test_openapi_declares_the_routes(client: TestClient) -> None:
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    files = paths["/api/v1/datastores/{ds}/files/{path}"]
    assert set(files) == {"get", "put", "delete"}
    content = files["get"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "application/octet-stream"}
    assert "application/octet-stream" in files["put"]["requestBody"]["content"]
    assert files["put"]["responses"]["201"]["content"]["application/json"]["schema"]
