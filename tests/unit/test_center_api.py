"""The center's REST API in-process: SQLite in ``tmp_path``, hosts of the fake provider.

Each test runs a real center (its agent started: every host followed by its sync) in one
event loop; requests go through httpx's ASGI transport, WebSockets through a real
uvicorn on a loopback port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from argon2 import PasswordHasher
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from thinvisor.auth import Role, UserStore
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.app import create_center_app
from thinvisor.center.api.tree import pruned_tree
from thinvisor.center.config import CenterApiConfig, CenterConfig, DatabaseConfig, SyncConfig
from thinvisor.center.sync import event_kind
from thinvisor.errors import InvalidArgument
from thinvisor.providers import KINDS, canonical_address
from thinvisor.providers.base import Capability, ChangeEvent, ChangeKind, PowerState
from thinvisor.providers.fake import FakeHost, FakeProvider, fake_host, remove_fake_host

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "password123"
ADMIN = ("admin", PASSWORD)
ALICE = ("alice", PASSWORD)  # read-only, unless granted more somewhere
FINGERPRINT = ":".join(["AB"] * 32)


class Center:
    """A running center and an HTTP client of its API."""

    def __init__(self, agent: CenterAgent, client: httpx.AsyncClient) -> None:
        self.agent = agent
        self.client = client

    async def call(
        self,
        method: str,
        path: str,
        *,
        status: int,
        auth: tuple[str, str] = ADMIN,
        **kwargs: Any,
    ) -> Any:
        """``method path`` as ``auth``; its JSON body, after checking its status."""
        response = await self.client.request(method, path, auth=auth, **kwargs)
        assert response.status_code == status, response.text
        return response.json() if response.content else None

    async def node(self, kind: str, parent: int | str | None, name: str) -> int:
        if kind == "datacenter":
            body: dict[str, Any] = {"name": name}
        else:
            body = {"parent": parent, "name": name}
        created = await self.call("POST", f"/{kind}s", json=body, status=201)
        node_id: int = created["id"]
        return node_id

    async def add_host(self, parent: int | str, host: FakeHost, **extra: Any) -> dict[str, Any]:
        body = {"parent": parent, "provider": "fake", "address": host.address}
        body |= {"username": "admin", "password": "secret", **extra}
        answer: dict[str, Any] = await self.call("POST", "/hosts", json=body, status=201)
        return answer

    async def vm_id(self, name: str) -> int:
        found = await self.call("GET", "/vms", params={"name": name}, status=200)
        assert len(found) == 1, found
        vm_id: int = found[0]["id"]
        return vm_id

    async def finished(self, task: dict[str, Any], auth: tuple[str, str] = ADMIN) -> Any:
        """The task once done."""
        for _ in range(200):
            if task["state"] in ("success", "error"):
                return task
            await asyncio.sleep(0.02)
            task = await self.call("GET", f"/tasks/{task['id']}", status=200, auth=auth)
        raise AssertionError(f"task {task} did not finish")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: The inventory every test's center uses: each test runs on SQLite and on PostgreSQL.
_DATABASE: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _on_each_database(database_url: str) -> Iterator[None]:
    _DATABASE["url"] = database_url
    yield
    _DATABASE.clear()


def center_config(tmp_path: Path) -> CenterConfig:
    # Short sync intervals: a host that stops answering is seen within a second.
    sync = SyncConfig(ping_interval_s=0.1, ping_timeout_s=0.5, reconnect_max_s=0.5)
    return CenterConfig(
        state_dir=tmp_path / "state",
        api=CenterApiConfig(tls=False),
        database=DatabaseConfig(url=_DATABASE.get("url")),
        sync=sync,
    )


@contextlib.asynccontextmanager
async def running_center(tmp_path: Path) -> AsyncIterator[Center]:
    agent = CenterAgent(center_config(tmp_path))
    agent.users = agent.gate.users = UserStore(tmp_path / "state" / "users.json", hasher=FAST)
    agent.users.add_user("admin", PASSWORD, Role.ADMIN)
    agent.users.add_user("alice", PASSWORD, Role.READ_ONLY)
    await agent.start()
    transport = httpx.ASGITransport(app=create_center_app(agent, start_agent=False))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://center/api/v1") as c:
            yield Center(agent, c)
    finally:
        await agent.stop()
        agent.events.close()


def run(tmp_path: Path, scenario: Callable[[Center], Awaitable[None]]) -> None:
    async def go() -> None:
        async with running_center(tmp_path) as center:
            await scenario(center)

    asyncio.run(go())


@pytest.fixture
def lab() -> Callable[..., FakeHost]:
    """Makes fake hosts at addresses of their own, taken away after the test."""
    made: list[str] = []

    def make(name: str, **kwargs: Any) -> FakeHost:
        address = kwargs.pop("address", f"fake://{name}-{uuid.uuid4().hex[:8]}")
        made.append(address)
        return fake_host(address, name=name, **kwargs)

    yield make
    for address in made:
        remove_fake_host(address)


# --- the tree -------------------------------------------------------------------------


def test_the_tree_is_built_renamed_moved_and_deleted(tmp_path: Path) -> None:
    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        prod = await c.node("folder", dc, "prod")
        web = await c.node("folder", "/dc1/prod", "web")
        cluster = await c.node("cluster", dc, "c1")
        found = await c.call("GET", "/nodes", params={"path": "/dc1/prod/web"}, status=200)
        assert found == {
            "id": web,
            "kind": "folder",
            "name": "web",
            "parent_id": prod,
            "path": "/dc1/prod/web",
            "tags": [],
        }
        tree = await c.call("GET", "/inventory", status=200)
        assert [n["path"] for n in tree[0]["children"]] == ["/dc1/prod", "/dc1/c1"]
        moved = await c.call("PATCH", f"/nodes/{web}", json={"parent": dc}, status=200)
        assert moved["path"] == "/dc1/web"
        renamed = await c.call("PATCH", f"/nodes/{web}", json={"name": "www"}, status=200)
        assert renamed["path"] == "/dc1/www"
        await c.call("DELETE", f"/nodes/{cluster}", status=204)
        await c.call("GET", f"/nodes/{cluster}", status=404)
        kinds = [e["kind"] for e in await c.call("GET", "/events", status=200)]
        assert kinds.count("inventory.created") == 4 and "inventory.deleted" in kinds

    run(tmp_path, scenario)


def test_bad_tree_changes_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        prod = await c.node("folder", dc, "prod")
        inner = await c.node("folder", prod, "inner")
        before = await c.call("GET", "/inventory", status=200)

        async def refused(method: str, path: str, body: dict[str, Any], status: int) -> str:
            answer = await c.call(method, path, json=body, status=status)
            message: str = answer["message"]
            return message

        duplicate = await refused("POST", "/folders", {"parent": dc, "name": "prod"}, 409)
        assert duplicate == "folder 'prod' already exists in /dc1"
        assert (await refused("POST", "/datacenters", {"name": "dc1"}, 409)).startswith(
            "datacenter 'dc1' already exists"
        )
        into_self = await refused("PATCH", f"/nodes/{prod}", {"parent": inner}, 400)
        assert into_self.startswith("parent: cannot move /dc1/prod into itself")
        unknown = await refused("POST", "/folders", {"parent": 9999, "name": "x"}, 400)
        assert unknown == "parent: no inventory object with id 9999"
        no_path = await refused("POST", "/clusters", {"parent": "/dc9", "name": "x"}, 400)
        assert no_path == "parent: no inventory object at /dc9"
        assert (await refused("POST", "/folders", {"parent": dc, "name": "a/b"}, 400)).startswith(
            "name: "
        )
        assert (await refused("POST", "/folders", {"parent": dc}, 400)) == "name: Field required"
        not_empty = await c.call("DELETE", f"/nodes/{prod}", status=400)
        assert not_empty["message"] == "node: folder /dc1/prod is not empty (1 object in it)"
        clash = await c.node("folder", dc, "other")
        await refused("PATCH", f"/nodes/{clash}", {"parent": prod, "name": "inner"}, 409)
        await c.call("DELETE", f"/nodes/{clash}", status=204)
        assert await c.call("GET", "/inventory", status=200) == before

    run(tmp_path, scenario)


def test_a_partial_view_of_the_tree_keeps_the_way_to_what_is_visible() -> None:
    # A user who reads only part of the tree (no-access, and a grant) sees the objects
    # they may read and the objects above them, so that each shows where it is.
    def entry(node_id: int, name: str, *children: dict[str, Any]) -> dict[str, Any]:
        return {"id": node_id, "kind": "folder", "name": name, "children": list(children)}

    host = {**entry(2, "h1", entry(3, "a/b")), "kind": "host", "state": "connected"}
    tree = [entry(1, "dc1", host, entry(4, "dev")), entry(5, "dc2")]
    kept = pruned_tree(tree, "/", {3})
    assert [(n.path, [c.path for c in n.children]) for n in kept] == [("/dc1", ["/dc1/h1"])]
    assert [c.path for c in kept[0].children[0].children] == ["/dc1/h1/a%2Fb"]
    # The way shows where things are, not how they are: the host's state is not shown.
    assert kept[0].children[0].state is None
    assert pruned_tree(tree, "/", {2})[0].children[0].state == "connected"
    assert [n.path for n in pruned_tree(tree, "/", None)] == ["/dc1", "/dc2"]
    assert pruned_tree(tree, "/", set()) == []


# --- hosts ----------------------------------------------------------------------------


def test_a_host_that_cannot_be_reached_or_trusted_is_not_added(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    host = lab("esx1", fingerprint=FINGERPRINT)

    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        body = {"parent": dc, "provider": "fake", "address": host.address}
        body |= {"username": "admin", "password": "secret"}

        async def refused(**change: Any) -> str:
            answer = await c.call("POST", "/hosts", json=body | change, status=400)
            assert answer["error"] == "invalid_argument"
            message: str = answer["message"]
            return message

        unpinned = await refused()
        assert unpinned.startswith("fingerprint: ") and FINGERPRINT in unpinned
        wrong = await refused(fingerprint=":".join(["CD"] * 32))
        assert wrong.startswith("fingerprint: ") and f"pinned {'CD:' * 31}CD" in wrong
        wrong_password = await refused(fingerprint=FINGERPRINT, password="nope")
        assert wrong_password == f"password: {host.address}: user 'admin' refused"
        unreachable = await refused(address="fake://nowhere", fingerprint=FINGERPRINT)
        assert unreachable == (
            "address: cannot connect: fake://nowhere: no answer (no fake host answers there)"
        )
        assert (await refused(provider="hyperv")).startswith("provider: unknown kind 'hyperv'")
        assert await c.call("GET", "/hosts", status=200) == []
        assert (await c.call("GET", "/inventory", status=200))[0]["children"] == []
        added = await c.add_host(dc, host, fingerprint=FINGERPRINT)
        assert (added["name"], added["path"], added["state"]) == ("esx1", "/dc1/esx1", "connected")
        twice = body | {"fingerprint": FINGERPRINT, "name": "other"}
        again = await c.call("POST", "/hosts", json=twice, status=409)
        assert (
            again["message"] == f"a fake host at {host.address} is already registered as /dc1/esx1"
        )

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("kind", "spellings", "canonical"),
    [
        (
            "thinvisor",
            ["https://127.0.0.1:58037/", " https://127.0.0.1:58037"],
            "https://127.0.0.1:58037",
        ),
        (
            "thinvisor",
            ["ESX1.example", "https://esx1.example:8443/api/v1/"],
            "https://esx1.example:8443",
        ),
        ("thinvisor", ["https://esx1"], "https://esx1:443"),
        ("thinvisor", ["http://[::1]:8080/"], "http://[::1]:8080"),
        ("vsphere", ["127.0.0.1:44485", "https://127.0.0.1:44485/sdk/"], "https://127.0.0.1:44485"),
        ("vsphere", ["VC1", "https://vc1/"], "https://vc1:443"),
        ("libvirt", [" qemu:///system\n"], "qemu:///system"),
        # libvirt reads the rest itself: a trailing slash may name another path.
        ("libvirt", ["qemu+tcp://kvm1/system/"], "qemu+tcp://kvm1/system/"),
        ("fake", ["fake://A/ "], "fake://A/ "),
    ],
)
def test_addresses_have_one_spelling_per_provider(
    kind: str, spellings: list[str], canonical: str
) -> None:
    assert {canonical_address(kind, spelling) for spelling in spellings} == {canonical}


@pytest.mark.parametrize(
    ("kind", "address", "reason"),
    [
        ("thinvisor", "ftp://h", "'ftp://h' is not https://HOST[:PORT]"),
        ("thinvisor", "https://h/ui", "'https://h/ui': give the host's address without a path"),
        ("thinvisor", "https://h:99999", "'https://h:99999' has no valid port"),
        ("vsphere", "http://vc", "'http://vc' is not https://HOST[:PORT]"),
        ("vsphere", "https://root@vc", "'https://root@vc': give the user with --user, not here"),
        ("libvirt", "  ", "must not be empty"),
    ],
)
def test_bad_addresses_name_the_address(kind: str, address: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        canonical_address(kind, address)
    assert (caught.value.field, caught.value.reason) == ("address", reason)


def test_a_host_is_refused_in_another_spelling_of_its_address(tmp_path: Path) -> None:
    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        # Registered as the center stores addresses; nothing answers there: a second
        # registration is refused before anything is tried.
        c.agent.inventory.add_host(dc, "esx1", "thinvisor", "https://127.0.0.1:58037")
        c.agent.inventory.add_host(dc, "vc1", "vsphere", "https://127.0.0.1:44485")
        for provider, address, existing in (
            ("thinvisor", "https://127.0.0.1:58037/", "/dc1/esx1"),
            ("thinvisor", "127.0.0.1:58037", "/dc1/esx1"),
            ("vsphere", "127.0.0.1:44485", "/dc1/vc1"),
            ("vsphere", "https://127.0.0.1:44485/sdk", "/dc1/vc1"),
        ):
            body = {"parent": dc, "provider": provider, "address": address, "name": "again"}
            again = await c.call("POST", "/hosts", json=body, status=409)
            assert again["message"].endswith(f"is already registered as {existing}")
        body = {"parent": dc, "provider": "vsphere", "address": "http://127.0.0.1:44485"}
        bad = await c.call("POST", "/hosts", json=body, status=400)
        assert bad["message"] == "address: 'http://127.0.0.1:44485' is not https://HOST[:PORT]"
        assert [h["name"] for h in await c.call("GET", "/hosts", status=200)] == ["esx1", "vc1"]

    run(tmp_path, scenario)


def test_a_connection_error_says_each_thing_once(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there

    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        address = f"qemu+tcp://127.0.0.1:{port}/system"
        body = {"parent": dc, "provider": "libvirt", "address": address}
        refused = await c.call("POST", "/hosts", json=body, status=400)
        assert refused["message"] == (
            f"address: {address}: cannot connect: unable to connect to server at "
            f"'127.0.0.1:{port}': Connection refused"
        )

    run(tmp_path, scenario)


class PauselessProvider(FakeProvider):
    """A fake host's provider that cannot pause, suspend or resume (as vSphere's)."""

    kind = "pauseless"
    capabilities = FakeProvider.capabilities - {Capability.SUSPEND}


#: This module is the provider module of the kind ``pauseless``.
PROVIDER = PauselessProvider


def test_an_action_a_provider_cannot_do_is_named(
    tmp_path: Path, lab: Callable[..., FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(KINDS, "pauseless", __name__)
    host = lab("vc1", vms=["web"])

    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        await c.add_host(dc, host, provider="pauseless")
        web = await c.vm_id("web")
        await c.finished(await c.call("POST", f"/vms/{web}/power/start", status=202))
        refused = await c.call("POST", f"/vms/{web}/power/pause", status=409)
        assert refused["message"] == (
            f"{host.address} (pauseless): cannot pause VMs "
            "(the pauseless provider has no suspend capability)"
        )
        assert host.vm_named("web").power_state is PowerState.RUNNING

    run(tmp_path, scenario)


def test_operations_through_the_center_reach_the_host(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    host = lab("kvm1", vms=["web"], templates=["debian"])

    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        await c.add_host(dc, host)
        vms = await c.call("GET", "/vms", params={"template": False}, status=200)
        assert [(v["path"], v["power_state"]) for v in vms] == [("/dc1/kvm1/web", "stopped")]
        web = vms[0]["id"]
        task = await c.call("POST", f"/vms/{web}/power/start", status=202)
        assert task["kind"] == "vm.start" and task["object"] == "/dc1/kvm1/web"
        done = await c.finished(task)
        assert done["state"] == "success" and done["result"]["power_state"] == "running"
        assert host.vm_named("web").power_state is PowerState.RUNNING
        vm = await c.call("GET", f"/vms/{web}", status=200)
        assert vm["power_state"] == "running"
        refused = await c.finished(await c.call("POST", f"/vms/{web}/power/start", status=202))
        assert refused["error"] == {
            "error": "invalid_state",
            "message": "vm 'web': cannot start while running",
        }
        bad = await c.call("POST", f"/vms/{web}/power/explode", status=400)
        assert bad["message"].startswith("action: Input should be 'start'")
        template = await c.vm_id("debian")
        body = {"host": "/dc1/kvm1", "name": "db", "template": template, "memory_mib": 512}
        created = await c.finished(await c.call("POST", "/vms", json=body, status=202))
        assert created["state"] == "success", created
        assert host.vm_named("db").memory_mib == 512
        db = await c.vm_id("db")
        snap = await c.finished(
            await c.call("POST", f"/vms/{db}/snapshots", json={"name": "s1"}, status=202)
        )
        assert snap["result"]["name"] == "s1"
        snaps = await c.call("GET", f"/vms/{db}/snapshots", status=200)
        assert [(s["name"], s["current"]) for s in snaps] == [("s1", True)]
        gone = await c.finished(await c.call("DELETE", f"/vms/{db}", status=202))
        assert gone["state"] == "success" and "db" not in [v.name for v in host.vms.values()]
        await c.call("GET", f"/vms/{db}", status=404)

    run(tmp_path, scenario)


def test_an_operation_on_a_disconnected_host_is_refused(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    host = lab("kvm2", vms=["app"])

    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        added = await c.add_host(dc, host)
        app = await c.vm_id("app")
        host.set_reachable(False)
        for _ in range(100):
            state = (await c.call("GET", f"/hosts/{added['id']}", status=200))["state"]
            if state == "disconnected":
                break
            await asyncio.sleep(0.05)
        refused = await c.call("POST", f"/vms/{app}/power/start", status=409)
        assert refused["error"] == "disconnected"
        assert refused["message"].startswith("host 'kvm2' is disconnected: ")
        vm = await c.call("GET", f"/vms/{app}", status=200)
        assert (vm["power_state"], vm["last_power_state"]) == ("unknown", "stopped")
        assert host.vm_named("app").power_state is PowerState.STOPPED
        host.set_reachable(True)
        back = await c.call("POST", f"/hosts/{added['id']}/reconnect", status=200)
        assert back["state"] == "connected"
        vms = await c.call("GET", "/vms", status=200)
        assert [(v["id"], v["power_state"]) for v in vms] == [(app, "stopped")]

    run(tmp_path, scenario)


# --- permissions ----------------------------------------------------------------------


def test_an_operator_of_one_folder_powers_vms_there_only(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    prod_host, dev_host = lab("prod1", vms=["shop"]), lab("dev1", vms=["test"])

    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        prod = await c.node("folder", dc, "prod")
        dev = await c.node("folder", dc, "dev")
        await c.add_host(prod, prod_host)
        await c.add_host(dev, dev_host)
        shop, test = await c.vm_id("shop"), await c.vm_id("test")
        denied = await c.call("POST", f"/vms/{shop}/power/start", auth=ALICE, status=403)
        assert denied == {
            "error": "forbidden",
            "message": "user 'alice' may not power /dc1/prod/prod1/shop (role there: read-only)",
        }
        grant = {"role": "operator"}
        await c.call("PUT", f"/nodes/{prod}/permissions/alice", json=grant, auth=ALICE, status=403)
        granted = await c.call("PUT", f"/nodes/{prod}/permissions/alice", json=grant, status=200)
        assert granted == {
            "node_id": prod,
            "path": "/dc1/prod",
            "user": "alice",
            "role": "operator",
        }
        task = await c.call("POST", f"/vms/{shop}/power/start", auth=ALICE, status=202)
        assert (await c.finished(task, ALICE))["state"] == "success"
        assert prod_host.vm_named("shop").power_state is PowerState.RUNNING
        denied = await c.call("POST", f"/vms/{test}/power/start", auth=ALICE, status=403)
        assert denied["message"].startswith("user 'alice' may not power /dc1/dev/dev1/test")
        assert dev_host.vm_named("test").power_state is PowerState.STOPPED
        # Operators power VMs; they do not change them, not even in their folder.
        await c.call("DELETE", f"/vms/{shop}", auth=ALICE, status=403)
        await c.call("POST", "/folders", json={"parent": prod, "name": "x"}, auth=ALICE, status=403)
        grants = await c.call("GET", "/permissions", params={"user": "alice"}, status=200)
        assert [(g["path"], g["role"]) for g in grants] == [("/dc1/prod", "operator")]
        await c.call("DELETE", f"/nodes/{prod}/permissions/alice", status=204)
        await c.call("POST", f"/vms/{shop}/power/stop", auth=ALICE, status=403)
        nobody = await c.call("PUT", f"/nodes/{dev}/permissions/bob", json=grant, status=400)
        assert nobody["message"] == "user: no user 'bob' in this center"

    run(tmp_path, scenario)


def test_a_grant_can_lower_a_role_on_part_of_the_tree(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    host = lab("lab1", vms=["vm1"])

    async def scenario(c: Center) -> None:
        c.agent.users.add_user("root2", PASSWORD, Role.ADMIN)
        dc = await c.node("datacenter", None, "dc1")
        await c.add_host(dc, host)
        vm1 = await c.vm_id("vm1")
        await c.call(
            "PUT", f"/nodes/{dc}/permissions/root2", json={"role": "read-only"}, status=200
        )
        root2 = ("root2", PASSWORD)
        denied = await c.call("POST", f"/vms/{vm1}/power/start", auth=root2, status=403)
        assert denied["message"].endswith("(role there: read-only)")
        # Still an admin at the root, where datacenters are made.
        await c.call("POST", "/datacenters", json={"name": "dc2"}, auth=root2, status=201)

    run(tmp_path, scenario)


BOB = ("bob", PASSWORD)  # no-access: a tenant's user, granted a role on one folder only


def flatten(tree: list[dict[str, Any]]) -> list[str]:
    """The paths of an ``/inventory`` answer, depth first."""
    return [path for n in tree for path in (n["path"], *flatten(n["children"]))]


async def tenant_site(c: Center, web_host: FakeHost, dev_host: FakeHost) -> dict[str, int]:
    """/dc1/prod/web/<web_host>, /dc1/prod/db, /dc1/dev/<dev_host> and /dc2; bob, whose
    own role is no-access, is operator on /dc1/prod/web. The ids, by name."""
    c.agent.users.add_user("bob", PASSWORD, Role.NO_ACCESS)
    ids = {
        "dc1": await c.node("datacenter", None, "dc1"),
        "dc2": await c.node("datacenter", None, "dc2"),
    }
    ids["prod"] = await c.node("folder", ids["dc1"], "prod")
    ids["dev"] = await c.node("folder", ids["dc1"], "dev")
    ids["web"] = await c.node("folder", ids["prod"], "web")
    ids["db"] = await c.node("folder", ids["prod"], "db")
    ids[web_host.name] = (await c.add_host(ids["web"], web_host))["id"]
    ids[dev_host.name] = (await c.add_host(ids["dev"], dev_host))["id"]
    for vm in (*web_host.vms.values(), *dev_host.vms.values()):
        ids[vm.name] = await c.vm_id(vm.name)
    await c.call(
        "PUT", f"/nodes/{ids['web']}/permissions/bob", json={"role": "operator"}, status=200
    )
    return ids


def test_a_no_access_user_sees_only_their_folder_and_the_way_to_it(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    web_host, dev_host = lab("web1", vms=["shop", "cart"]), lab("dev1", vms=["test"])

    async def scenario(c: Center) -> None:
        ids = await tenant_site(c, web_host, dev_host)
        tree = await c.call("GET", "/inventory", auth=BOB, status=200)
        # The folders above web (not what else is in them: db, dev, dc2), web, and below.
        assert [n["path"] for n in tree] == ["/dc1"]
        assert [n["path"] for n in tree[0]["children"]] == ["/dc1/prod"]
        assert [n["path"] for n in tree[0]["children"][0]["children"]] == ["/dc1/prod/web"]
        paths = flatten(tree)
        assert {"/dc1/prod/web/web1/shop", "/dc1/prod/web/web1/cart"} <= set(paths)
        assert not [p for p in paths if p.startswith(("/dc1/dev", "/dc1/prod/db", "/dc2"))]
        vms = await c.call("GET", "/vms", auth=BOB, status=200)
        assert sorted(v["path"] for v in vms) == [
            "/dc1/prod/web/web1/cart",
            "/dc1/prod/web/web1/shop",
        ]
        assert tree[0]["children"][0]["children"][0]["children"][0]["state"] == "connected"
        hosts = await c.call("GET", "/hosts", auth=BOB, status=200)
        assert [h["path"] for h in hosts] == ["/dc1/prod/web/web1"]
        children = await c.call("GET", f"/nodes/{ids['prod']}/children", auth=BOB, status=200)
        assert [n["path"] for n in children] == ["/dc1/prod/web"]
        # The admin still sees everything.
        assert "/dc1/dev/dev1/test" in flatten(await c.call("GET", "/inventory", status=200))

    run(tmp_path, scenario)


def test_a_no_access_user_powers_their_vms_and_finds_nothing_elsewhere(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    web_host, dev_host = lab("web2", vms=["shop"]), lab("dev2", vms=["test"])

    async def scenario(c: Center) -> None:
        ids = await tenant_site(c, web_host, dev_host)
        shop, test = ids["shop"], ids["test"]
        task = await c.call("POST", f"/vms/{shop}/power/start", auth=BOB, status=202)
        assert (await c.finished(task, BOB))["state"] == "success"
        assert web_host.vm_named("shop").power_state is PowerState.RUNNING

        async def absent(method: str, path: str, message: str, **kwargs: Any) -> None:
            answer = await c.call(method, path, auth=BOB, status=404, **kwargs)
            assert answer == {"error": "not_found", "message": message}

        # What bob does not see answers as if it were not there, word for word.
        await absent("POST", f"/vms/{test}/power/start", f"no vm with id {test}")
        await absent("POST", "/vms/999999/power/start", "no vm with id 999999")
        await absent("GET", f"/vms/{test}", f"no vm with id {test}")
        await absent("GET", f"/nodes/{ids['dev']}", f"no inventory object with id {ids['dev']}")
        await absent(
            "GET", f"/nodes/{ids['dc2']}/children", f"no inventory object with id {ids['dc2']}"
        )
        await absent(
            "GET", "/nodes", "no inventory object at /dc1/dev", params={"path": "/dc1/dev"}
        )
        await absent("GET", f"/hosts/{ids['dev2']}", f"no inventory object with id {ids['dev2']}")
        await absent("POST", f"/hosts/{ids['dev2']}/reconnect", f"no host with id {ids['dev2']}")
        assert dev_host.vm_named("test").power_state is PowerState.STOPPED
        # ... and named in a request, as a bad value of that field.
        body = {"parent": "/dc1/dev", "name": "x"}
        hidden = await c.call("POST", "/folders", json=body, auth=BOB, status=400)
        assert hidden["message"] == "parent: no inventory object at /dc1/dev"
        hidden = await c.call("GET", "/vms", params={"host": ids["dev2"]}, auth=BOB, status=400)
        assert hidden["message"] == f"host: no inventory object with id {ids['dev2']}"
        # What bob sees (on the way to web, or in it) but may not do answers 403.
        denied = await c.call("GET", f"/nodes/{ids['dc1']}", auth=BOB, status=403)
        assert denied["message"] == "user 'bob' may not read /dc1 (role there: no-access)"
        denied = await c.call("DELETE", f"/vms/{shop}", auth=BOB, status=403)
        assert denied["message"].endswith("(role there: operator)")
        denied = await c.call("POST", "/datacenters", json={"name": "x"}, auth=BOB, status=403)
        assert denied["message"] == (
            "user 'bob' may not configure the inventory root (role there: no-access)"
        )
        await c.call("GET", "/center", auth=BOB, status=403)

    run(tmp_path, scenario)


def test_a_no_access_user_is_shown_only_their_tasks_and_events(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    web_host, dev_host = lab("web3", vms=["shop"]), lab("dev3", vms=["test"])

    async def scenario(c: Center) -> None:
        ids = await tenant_site(c, web_host, dev_host)
        mine = await c.finished(
            await c.call("POST", f"/vms/{ids['shop']}/power/start", auth=BOB, status=202), BOB
        )
        theirs = await c.finished(
            await c.call("POST", f"/vms/{ids['test']}/power/start", status=202)
        )
        tasks = await c.call("GET", "/tasks", auth=BOB, status=200)
        assert [t["id"] for t in tasks] == [mine["id"]]
        assert len(await c.call("GET", "/tasks", status=200)) == 2
        hidden = await c.call("GET", f"/tasks/{theirs['id']}", auth=BOB, status=404)
        assert hidden["message"] == f"task {theirs['id']!r} does not exist"
        for _ in range(100):
            events = await c.call("GET", "/events", params={"kind": "vm."}, status=200)
            if len(events) >= 2:
                break
            await asyncio.sleep(0.02)
        shown = await c.call("GET", "/events", auth=BOB, status=200)
        objects = {e["object"] for e in shown}
        assert {"host/web3", "host/web3/vm/shop", f"task/{mine['id']}", "user/bob"} <= objects
        assert not [o for o in objects if "dev" in str(o) or o == f"task/{theirs['id']}"]
        assert "center.started" not in {e["kind"] for e in shown}
        assert len(await c.call("GET", "/events", params={"limit": 2}, auth=BOB, status=200)) == 2

    run(tmp_path, scenario)


async def logged(c: Center, kind: str, obj: str) -> int:
    """The id of the event ``kind`` on ``obj``, once in the center's log."""
    for _ in range(200):
        found = await c.call("GET", "/events", params={"kind": kind, "object": obj}, status=200)
        if found:
            event_id: int = found[-1]["id"]
            return event_id
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {kind} event on {obj}")


def test_the_event_stream_shows_a_no_access_user_only_their_objects(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    web_host, dev_host = lab("web4", vms=["shop"]), lab("dev4", vms=["test"])

    async def scenario(c: Center) -> None:
        await tenant_site(c, web_host, dev_host)
        last = (await c.call("GET", "/events", params={"limit": 1}, status=200))[-1]["id"]
        async with served(c) as base:
            url = f"{base}/events/stream?since={last}"
            async with connect(url, additional_headers=basic(*BOB)) as ws:
                # dev's event comes first, in the replay or live: bob must not get it.
                dev_host.set_power(dev_host.vm_named("test").id, PowerState.RUNNING)
                await logged(c, "vm.running", "host/dev4/vm/test")
                web_host.set_power(web_host.vm_named("shop").id, PowerState.RUNNING)
                async with asyncio.timeout(5):
                    event = json.loads(await ws.recv())
            assert (event["kind"], event["object"]) == ("vm.running", "host/web4/vm/shop")

    run(tmp_path, scenario)


def test_roles_are_checked_by_name(tmp_path: Path) -> None:
    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        refused = await c.call(
            "PUT", f"/nodes/{dc}/permissions/alice", json={"role": "superuser"}, status=400
        )
        message = refused["message"]
        assert message.startswith("role: ") and "\n" not in message
        assert "'no-access'" in message
        granted = await c.call(
            "PUT", f"/nodes/{dc}/permissions/alice", json={"role": "no-access"}, status=200
        )
        assert granted["role"] == "no-access"
        assert await c.call("GET", "/inventory", auth=ALICE, status=200) == []

    run(tmp_path, scenario)


# --- events, tasks, tags, the API itself ------------------------------------------------


def test_the_hosts_events_are_merged_into_the_centers(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    one, two = lab("h1", vms=["a"]), lab("h2", vms=["b"])

    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        await c.add_host(dc, one)
        await c.add_host(dc, two)
        two.set_power(two.vm_named("b").id, PowerState.RUNNING)  # behind the center's back
        a = await c.vm_id("a")
        await c.finished(await c.call("POST", f"/vms/{a}/power/start", status=202))
        for _ in range(100):
            events = await c.call("GET", "/events", params={"kind": "vm."}, status=200)
            if len(events) >= 2:
                break
            await asyncio.sleep(0.02)
        assert sorted((e["object"], e["kind"]) for e in events) == [
            ("host/h1/vm/a", "vm.start"),
            ("host/h2/vm/b", "vm.running"),
        ]
        b = await c.call("GET", "/vms", params={"name": "b"}, status=200)
        assert b[0]["power_state"] == "running"
        connected = await c.call("GET", "/events", params={"kind": "host.connected"}, status=200)
        assert {e["object"] for e in connected} == {"host/h1", "host/h2"}
        tasks = await c.call("GET", "/tasks", status=200)
        assert [(t["kind"], t["object"], t["user"]) for t in tasks] == [
            ("vm.start", "/dc1/h1/a", "admin")
        ]
        # A peer's kind that is not a VM's or a host's becomes the change's; it stays
        # in the event's data.
        snap = {"name": "s1"}
        await c.finished(await c.call("POST", f"/vms/{a}/snapshots", json=snap, status=202))
        for _ in range(100):
            events = await c.call("GET", "/events", params={"kind": "vm.changed"}, status=200)
            if events:
                break
            await asyncio.sleep(0.02)
        assert [(e["object"], e["data"]) for e in events] == [
            ("host/h1/vm/a", {"host": "h1", "peer_kind": "snapshot.created"})
        ]

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        # vSphere's property collector says only how an object's properties changed.
        (ChangeEvent(ChangeKind.VM_CHANGED, "web: powered on", "vm-1", peer_kind="modify"),
         "vm.changed"),
        (ChangeEvent(ChangeKind.VM_REMOVED, "web: removed", "vm-1", peer_kind="leave"),
         "vm.removed"),
        # libvirt's lifecycle events, thinvisor's own kinds.
        (ChangeEvent(ChangeKind.VM_CHANGED, "started", "u", peer_kind="started.booted"),
         "vm.changed"),
        (ChangeEvent(ChangeKind.VM_CHANGED, "on", "web", peer_kind="vm.powered_on"),
         "vm.powered_on"),
        (ChangeEvent(ChangeKind.RESYNC, "a datastore", peer_kind="datastore.added"),
         "host.resync"),
        (ChangeEvent(ChangeKind.RESYNC, "events were lost"), "host.resync"),
        (ChangeEvent(ChangeKind.HOST_CHANGED, "maintenance"), "host.changed"),
    ],
)  # fmt: skip
def test_every_providers_changes_are_vm_or_host_events(change: ChangeEvent, kind: str) -> None:
    assert event_kind(change) == kind


def test_tags_on_objects(tmp_path: Path) -> None:
    async def scenario(c: Center) -> None:
        dc = await c.node("datacenter", None, "dc1")
        prod = await c.node("folder", dc, "prod")
        await c.call("POST", "/tags", json={"name": "gold", "category": "tier"}, status=201)
        await c.call("POST", "/tags", json={"name": "gold"}, status=409)
        tags = await c.call("PUT", f"/nodes/{prod}/tags/gold", status=200)
        assert [t["name"] for t in tags] == ["gold"]
        await c.call("PUT", f"/nodes/{prod}/tags/silver", status=404)
        await c.call("PUT", f"/nodes/{prod}/tags/gold", auth=ALICE, status=403)
        tagged = await c.call("GET", "/tags/gold", status=200)
        assert [n["path"] for n in tagged["nodes"]] == ["/dc1/prod"]
        assert (await c.call("GET", f"/nodes/{prod}", status=200))["tags"] == ["gold"]
        await c.call("DELETE", f"/nodes/{prod}/tags/gold", status=204)
        await c.call("DELETE", f"/nodes/{prod}/tags/gold", status=404)
        await c.call("DELETE", "/tags/gold", status=204)
        assert await c.call("GET", "/tags", status=200) == []

    run(tmp_path, scenario)


def test_health_center_info_authentication_and_the_schema(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    host = lab("h1", vms=["a", "b"], templates=["t"])

    async def scenario(c: Center) -> None:
        health = await c.client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        unauthenticated = await c.client.get("/center")
        assert unauthenticated.status_code == 401
        assert unauthenticated.json()["error"] == "unauthorized"
        await c.call("GET", "/center", auth=("alice", "wrong"), status=401)
        await c.add_host(await c.node("datacenter", None, "dc1"), host)
        info = await c.call("GET", "/center", status=200)
        dialect = _DATABASE["url"].split(":", 1)[0]
        assert info["database"] == dialect and info["hosts"] == {"connected": 1}
        assert (info["vms"], info["templates"]) == ({"stopped": 2}, 1)
        login = await c.call("POST", "/auth/login", json={"user": "alice", "password": PASSWORD},
                             auth=("", ""), status=200)  # fmt: skip
        whoami = await c.client.get(
            "/auth/whoami", headers={"Authorization": f"Bearer {login['token']}"}
        )
        assert whoami.json() == {"user": "alice", "role": "read-only"}
        schema = (await c.client.get("/openapi.json")).json()
        assert schema["info"]["title"] == "thinvisor center API"
        for path in ("/api/v1/vms/{vm_id}/power/{action}", "/api/v1/hosts", "/api/v1/inventory"):
            assert path in schema["paths"]
        assert (await c.client.get("/docs")).status_code == 200

    run(tmp_path, scenario)


# --- WebSockets through a real server ---------------------------------------------------


@contextlib.asynccontextmanager
async def served(center: Center) -> AsyncIterator[str]:
    """The center's app on a loopback port: its ``ws://`` base URL."""
    app = create_center_app(center.agent, start_agent=False)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/api/v1"
    finally:
        server.should_exit = True
        await task


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@contextlib.asynccontextmanager
async def console_host() -> AsyncIterator[tuple[str, list[str]]]:
    """A WebSocket server standing for a host's console: it says hello, echoes every
    frame as it came, and closes with 1011 on "bye". Its address and the paths asked."""
    paths: list[str] = []

    async def handler(conn: ServerConnection) -> None:
        paths.append(conn.request.path if conn.request else "")
        await conn.send("hello")
        async for message in conn:
            if message == "bye":
                await conn.close(1011, "the guest went away")
                return
            await conn.send(message)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}", paths


def test_the_center_brokers_a_hosts_console(tmp_path: Path, lab: Callable[..., FakeHost]) -> None:
    async def scenario(c: Center) -> None:
        async with console_host() as (address, paths), served(c) as base:
            host = lab("con1", address=address, vms=["vm1"])
            await c.add_host(await c.node("datacenter", None, "dc1"), host)
            vm1 = await c.vm_id("vm1")
            url = f"{base}/vms/{vm1}/console/serial?port=serial1"
            async with connect(url, additional_headers=basic(*ADMIN)) as ws:
                assert await ws.recv() == "hello"
                await ws.send(b"\x00\x01binary")
                assert await ws.recv() == b"\x00\x01binary"
                await ws.send("text")
                assert await ws.recv() == "text"
                await ws.send("bye")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1011,
                "the guest went away",
            )
            assert paths == [f"/vms/{host.vm_named('vm1').id}/console/serial?port=serial1"]
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, additional_headers=basic(*ALICE))
            assert refused.value.response.status_code == 403

    run(tmp_path, scenario)


def test_a_console_the_center_cannot_broker_closes_with_the_reason(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    host = lab("con2", vms=["vm1"])

    async def scenario(c: Center) -> None:
        await c.add_host(await c.node("datacenter", None, "dc1"), host)
        vm1 = await c.vm_id("vm1")
        async with served(c) as base:
            url = f"{base}/vms/{vm1}/console/vnc"
            async with connect(url, additional_headers=basic(*ADMIN)) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1011
            assert closed.value.rcvd.reason == "the center cannot broker fake:// consoles"
            with pytest.raises(InvalidStatus) as missing:
                await connect(f"{base}/vms/9999/console/vnc", additional_headers=basic(*ADMIN))
            assert missing.value.response.status_code == 404

    run(tmp_path, scenario)


def test_the_event_stream_carries_the_hosts_events(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    host = lab("ev1", vms=["vm1"])

    async def scenario(c: Center) -> None:
        await c.add_host(await c.node("datacenter", None, "dc1"), host)
        last = (await c.call("GET", "/events", params={"limit": 1}, status=200))[-1]["id"]
        async with served(c) as base:
            # Replaying from the last id: nothing is missed before the subscription.
            url = f"{base}/events/stream?since={last}"
            async with connect(url, additional_headers=basic(*ALICE)) as ws:
                host.set_power(host.vm_named("vm1").id, PowerState.RUNNING)
                event = json.loads(await ws.recv())
            assert (event["kind"], event["object"]) == ("vm.running", "host/ev1/vm/vm1")

    run(tmp_path, scenario)


# --- live migration -------------------------------------------------------------------


async def migration_site(c: Center, source: FakeHost, target: FakeHost) -> dict[str, int]:
    """/dc1/prod/<source> (its VMs; ``app`` running) and /dc1/<target>; the ids, by name."""
    ids = {"dc1": await c.node("datacenter", None, "dc1")}
    ids["prod"] = await c.node("folder", ids["dc1"], "prod")
    ids[source.name] = (await c.add_host(ids["prod"], source))["id"]
    ids[target.name] = (await c.add_host(ids["dc1"], target))["id"]
    for vm in source.vms.values():
        ids[vm.name] = await c.vm_id(vm.name)
    return ids


def test_a_running_vm_migrates_through_the_api(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    source, target = lab("esx1"), lab("esx2")
    source.add_vm("app", power_state=PowerState.RUNNING, memory_mib=128)

    async def scenario(c: Center) -> None:
        ids = await migration_site(c, source, target)
        await c.call("POST", "/tags", json={"name": "gold"}, status=201)
        await c.call("PUT", f"/nodes/{ids['app']}/tags/gold", status=200)
        body = {"host": "/dc1/esx2", "downtime_ms": 100, "bandwidth_mib_s": 500}
        task = await c.call("POST", f"/vms/{ids['app']}/migrate", json=body, status=202)
        assert (task["kind"], task["object"], task["cancellable"]) == (
            "vm.migrate", "/dc1/prod/esx1/app", True)  # fmt: skip
        done = await c.finished(task)
        assert done["state"] == "success", done
        result = done["result"]
        assert (result["source"], result["vm"]["path"], result["vm"]["id"]) == (
            "/dc1/prod/esx1/app", "/dc1/esx2/app", ids["app"])  # fmt: skip
        assert result["transferred_bytes"] == 128 << 20 and result["mode"] == "shared"
        vm = await c.call("GET", f"/vms/{ids['app']}", status=200)
        assert (vm["path"], vm["host_id"], vm["power_state"]) == (
            "/dc1/esx2/app", ids["esx2"], "running")  # fmt: skip
        assert (await c.call("GET", f"/nodes/{ids['app']}", status=200))["tags"] == ["gold"]
        assert [v.name for v in target.vms.values()] == ["app"] and not source.vms
        vms = await c.call("GET", "/vms", params={"name": "app"}, status=200)
        assert [v["id"] for v in vms] == [ids["app"]]
        # Back to a host named by id.
        body = {"host": ids["esx1"]}
        back = await c.finished(
            await c.call("POST", f"/vms/{ids['app']}/migrate", json=body, status=202)
        )
        assert back["result"]["vm"]["path"] == "/dc1/prod/esx1/app"

    run(tmp_path, scenario)


def test_bad_migration_requests_are_refused_and_change_nothing(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    source, target = lab("esx3"), lab("esx4")
    source.add_vm("app", power_state=PowerState.RUNNING)
    source.add_vm("idle", power_state=PowerState.SUSPENDED)

    async def scenario(c: Center) -> None:
        ids = await migration_site(c, source, target)
        before = await c.call("GET", "/inventory", status=200)
        app = ids["app"]

        async def refused(status: int, body: dict[str, Any], message: str, vm: int = app) -> None:
            answer = await c.call("POST", f"/vms/{vm}/migrate", json=body, status=status)
            assert answer["message"].startswith(message), answer

        await refused(400, {"host": "/dc1/esx4", "downtime_ms": 5}, "downtime_ms: ")
        await refused(400, {"host": "/dc1/esx4", "downtime_ms": 10_001}, "downtime_ms: ")
        await refused(400, {"host": "/dc1/esx4", "bandwidth_mib_s": 0}, "bandwidth_mib_s: ")
        await refused(400, {"host": "/dc1/esx4", "mode": "mirror"}, "mode: ")
        await refused(400, {}, "host: ")
        await refused(400, {"host": "/dc1"}, "host: datacenter /dc1 is not a host")
        await refused(400, {"host": "/dc1/nope"}, "host: no inventory object at /dc1/nope")
        await refused(400, {"host": "/dc1/prod/esx3"}, "host: /dc1/prod/esx3/app is on ")
        await refused(400, {"host": "/dc1/esx4", "datastore": "nope"},
                      "datastore: /dc1/esx4 has no datastore 'nope'")  # fmt: skip
        await refused(409, {"host": "/dc1/esx4"}, "vm 'idle': cannot migrate while suspended",
                      ids["idle"])  # fmt: skip
        await refused(404, {"host": "/dc1/esx4"}, "no vm with id 999999", 999999)
        assert await c.call("GET", "/tasks", status=200) == []
        assert await c.call("GET", "/inventory", status=200) == before
        assert {v.name for v in source.vms.values()} == {"idle", "app"} and not target.vms

    run(tmp_path, scenario)


def test_a_migration_needs_configure_on_the_vm_and_on_the_destination(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    source, target = lab("esx5"), lab("esx6")
    source.add_vm("app", power_state=PowerState.RUNNING)

    async def scenario(c: Center) -> None:
        ids = await migration_site(c, source, target)
        c.agent.users.add_user("bob", PASSWORD, Role.NO_ACCESS)
        path, body = f"/vms/{ids['app']}/migrate", {"host": "/dc1/esx6"}
        denied = await c.call("POST", path, json=body, auth=ALICE, status=403)
        assert denied["message"] == (
            "user 'alice' may not configure /dc1/prod/esx5/app (role there: read-only)"
        )
        hidden = await c.call("POST", path, json=body, auth=BOB, status=404)
        assert hidden["message"] == f"no vm with id {ids['app']}"
        await c.call("PUT", f"/nodes/{ids['prod']}/permissions/alice", json={"role": "admin"},
                     status=200)  # fmt: skip
        denied = await c.call("POST", path, json=body, auth=ALICE, status=403)
        assert (
            denied["message"] == "user 'alice' may not configure /dc1/esx6 (role there: read-only)"
        )
        await c.call("PUT", f"/nodes/{ids['esx6']}/permissions/alice", json={"role": "admin"},
                     status=200)  # fmt: skip
        task = await c.call("POST", path, json=body, auth=ALICE, status=202)
        assert (await c.finished(task, ALICE))["state"] == "success"

    run(tmp_path, scenario)


def test_a_migration_is_cancelled_through_the_api(
    tmp_path: Path, lab: Callable[..., FakeHost]
) -> None:
    source, target = lab("esx7"), lab("esx8")
    source.add_vm("app", power_state=PowerState.RUNNING)
    source.slow_migrations(30)

    async def scenario(c: Center) -> None:
        ids = await migration_site(c, source, target)
        c.agent.users.add_user("bob", PASSWORD, Role.NO_ACCESS)
        body = {"host": "/dc1/esx8"}
        task = await c.call("POST", f"/vms/{ids['app']}/migrate", json=body, status=202)
        for _ in range(200):  # until the host copies its memory
            task = await c.call("GET", f"/tasks/{task['id']}", status=200)
            if str(task["message"]).startswith("copying memory"):
                break
            await asyncio.sleep(0.01)
        cancel = f"/tasks/{task['id']}/cancel"
        hidden = await c.call("POST", cancel, auth=BOB, status=404)
        assert hidden["message"] == f"task {task['id']!r} does not exist"
        denied = await c.call("POST", cancel, auth=ALICE, status=403)
        assert denied["message"] == (
            "user 'alice' may not configure /dc1/prod/esx7/app (role there: read-only)"
        )
        await c.call("POST", cancel, status=202)
        done = await c.finished(task)
        assert done["error"] == {"error": "cancelled", "message": "task cancelled"}
        again = await c.call("POST", cancel, status=409)
        assert again["error"] == "busy"
        vm = await c.call("GET", f"/vms/{ids['app']}", status=200)
        assert (vm["path"], vm["power_state"]) == ("/dc1/prod/esx7/app", "running")
        assert [v.name for v in source.vms.values()] == ["app"] and not target.vms
        power = await c.call("POST", f"/vms/{ids['app']}/power/reset", status=202)
        refused = await c.call("POST", f"/tasks/{power['id']}/cancel", status=409)
        assert refused["error"] == "unsupported"
        await c.call("POST", "/tasks/no-such-task/cancel", status=404)

    run(tmp_path, scenario)
