"""``/api/v1/datastores`` through FastAPI's TestClient: browse, download, upload, delete;
add and remove datastores; ``/api/v1/vms/{vm}/storage``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from starlette.exceptions import StarletteDeprecationWarning

from thinvisor.api import storage
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


# Adding and removing datastores; space per VM


def test_add_and_remove_a_datastore(client: TestClient, agent: HostAgent, tmp_path: Path) -> None:
    nfs = tmp_path / "nfs"
    nfs.mkdir()
    response = client.post(API, json={"name": "nfs", "path": str(nfs)})
    assert response.status_code == 201, response.text
    added = response.json()
    assert response.headers["location"] == f"{API}/nfs"
    assert (added["name"], added["path"], added["origin"]) == ("nfs", str(nfs), "added")
    assert added["accessible"] and added["filesystem"] and added["shared"] is False
    assert (added["provisioned_bytes"], added["vm_used_bytes"], added["vms"]) == (0, 0, [])
    assert [d["name"] for d in client.get(API).json()] == ["local", "empty", "nfs"]
    assert client.get(f"{API}/nfs").json()["origin"] == "added"
    # Its files can be browsed and uploaded to like any datastore's.
    assert client.put(f"{API}/nfs/files/iso/a.iso", content=b"iso").status_code == 201
    assert client.get(f"{API}/nfs/files/iso").json()["entries"][0]["name"] == "a.iso"

    assert client.delete(f"{API}/nfs").status_code == 204
    assert_error(client.get(f"{API}/nfs"), 404)
    assert_error(client.delete(f"{API}/nfs"), 404)
    assert (nfs / "iso" / "a.iso").read_bytes() == b"iso"  # removing deletes no file
    events = agent.events.list(kind_prefix="datastore.")
    assert [(e.kind, e.object, e.user) for e in events if e.kind != "datastore.file_uploaded"] == [
        ("datastore.added", "datastore/nfs", "admin"),
        ("datastore.removed", "datastore/nfs", "admin"),
    ]


def test_add_refusals_over_the_api(client: TestClient, local: Path, tmp_path: Path) -> None:
    (tmp_path / "nfs").mkdir()
    cases = [
        ({"name": "local", "path": str(tmp_path / "nfs")}, 409, "already exists"),
        ({"name": "x", "path": "relative"}, 400, "path: must be an absolute path"),
        ({"name": "x", "path": str(tmp_path / "none")}, 400, "does not exist"),
        ({"name": "x", "path": str(local / "iso")}, 400, "lies inside datastore 'local'"),
        ({"name": "x", "path": str(tmp_path)}, 400, "contains datastore 'local'"),
        ({"name": "a b", "path": str(tmp_path / "nfs")}, 400, "name: "),
    ]
    for body, status, message in cases:
        response = client.post(API, json=body)
        assert_error(response, status)
        assert message in response.json()["message"]
    assert_error(client.post(API, json={"name": "x"}), (400, 422))
    assert [d["name"] for d in client.get(API).json()] == ["local", "empty"]


def test_removal_is_refused_while_a_vm_is_there(client: TestClient, tmp_path: Path) -> None:
    nfs = tmp_path / "nfs"
    (nfs / "vm2").mkdir(parents=True)
    (nfs / "vm2" / "vm.toml").write_text('name = "vm2"\n')
    assert client.post(API, json={"name": "nfs", "path": str(nfs)}).status_code == 201
    listed = client.get(f"{API}/nfs").json()
    assert [v["name"] for v in listed["vms"]] == ["vm2"]
    assert listed["vms"][0]["used_bytes"] > 0
    response = client.delete(f"{API}/nfs")
    assert_error(response, 409)
    assert response.json()["error"] == "busy"
    assert "vm 'vm2'" in response.json()["message"]
    local_removal = client.delete(f"{API}/local")
    assert_error(local_removal, 400)
    assert "defined in host.toml" in local_removal.json()["message"]
    (nfs / "vm2" / "vm.toml").unlink()
    assert client.delete(f"{API}/nfs").status_code == 204


def test_add_and_remove_need_configure(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "nfs").mkdir()
    body = {"name": "nfs", "path": str(tmp_path / "nfs")}
    assert_error(client.post(API, json=body, auth=READER), 403)
    assert client.post(API, json=body).status_code == 201
    assert_error(client.delete(f"{API}/nfs", auth=READER), 403)
    assert client.get(f"{API}/nfs", auth=READER).status_code == 200


def test_vm_storage_route(agent: HostAgent) -> None:
    app = create_app(agent, start_agent=False)
    if not any(getattr(r, "path", "") == "/api/v1/vms/{vm}/storage" for r in app.routes):
        app.include_router(storage.router, prefix="/api/v1")
    with TestClient(app) as client:
        response = client.get("/api/v1/vms/vm1/storage", auth=READER)
        assert response.status_code == 200, response.text
        found = response.json()
        assert (found["name"], found["datastore"], found["disks"]) == ("vm1", "local", [])
        assert (found["provisioned_bytes"], found["used_bytes"] > 0) == (0, True)
        assert_error(client.get("/api/v1/vms/none/storage", auth=READER), 404)
        assert_error(client.get("/api/v1/vms/vm1/storage"), 401)
