"""``/rules`` of the center's REST API, in-process: the center app with the rules router
included, its inventory built directly (no host is followed), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from argon2 import PasswordHasher

from thinvisor.auth import Role, UserStore
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api import rules as rules_api
from thinvisor.center.api.app import create_center_app
from thinvisor.center.config import CenterApiConfig, CenterConfig, DatabaseConfig
from thinvisor.providers.base import HostRecord, InventorySnapshot, PowerState, VmRecord

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "password123"
ADMIN = ("admin", PASSWORD)
ALICE = ("alice", PASSWORD)  # read-only
BOB = ("bob", PASSWORD)  # no-access, but admin on /dc1/c2


@dataclass
class Center:
    agent: CenterAgent
    client: httpx.AsyncClient
    ids: dict[str, int]

    async def call(
        self, method: str, path: str, *, status: int, auth: tuple[str, str] = ADMIN, **kw: Any
    ) -> Any:
        response = await self.client.request(method, path, auth=auth, **kw)
        assert response.status_code == status, response.text
        return response.json() if response.content else None


def _build(agent: CenterAgent) -> dict[str, int]:
    """/dc1/c1 with h1 (web1, web2) and h2 (db1); /dc1/c2 with h3 (x1, x2)."""
    inv = agent.inventory
    dc = inv.create_datacenter("dc1")
    ids = {"dc1": dc.id}
    layout = {"c1": {"h1": ("web1", "web2"), "h2": ("db1",)}, "c2": {"h3": ("x1", "x2")}}
    for cluster, hosts in layout.items():
        ids[cluster] = inv.create_cluster(dc.id, cluster).id
        for name, vms in hosts.items():
            host = inv.add_host(ids[cluster], name, "fake", f"fake://{name}")
            ids[name] = host.id
            records = tuple(VmRecord(v, v, PowerState.RUNNING, 1, 256) for v in vms)
            record = HostRecord(name, "fake", "1.0", cpus=4, memory_mib=8192)
            inv.apply_snapshot(host.id, InventorySnapshot(host=record, vms=records))
    ids |= {vm.name: vm.id for vm in inv.vms()}
    agent.permissions.grant(ids["c2"], "bob", Role.ADMIN)
    return ids


@asynccontextmanager
async def running_center(tmp_path: Path, database_url: str) -> AsyncIterator[Center]:
    config = CenterConfig(
        state_dir=tmp_path / "state",
        api=CenterApiConfig(tls=False),
        database=DatabaseConfig(url=database_url),
    )
    agent = CenterAgent(config)
    agent.users = agent.gate.users = UserStore(tmp_path / "state" / "users.json", hasher=FAST)
    agent.users.add_user("admin", PASSWORD, Role.ADMIN)
    agent.users.add_user("alice", PASSWORD, Role.READ_ONLY)
    agent.users.add_user("bob", PASSWORD, Role.NO_ACCESS)
    ids = _build(agent)
    app = create_center_app(agent, start_agent=False)
    app.include_router(rules_api.router, prefix="/api/v1")
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://center/api/v1") as c:
            yield Center(agent, c, ids)
    finally:
        agent.events.close()
        agent.database.close()


def run(tmp_path: Path, database_url: str, scenario: Callable[[Center], Awaitable[None]]) -> None:
    async def go() -> None:
        async with running_center(tmp_path, database_url) as center:
            await scenario(center)

    asyncio.run(go())


def test_create_list_get_delete(tmp_path: Path, database_url: str) -> None:
    async def scenario(center: Center) -> None:
        body = {
            "cluster": "/dc1/c1",
            "name": "web",
            "kind": "anti-affinity",
            "vms": ["/dc1/c1/h1/web1", center.ids["db1"]],
        }
        created = await center.call("POST", "/rules", json=body, status=201)
        assert created == {
            "id": created["id"],
            "cluster_id": center.ids["c1"],
            "cluster": "/dc1/c1",
            "name": "web",
            "kind": "anti-affinity",
            "vm_ids": [center.ids["web1"], center.ids["db1"]],
            "vms": ["/dc1/c1/h1/web1", "/dc1/c1/h2/db1"],
        }
        assert await center.call("GET", "/rules", status=200) == [created]
        assert await center.call("GET", f"/rules/{created['id']}", status=200) == created
        assert await center.call("GET", "/rules", params={"cluster": "/dc1/c2"}, status=200) == []
        by_id = {"cluster": str(center.ids["c1"])}
        assert await center.call("GET", "/rules", params=by_id, status=200) == [created]
        await center.call("DELETE", f"/rules/{created['id']}", status=204)
        assert await center.call("GET", "/rules", status=200) == []
        await center.call("DELETE", f"/rules/{created['id']}", status=404)
        kinds = [e["kind"] for e in await center.call("GET", "/events", status=200)]
        assert {"rule.created", "rule.deleted"} <= set(kinds)

    run(tmp_path, database_url, scenario)


def test_bad_input_names_the_field(tmp_path: Path, database_url: str) -> None:
    async def scenario(center: Center) -> None:
        good = {"cluster": "/dc1/c1", "name": "web", "kind": "affinity"}
        cases = [
            ({**good, "vms": ["/dc1/c1/h1/web1"]}, "vms: a rule needs two different VMs"),
            ({**good, "vms": ["/dc1/c1/h1/web1", "/dc1/c1/h9/none"]}, "vms: no inventory"),
            ({**good, "vms": ["/dc1/c1/h1/web1", "/dc1/c1/h1"]}, "vms: host /dc1/c1/h1 is not"),
            ({**good, "vms": ["/dc1/c1/h1/web1", "/dc1/c2/h3/x1"]}, "vms: vm /dc1/c2/h3/x1"),
            ({**good, "cluster": "/dc1", "vms": [1, 2]}, "cluster: datacenter /dc1 is not"),
            ({**good, "kind": "apart", "vms": [1, 2]}, "kind:"),
            ({**good, "extra": 1, "vms": [1, 2]}, "extra: unknown field"),
        ]
        for body, message in cases:
            answer = await center.call("POST", "/rules", json=body, status=400)
            assert answer["message"].startswith(message), answer
        assert await center.call("GET", "/rules", status=200) == []
        vms = ["/dc1/c1/h1/web1", "/dc1/c1/h1/web2"]
        await center.call("POST", "/rules", json={**good, "vms": vms}, status=201)
        taken = await center.call("POST", "/rules", json={**good, "vms": vms}, status=409)
        assert taken["error"] == "already_exists"

    run(tmp_path, database_url, scenario)


def test_permissions(tmp_path: Path, database_url: str) -> None:
    async def scenario(center: Center) -> None:
        c1: dict[str, Any] = {"cluster": "/dc1/c1", "name": "web", "kind": "anti-affinity"}
        c1["vms"] = ["/dc1/c1/h1/web1", "/dc1/c1/h1/web2"]
        c2 = {**c1, "cluster": "/dc1/c2", "vms": ["/dc1/c2/h3/x1", "/dc1/c2/h3/x2"]}
        # A read-only user sees rules but may not make them.
        denied = await center.call("POST", "/rules", json=c1, status=403, auth=ALICE)
        assert "may not configure /dc1/c1" in denied["message"]
        one = await center.call("POST", "/rules", json=c1, status=201)
        # bob, admin on c2 only, makes its rules and sees nothing of c1's.
        two = await center.call("POST", "/rules", json=c2, status=201, auth=BOB)
        assert await center.call("GET", "/rules", status=200, auth=BOB) == [two]
        assert len(await center.call("GET", "/rules", status=200, auth=ALICE)) == 2
        missing = await center.call("GET", f"/rules/{one['id']}", status=404, auth=BOB)
        assert missing["message"] == f"no rule with id {one['id']}"
        await center.call("DELETE", f"/rules/{one['id']}", status=404, auth=BOB)
        # A cluster or VM bob does not see is answered as a missing one.
        hidden = await center.call("POST", "/rules", json=c1, status=400, auth=BOB)
        assert hidden["message"] == "cluster: no inventory object at /dc1/c1"
        await center.call("DELETE", f"/rules/{two['id']}", status=403, auth=ALICE)
        await center.call("DELETE", f"/rules/{two['id']}", status=204, auth=BOB)

    run(tmp_path, database_url, scenario)
