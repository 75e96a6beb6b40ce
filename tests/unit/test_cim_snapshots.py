"""The Virtual System Snapshot Service over CIM, answered by the real dispatcher and the
real providers over a fake agent whose VMs and snapshot trees are plain data; its tasks
run in a real ``TaskManager``.

The compiled schema comes from the shared test cache, as in ``test_cim_schema``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from pywbem import CIMClassName, CIMError, CIMInstance, CIMInstanceName, Uint16

from thinvisor.auth import Role
from thinvisor.auth.users import User
from thinvisor.cim import schema
from thinvisor.cim.operations import Dispatcher, MethodResult
from thinvisor.cim.provider import CIMV2, INTEROP, CimContext
from thinvisor.cim.providers import default_registry, interop, snapshots
from thinvisor.cim.providers.base import host_path, vm_path
from thinvisor.cim.providers.snapshots import (
    DISK_SNAPSHOT,
    FULL_SNAPSHOT,
    parse_snapshot_iid,
    service_path,
    snapshot_path,
    snapshot_request,
    snapshot_type,
)
from thinvisor.cim.schema import ClassRepository
from thinvisor.errors import InvalidArgument, NotFound
from thinvisor.host.engine.paths import VmPaths
from thinvisor.host.service import VmInfo
from thinvisor.host.tasks import Progress, Task, TaskManager, TaskState
from thinvisor.model.vm import VmSpec
from thinvisor.storage.snapshots import Snapshot, SnapshotCreate, SnapshotTree

TEST_CACHE = Path(os.environ.get("THINVISOR_TEST_CACHE") or "/var/cache/thinvisor-test")
ADMIN = User("admin", Role.ADMIN, datetime.now(UTC))
READER = User("reader", Role.READ_ONLY, datetime.now(UTC))

WEB_UUID = "6f1c3a52-8d4e-4c1b-9a55-0b3f1d2e7a10"
DB_UUID = "0a9e5c1d-2b3f-4e6a-8c7d-1e2f3a4b5c6d"
GOLD_UUID = "7b2d4f6e-1a3c-4e5f-8a9b-0c1d2e3f4a5b"
CREATED = "2024-05-01T12:00:00.000Z"


@pytest.fixture(scope="module")
def repository() -> ClassRepository:
    return schema.load_repository(TEST_CACHE)


# A fake agent: the calls the providers make, answered from data


class FakeNetwork:
    async def list_switches(self) -> list[dict[str, Any]]:
        return []


class FakeService:
    """VMs and their snapshot trees; the snapshot actions change the trees as the host
    service does, and are recorded."""

    def __init__(self, vms: list[VmInfo], trees: dict[str, SnapshotTree]) -> None:
        self.vms = vms
        self.trees = trees
        self.network = FakeNetwork()
        self.calls: list[tuple[str, str, Any]] = []

    async def list_vms(self) -> list[VmInfo]:
        return self.vms

    def resolve(self, ref: str) -> str:
        for vm in self.vms:
            if ref in (vm.name, vm.spec and vm.spec.uuid):
                return vm.name
        raise NotFound(f"vm {ref!r} does not exist")

    async def get_vm(self, name: str) -> VmInfo:
        return next(vm for vm in self.vms if vm.name == self.resolve(name))

    async def list_snapshots(self, name: str) -> SnapshotTree:
        return self.trees.setdefault(self.resolve(name), SnapshotTree())

    async def take_snapshot(
        self, name: str, req: SnapshotCreate, progress: Progress | None = None
    ) -> Snapshot:
        self.calls.append(("take", name, req))
        tree = await self.list_snapshots(name)
        tree.check_name(req.name, tree.current)
        snap = Snapshot(
            id=tree.next_id,
            name=req.name,
            description=req.description,
            created=CREATED,
            parent=tree.current,
            memory=req.memory,
        )
        tree.snapshots.append(snap)
        tree.current, tree.next_id = snap.id, snap.id + 1
        return snap

    async def revert_snapshot(
        self, name: str, ref: str, progress: Progress | None = None
    ) -> Snapshot:
        self.calls.append(("revert", name, ref))
        tree = await self.list_snapshots(name)
        snap = tree.find(name, ref)
        tree.current = snap.id
        return snap

    async def delete_snapshot(
        self, name: str, ref: str, progress: Progress | None = None
    ) -> Snapshot:
        self.calls.append(("delete", name, ref))
        tree = await self.list_snapshots(name)
        snap = tree.find(name, ref)
        tree.snapshots.remove(snap)
        for child in tree.children(snap.id):
            child.parent = snap.parent
        if tree.current == snap.id:
            tree.current = snap.parent
        return snap


class FakeAgent:
    def __init__(self, service: FakeService) -> None:
        self.service = service
        self.tasks = TaskManager()


def vm(tmp: Path, name: str, uuid: str, state: str, **fields: Any) -> VmInfo:
    spec = VmSpec(name=name, uuid=uuid, **fields)
    return VmInfo(name, "local", state, spec, VmPaths(tmp / name, tmp / "run" / name))


def snapshot(snap_id: int, name: str, parent: int | None, **fields: Any) -> Snapshot:
    return Snapshot(id=snap_id, name=name, created=CREATED, parent=parent, **fields)


@pytest.fixture
def host(tmp_path: Path) -> FakeAgent:
    """``web`` runs and has a tree: ``base`` (1, current: it was reverted to) with the
    children ``mem`` (2, with memory) and ``other`` (3); ``db`` is suspended, ``gold`` a
    template."""
    web_tree = SnapshotTree(
        snapshots=[
            snapshot(1, "base", None, description="fresh install"),
            snapshot(2, "mem", 1, memory=True, power_state="running"),
            snapshot(3, "other", 1),
        ],
        current=1,
        next_id=4,
    )
    gold_tree = SnapshotTree(snapshots=[snapshot(1, "golden", None)], current=1, next_id=2)
    vms = [
        vm(tmp_path, "web", WEB_UUID, "running", machine="pc"),
        vm(tmp_path, "db", DB_UUID, "suspended"),
        vm(tmp_path, "gold", GOLD_UUID, "stopped", template=True),
    ]
    return FakeAgent(FakeService(vms, {"web": web_tree, "gold": gold_tree}))


def call(repository: ClassRepository, agent: FakeAgent, operation: str, **params: Any) -> Any:
    namespace = params.pop("namespace", CIMV2)
    ctx = CimContext(cast(Any, agent), ADMIN, repository, namespace)
    return asyncio.run(Dispatcher(repository, default_registry()).intrinsic(ctx, operation, params))


def associators(
    repository: ClassRepository, agent: FakeAgent, path: CIMInstanceName, assoc: str, **more: Any
) -> list[CIMInstance]:
    found: list[CIMInstance] = call(
        repository, agent, "Associators", ObjectName=path, AssocClass=CIMClassName(assoc), **more
    )
    return found


Scenario = Callable[[Dispatcher, CimContext], Coroutine[Any, Any, Any]]


def run(
    repository: ClassRepository, agent: FakeAgent, scenario: Scenario, user: User = ADMIN
) -> Any:
    """``scenario`` in one event loop, so that the jobs it starts can run to their end."""
    ctx = CimContext(cast(Any, agent), user, repository, CIMV2)
    return asyncio.run(scenario(Dispatcher(repository, default_registry()), ctx))


def invoke(
    repository: ClassRepository, agent: FakeAgent, method: str, user: User = ADMIN, **params: Any
) -> tuple[int, dict[str, Any]]:
    """Invoke ``method`` of the snapshot service; wait for the job it starts, if any."""

    async def scenario(d: Dispatcher, ctx: CimContext) -> tuple[int, dict[str, Any]]:
        result: MethodResult = await d.invoke(ctx, service_path(), method, params)
        out = {p.name: p.value for p in result.out_params}
        if "Job" in out:
            await agent.tasks.wait(job_id(out["Job"]))
        return int(result.return_value), out

    found: tuple[int, dict[str, Any]] = run(repository, agent, scenario, user)
    return found


def job_id(job: CIMInstanceName) -> str:
    return str(job["InstanceID"]).removeprefix("thinvisor:task:")


def task_of(agent: FakeAgent, job: CIMInstanceName) -> Task:
    return agent.tasks.get(job_id(job))


# Snapshots as settings of their VMs


def test_each_snapshot_is_a_vssd_of_its_vm(repository: ClassRepository, host: FakeAgent) -> None:
    found = call(
        repository,
        host,
        "EnumerateInstances",
        ClassName=CIMClassName("CIM_VirtualSystemSettingData"),
    )
    ids = {str(i["InstanceID"]) for i in found}
    vms = {f"thinvisor:{u}" for u in (WEB_UUID, DB_UUID, GOLD_UUID)}
    snaps = {f"thinvisor:{WEB_UUID}:snapshot:{n}" for n in (1, 2, 3)}
    assert ids == vms | snaps | {f"thinvisor:{GOLD_UUID}:snapshot:1"}
    base = next(i for i in found if i.path == snapshot_path(WEB_UUID, 1))
    assert base.classname == "TV_VirtualSystemSettingData"
    assert base["ElementName"] == "base" and base["Description"] == "fresh install"
    assert base["VirtualSystemIdentifier"] == "web"
    assert base["VirtualSystemType"] == "DMTF:thinvisor:pc"  # the VM's
    assert base["CreationTime"].datetime == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert f"uuid:{WEB_UUID}" in base["Notes"] and "memory:false" in base["Notes"]
    mem = call(repository, host, "GetInstance", InstanceName=snapshot_path(WEB_UUID, 2))
    assert "memory:true" in mem["Notes"] and "power_state:running" in mem["Notes"]


def test_the_vm_keeps_its_own_settings(repository: ClassRepository, host: FakeAgent) -> None:
    [own] = associators(repository, host, vm_path(WEB_UUID), "CIM_SettingsDefineState")
    assert own["InstanceID"] == f"thinvisor:{WEB_UUID}"
    [same] = associators(repository, host, vm_path(WEB_UUID), "CIM_ElementSettingData")
    assert same.path == own.path


def test_the_snapshot_tree_is_seen_through_its_associations(
    repository: ClassRepository, host: FakeAgent
) -> None:
    web = vm_path(WEB_UUID)
    taken = associators(repository, host, web, "CIM_SnapshotOfVirtualSystem")
    assert sorted(s["ElementName"] for s in taken) == ["base", "mem", "other"]
    [current] = associators(repository, host, web, "TV_MostCurrentSnapshotInBranch")
    assert current["ElementName"] == "base"
    base = snapshot_path(WEB_UUID, 1)
    children = associators(repository, host, base, "TV_ParentChildSettingData", Role="Antecedent")
    assert sorted(c["ElementName"] for c in children) == ["mem", "other"]
    [parent] = associators(
        repository, host, snapshot_path(WEB_UUID, 3), "TV_ParentChildSettingData", Role="Dependent"
    )
    assert parent.path == base
    [owner] = associators(repository, host, base, "CIM_SnapshotOfVirtualSystem")
    assert owner["Name"] == WEB_UUID
    assert associators(repository, host, vm_path(DB_UUID), "CIM_SnapshotOfVirtualSystem") == []
    assert associators(repository, host, vm_path(DB_UUID), "TV_MostCurrentSnapshotInBranch") == []


def test_the_service_is_hosted_with_its_capabilities(
    repository: ClassRepository, host: FakeAgent
) -> None:
    services = associators(repository, host, host_path(), "CIM_HostedService")
    names = {s.classname: s for s in services}
    assert set(names) == {
        "TV_VirtualSystemManagementService",
        "TV_VirtualSystemSnapshotService",
        "TV_MetricService",  # the metrics module's
    }
    service = names["TV_VirtualSystemSnapshotService"]
    assert service.path == service_path() and service["Started"] is True
    [caps] = associators(repository, host, service.path, "CIM_ElementCapabilities")
    assert caps.classname == "TV_VirtualSystemSnapshotServiceCapabilities"
    assert caps["SnapshotTypesSupported"] == [FULL_SNAPSHOT, DISK_SNAPSHOT]
    assert caps["SynchronousMethodsSupported"] == []
    assert caps["AynchronousMethodsSupported"] == [2, 3, 4]


@pytest.mark.parametrize(
    ("uuid", "enabled"),
    [(WEB_UUID, [2, 3]), (DB_UUID, []), (GOLD_UUID, [])],
    ids=["running", "suspended", "template"],
)
def test_each_vm_says_which_snapshots_it_allows(
    repository: ClassRepository, host: FakeAgent, uuid: str, enabled: list[int]
) -> None:
    [caps] = associators(
        repository,
        host,
        vm_path(uuid),
        "CIM_ElementCapabilities",
        ResultClass=CIMClassName("CIM_VirtualSystemSnapshotCapabilities"),
    )
    assert caps["SnapshotTypesEnabled"] == enabled
    assert caps["GuestOSNotificationEnabled"] is False


def test_every_snapshot_instance_is_found_by_its_path(
    repository: ClassRepository, host: FakeAgent
) -> None:
    rc, _ = invoke(repository, host, "CreateSnapshot", AffectedSystem=vm_path(WEB_UUID))
    assert rc == 4096  # so that a job names a snapshot it took
    classes = [p.classname for p in [*snapshots.providers(), *snapshots.extensions()]]
    for classname in classes:
        found = call(repository, host, "EnumerateInstances", ClassName=CIMClassName(classname))
        assert found, classname
        for inst in found:
            got = call(repository, host, "GetInstance", InstanceName=inst.path)
            assert got.path == inst.path


def test_a_vm_whose_tree_cannot_be_read_has_no_snapshots_listed(
    repository: ClassRepository, host: FakeAgent
) -> None:
    async def broken(name: str) -> SnapshotTree:
        raise InvalidArgument("tree.toml", "not a snapshot tree")

    host.service.list_snapshots = broken  # type: ignore[method-assign]
    found = call(
        repository,
        host,
        "EnumerateInstances",
        ClassName=CIMClassName("TV_VirtualSystemSettingData"),
    )
    assert len(found) == 3  # the VMs' own settings still are


# Profile Registration


def test_the_profile_is_registered_with_the_service_as_central_instance(
    repository: ClassRepository, host: FakeAgent
) -> None:
    profile = snapshots.VIRTUAL_SYSTEM_SNAPSHOT_SERVICE
    [registered] = [
        p
        for p in call(
            repository,
            host,
            "EnumerateInstances",
            ClassName=CIMClassName("TV_RegisteredProfile"),
            namespace=INTEROP,
        )
        if p["RegisteredName"] == "Virtual System Snapshot Service"
    ]
    assert registered.path["InstanceID"] == profile.instance_id
    assert (registered["RegisteredOrganization"], registered["RegisteredVersion"]) == (2, "1.0.0")
    [central] = call(
        repository,
        host,
        "AssociatorNames",
        ObjectName=profile.path,
        AssocClass=CIMClassName("CIM_ElementConformsToProfile"),
        namespace=INTEROP,
    )
    assert central.classname == "TV_VirtualSystemSnapshotService"
    assert dict(central.keybindings) == dict(service_path().keybindings)
    [scoping] = call(
        repository,
        host,
        "AssociatorNames",
        ObjectName=profile.path,
        AssocClass=CIMClassName("CIM_ReferencedProfile"),
        ResultRole="Dependent",
        namespace=INTEROP,
    )
    assert scoping["InstanceID"] == interop.SYSTEM_VIRTUALIZATION.instance_id


# Parsing what clients send


def test_snapshot_type_defaults_to_full() -> None:
    assert snapshot_type(None) == FULL_SNAPSHOT
    assert snapshot_type(Uint16(3)) == DISK_SNAPSHOT


def test_a_request_takes_name_and_description_from_the_settings() -> None:
    now = datetime(2024, 5, 1, 12, 30, 5, tzinfo=UTC)
    settings = CIMInstance(
        "CIM_SettingData", {"ElementName": "before upgrade", "Description": "kernel 6.1"}
    )
    full = snapshot_request(settings, FULL_SNAPSHOT, "web", now)
    assert (full.name, full.description, full.memory) == ("before upgrade", "kernel 6.1", True)
    assert snapshot_request(settings, DISK_SNAPSHOT, "web", now).memory is False
    unnamed = snapshot_request(None, DISK_SNAPSHOT, "web", now)
    assert (unnamed.name, unnamed.description) == ("web 2024-05-01 12:30:05", "")


def test_a_bad_name_is_an_invalid_argument() -> None:
    settings = CIMInstance("CIM_SettingData", {"ElementName": "two\nlines"})
    with pytest.raises(InvalidArgument):
        snapshot_request(settings, FULL_SNAPSHOT, "web", datetime.now(UTC))


@pytest.mark.parametrize(
    ("iid", "parsed"),
    [
        (f"thinvisor:{WEB_UUID}:snapshot:12", (WEB_UUID, 12)),
        (f"thinvisor:{WEB_UUID}", None),
        (f"thinvisor:{WEB_UUID}:cpu", None),
        (f"thinvisor:{WEB_UUID}:snapshot:x", None),
        (f"other:{WEB_UUID}:snapshot:1", None),
        (None, None),
    ],
)
def test_snapshot_instance_ids(iid: str | None, parsed: tuple[str, int] | None) -> None:
    assert parse_snapshot_iid(iid) == parsed


# Methods


def test_create_snapshot_is_a_job_that_names_the_new_snapshot(
    repository: ClassRepository, host: FakeAgent
) -> None:
    settings = CIMInstance("CIM_SettingData", {"ElementName": "s4", "Description": "d"})
    rc, out = invoke(
        repository,
        host,
        "CreateSnapshot",
        AffectedSystem=vm_path(WEB_UUID),
        SnapshotSettings=settings,
        SnapshotType=Uint16(DISK_SNAPSHOT),
    )
    assert rc == 4096 and out.get("ResultingSnapshot") is None
    task = task_of(host, out["Job"])
    assert (task.kind, task.object, task.user, task.state) == (
        "vm.snapshot",
        "vm/web",
        "admin",
        TaskState.SUCCESS,
    )
    [(verb, vm_name, request)] = host.service.calls
    assert (verb, vm_name, request.name, request.description, request.memory) == (
        "take",
        "web",
        "s4",
        "d",
        False,
    )
    created = associators(
        repository,
        host,
        out["Job"],
        "CIM_AffectedJobElement",
        ResultClass=CIMClassName("CIM_VirtualSystemSettingData"),
    )
    assert [c.path for c in created] == [snapshot_path(WEB_UUID, 4)]
    [ref] = call(
        repository,
        host,
        "References",
        ObjectName=snapshot_path(WEB_UUID, 4),
        ResultClass=CIMClassName("CIM_AffectedJobElement"),
    )
    assert ref["ElementEffects"] == [5]  # Create
    [current] = associators(repository, host, vm_path(WEB_UUID), "TV_MostCurrentSnapshotInBranch")
    assert current["ElementName"] == "s4"


def test_create_snapshot_without_settings_is_full(
    repository: ClassRepository, host: FakeAgent
) -> None:
    rc, _ = invoke(repository, host, "CreateSnapshot", AffectedSystem=vm_path(WEB_UUID))
    assert rc == 4096
    [(_, _, request)] = host.service.calls
    assert request.memory is True and request.name.startswith("web ")


def test_apply_and_destroy_snapshot_are_jobs(repository: ClassRepository, host: FakeAgent) -> None:
    rc, out = invoke(repository, host, "ApplySnapshot", Snapshot=snapshot_path(WEB_UUID, 3))
    assert rc == 4096 and task_of(host, out["Job"]).kind == "vm.revert_snapshot"
    rc, out = invoke(
        repository, host, "DestroySnapshot", AffectedSnapshot=snapshot_path(WEB_UUID, 1)
    )
    assert rc == 4096 and task_of(host, out["Job"]).state is TaskState.SUCCESS
    assert host.service.calls == [("revert", "web", "3"), ("delete", "web", "1")]
    [current] = associators(repository, host, vm_path(WEB_UUID), "TV_MostCurrentSnapshotInBranch")
    assert current["ElementName"] == "other"


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("DestroySnapshot", {"AffectedSnapshot": snapshot_path(WEB_UUID, 9)}),
        ("ApplySnapshot", {"Snapshot": snapshot_path(WEB_UUID, 9)}),
        ("ApplySnapshot", {"Snapshot": snapshot_path(DB_UUID, 1)}),
        ("ApplySnapshot", {"Snapshot": snapshot_path("1b2c3d4e-0000-4000-8000-000000000000", 1)}),
        (
            "ApplySnapshot",
            {
                "Snapshot": CIMInstanceName(
                    "TV_VirtualSystemSettingData", {"InstanceID": f"thinvisor:{WEB_UUID}"}
                )
            },
        ),
        (
            "ApplySnapshot",
            {
                "Snapshot": CIMInstanceName(
                    "TV_ResourceAllocationSettingData",
                    {"InstanceID": f"thinvisor:{WEB_UUID}:snapshot:1"},
                )
            },
        ),
        ("DestroySnapshot", {}),
        ("CreateSnapshot", {"AffectedSystem": vm_path("1b2c3d4e-0000-4000-8000-000000000000")}),
        ("CreateSnapshot", {"AffectedSystem": host_path()}),
        (
            "CreateSnapshot",
            {
                "AffectedSystem": vm_path(WEB_UUID),
                "SnapshotSettings": CIMInstance("CIM_SettingData", {"ElementName": "mem"}),
            },
        ),
        ("CreateSnapshot", {"AffectedSystem": vm_path(WEB_UUID), "SnapshotSettings": "<nonsense"}),
    ],
    ids=[
        "destroy-unknown-id",
        "apply-unknown-id",
        "apply-vm-without-snapshots",
        "apply-unknown-vm",
        "apply-the-vm-own-vssd",
        "apply-a-rasd",
        "destroy-nothing",
        "create-unknown-vm",
        "create-of-the-host",
        "create-sibling-name-taken",
        "create-bad-settings",
    ],
)
def test_bad_input_is_an_invalid_parameter_and_changes_nothing(
    repository: ClassRepository, host: FakeAgent, method: str, params: dict[str, Any]
) -> None:
    rc, out = invoke(repository, host, method, **params)
    assert (rc, out) == (4, {})
    assert host.service.calls == [] and host.tasks.list() == []


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("CreateSnapshot", {"AffectedSystem": vm_path(GOLD_UUID)}),
        ("ApplySnapshot", {"Snapshot": snapshot_path(GOLD_UUID, 1)}),
        ("DestroySnapshot", {"AffectedSnapshot": snapshot_path(GOLD_UUID, 1)}),
        ("CreateSnapshot", {"AffectedSystem": vm_path(DB_UUID)}),
    ],
    ids=["create-template", "apply-template", "destroy-template", "create-suspended"],
)
def test_what_the_vm_refuses_is_an_invalid_state(
    repository: ClassRepository, host: FakeAgent, method: str, params: dict[str, Any]
) -> None:
    rc, out = invoke(repository, host, method, **params)
    assert (rc, out) == (5, {})
    assert host.service.calls == [] and host.tasks.list() == []


def test_an_unknown_snapshot_type_is_an_invalid_type(
    repository: ClassRepository, host: FakeAgent
) -> None:
    rc, _ = invoke(
        repository, host, "CreateSnapshot", AffectedSystem=vm_path(WEB_UUID), SnapshotType=Uint16(7)
    )
    assert rc == 6
    assert host.service.calls == []


def test_other_methods_are_not_supported(repository: ClassRepository, host: FakeAgent) -> None:
    rc, _ = invoke(repository, host, "StartService")
    assert rc == 1


def test_a_reader_may_not_take_snapshots(repository: ClassRepository, host: FakeAgent) -> None:
    with pytest.raises(CIMError) as exc:
        invoke(repository, host, "CreateSnapshot", READER, AffectedSystem=vm_path(WEB_UUID))
    assert exc.value.status_code == 2  # CIM_ERR_ACCESS_DENIED
    assert host.service.calls == []


def test_a_failed_job_names_no_snapshot(repository: ClassRepository, host: FakeAgent) -> None:
    async def failing(name: str, req: SnapshotCreate, progress: Progress | None = None) -> Snapshot:
        raise InvalidArgument("disk", "the disk went away")

    host.service.take_snapshot = failing  # type: ignore[method-assign]
    rc, out = invoke(repository, host, "CreateSnapshot", AffectedSystem=vm_path(WEB_UUID))
    assert rc == 4096
    job = call(repository, host, "GetInstance", InstanceName=out["Job"])
    assert job["JobState"] == 10 and "went away" in job["ErrorDescription"]
    created = associators(
        repository,
        host,
        out["Job"],
        "CIM_AffectedJobElement",
        ResultClass=CIMClassName("CIM_VirtualSystemSettingData"),
    )
    assert created == []
