"""The center's SQL inventory, on SQLite and on a real PostgreSQL server alike."""

from __future__ import annotations

import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text

from thinvisor.center.db import Database, alembic_config, open_database
from thinvisor.center.inventory import Inventory, Node
from thinvisor.center.models import (
    Base,
    DatastoreModel,
    HostModel,
    HostState,
    NetworkModel,
    NodeModel,
    NodeTagModel,
    PermissionModel,
    VmModel,
)
from thinvisor.center.permissions import Permissions
from thinvisor.center.secrets import SecretBox
from thinvisor.errors import AlreadyExists, Busy, InvalidArgument, InvalidConfig, NotFound
from thinvisor.providers.base import (
    DatastoreRecord,
    HostRecord,
    InventorySnapshot,
    NetworkRecord,
    PowerState,
    VmRecord,
)

HOST = HostRecord("node1", "fake", "1.0", cpus=8, memory_mib=16384)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = open_database(database_url)
    yield database
    database.close()


@pytest.fixture
def inv(db: Database, tmp_path: Path) -> Inventory:
    return Inventory(db, SecretBox(tmp_path / "state" / "secret.key"))


@contextmanager
def unchanged(inv: Inventory) -> Iterator[None]:
    """Asserts that the block changed nothing in the inventory."""
    before = (inv.tree(), inv.hosts(), inv.vms(), inv.tags())
    yield
    assert (inv.tree(), inv.hosts(), inv.vms(), inv.tags()) == before


def vm(ext_id: str, name: str | None = None, **kw: Any) -> VmRecord:
    values: dict[str, Any] = {"power_state": PowerState.RUNNING, "cpus": 1, "memory_mib": 256}
    values.update(kw)
    return VmRecord(ext_id, name or ext_id, **values)


def snapshot(*vms: VmRecord, host: HostRecord = HOST) -> InventorySnapshot:
    return InventorySnapshot(
        host=host,
        vms=vms,
        datastores=(DatastoreRecord("ds-1", "local", 100 << 30, 40 << 30),),
        networks=(NetworkRecord("net-1", "lan"),),
    )


def count(db: Database, model: type[Base]) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


# --- the database ---------------------------------------------------------------------


def test_migrations_build_exactly_the_models_schema(db: Database) -> None:
    head = ScriptDirectory.from_config(alembic_config(db.engine.url)).get_current_head()
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == head
        assert compare_metadata(context, Base.metadata) == []
        indexes = {ix["name"] for ix in inspect(connection).get_indexes("nodes")}
    assert {"uq_nodes_container_name", "uq_nodes_root_name"} <= indexes


def test_opening_again_keeps_the_data(database_url: str, tmp_path: Path) -> None:
    box = SecretBox(tmp_path / "secret.key")
    first = open_database(database_url)
    Inventory(first, box).create_datacenter("dc1")
    first.close()
    second = open_database(database_url)
    try:
        assert [n.path for n in Inventory(second, box).children()] == ["/dc1"]
    finally:
        second.close()


def test_sqlite_file_directory_is_made_with_foreign_keys_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "inventory.db"
    database = open_database(f"sqlite:///{path}")
    try:
        with database.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        database.close()
    assert path.exists()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    # They hold the hosts' sealed passwords and the whole inventory.
    path = tmp_path / "new" / "inventory.db"
    database = open_database(f"sqlite:///{path}")
    try:
        Inventory(database, SecretBox(tmp_path / "key")).create_datacenter("dc1")
        side = [path.with_name(path.name + end) for end in ("-wal", "-shm")]
        assert all(each.exists() for each in side)  # open in WAL mode: both are there
        assert [mode(each) for each in (path, *side)] == [0o600] * 3
        assert mode(path.parent) == 0o700
    finally:
        database.close()
    # Made readable by others (an old center, a copy): made private again when opened.
    path.chmod(0o644)
    open_database(f"sqlite:///{path}").close()
    assert mode(path) == 0o600


def test_unreachable_postgresql_is_one_line_without_the_password() -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as caught:
        open_database(f"postgresql://center:s3cret@127.0.0.1:{port}/inventory")
    assert time.monotonic() - started < 5
    error = caught.value
    assert error.field == "database.url"
    assert "s3cret" not in str(error)
    assert "\n" not in str(error)
    assert str(error).startswith(
        f"database.url: cannot connect to postgresql+psycopg://center:***@127.0.0.1:{port}/"
    )
    assert "refused" in str(error).lower()


def test_refused_credentials_are_one_line_without_the_password(postgres_url: str) -> None:
    scheme, rest = postgres_url.split("://", 1)
    host_part = rest.split("@", 1)[1]
    with pytest.raises(InvalidArgument) as caught:
        open_database(f"{scheme}://postgres:wrong-one@{host_part}")
    assert "wrong-one" not in str(caught.value) and "\n" not in str(caught.value)
    assert "password authentication failed" in str(caught.value)


def test_in_memory_sqlite_is_shared_by_threads(tmp_path: Path) -> None:
    database = open_database("sqlite://")
    try:
        inv = Inventory(database, SecretBox(tmp_path / "secret.key"))
        dc = inv.create_datacenter("dc1")
        threads = [
            threading.Thread(target=inv.create_folder, args=(dc.id, f"f{n}")) for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(inv.children(dc.id)) == 8
    finally:
        database.close()


@pytest.mark.parametrize("url", ["mysql://u:p@db/x", "not a url", "oracle://x"])
def test_other_databases_are_refused(url: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        open_database(url)
    assert caught.value.field == "database.url"
    assert "p@" not in str(caught.value)


# --- the tree -------------------------------------------------------------------------


def test_tree_is_built_with_paths(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    prod = inv.create_folder(dc.id, "prod")
    web = inv.create_folder(prod.id, "web")
    cluster = inv.create_cluster(prod.id, "c1")
    host = inv.add_host(cluster.id, "host1", "fake", "fake://h1")
    assert (dc.path, prod.path, web.path, cluster.path) == (
        "/dc1",
        "/dc1/prod",
        "/dc1/prod/web",
        "/dc1/prod/c1",
    )
    assert host.path == "/dc1/prod/c1/host1"
    assert inv.get(web.id) == web
    assert inv.resolve("/dc1/prod/c1/host1") == Node(
        host.id, host.kind, "host1", cluster.id, host.path
    )
    assert inv.resolve("/dc1/prod/") == prod
    assert [n.name for n in inv.children(prod.id)] == ["web", "c1"]  # folders first
    assert [n.path for n in inv.ancestors(host.id)] == [
        "/dc1",
        "/dc1/prod",
        "/dc1/prod/c1",
        "/dc1/prod/c1/host1",
    ]
    assert inv.children() == [dc]


def test_tree_nests_everything_with_states(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    inv.apply_snapshot(host.id, snapshot(vm("a", power_state=PowerState.STOPPED, template=True)))
    [root] = inv.tree()
    assert (root["name"], root["kind"]) == ("dc1", "datacenter")
    [host_entry] = root["children"]
    assert host_entry["state"] == "connected"
    kinds = [(c["kind"], c["name"]) for c in host_entry["children"]]
    assert kinds == [("vm", "a"), ("datastore", "local"), ("network", "lan")]
    assert host_entry["children"][0]["power_state"] == "stopped"
    assert host_entry["children"][0]["template"] is True


def test_rename_and_move_carry_the_subtree(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    a = inv.create_folder(dc.id, "a")
    b = inv.create_folder(dc.id, "b")
    host = inv.add_host(a.id, "h", "fake", "fake://h")
    inv.apply_snapshot(host.id, snapshot(vm("1", "vm1")))
    moved = inv.move(a.id, b.id)
    assert moved.path == "/dc1/b/a"
    renamed = inv.rename(b.id, "bee")
    assert renamed.path == "/dc1/bee"
    assert inv.host(host.id).path == "/dc1/bee/a/h"
    assert inv.vms()[0].path == "/dc1/bee/a/h/vm1"
    assert inv.move(host.id, dc.id).path == "/dc1/h"
    assert inv.rename(host.id, "h").path == "/dc1/h"  # the same name: nothing to do


def test_delete_only_empty_containers(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    folder = inv.create_folder(dc.id, "f")
    inv.create_cluster(folder.id, "c")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    inv.apply_snapshot(host.id, snapshot(vm("1")))
    with unchanged(inv), pytest.raises(InvalidArgument, match="not empty") as caught:
        inv.delete(folder.id)
    assert str(caught.value) == "node: folder /dc1/f is not empty (1 object in it)"
    inv.create_folder(folder.id, "g")
    with unchanged(inv), pytest.raises(InvalidArgument, match=r"\(2 objects in it\)"):
        inv.delete(folder.id)
    inv.delete(inv.resolve("/dc1/f/g").id)
    with unchanged(inv), pytest.raises(InvalidArgument, match="is a host"):
        inv.delete(host.id)
    with unchanged(inv), pytest.raises(InvalidArgument, match="belongs to its host"):
        inv.delete(inv.vms()[0].id)
    inv.delete(inv.children(folder.id)[0].id)
    inv.delete(folder.id)
    with pytest.raises(NotFound):
        inv.get(folder.id)
    assert [n.name for n in inv.children(dc.id)] == ["h"]


def test_duplicate_names_in_one_parent_are_refused(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    folder = inv.create_folder(dc.id, "x")
    other = inv.create_folder(dc.id, "y")
    inv.create_folder(folder.id, "x")  # the same name elsewhere is fine
    with unchanged(inv), pytest.raises(AlreadyExists) as caught:
        inv.create_folder(dc.id, "x")
    assert str(caught.value) == "folder 'x' already exists in /dc1"
    with unchanged(inv), pytest.raises(AlreadyExists, match="folder 'x' already exists in /dc1"):
        inv.create_cluster(dc.id, "x")  # one name, one object: paths stay unambiguous
    with unchanged(inv), pytest.raises(AlreadyExists, match="datacenter 'dc1' already exists"):
        inv.create_datacenter("dc1")
    with unchanged(inv), pytest.raises(AlreadyExists):
        inv.rename(other.id, "x")
    with unchanged(inv), pytest.raises(AlreadyExists):
        inv.add_host(dc.id, "y", "fake", "fake://y")
    inv.create_folder(other.id, "x")
    with unchanged(inv), pytest.raises(AlreadyExists, match="in /dc1/y"):
        inv.move(inv.children(folder.id)[0].id, other.id)


def test_moves_into_itself_or_below_are_refused(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    a = inv.create_folder(dc.id, "a")
    b = inv.create_folder(a.id, "b")
    c = inv.create_folder(b.id, "c")
    for target in (a, b, c):
        with unchanged(inv), pytest.raises(InvalidArgument) as caught:
            inv.move(a.id, target.id)
        assert caught.value.field == "parent"
        assert "into itself" in str(caught.value)


def test_kinds_live_only_where_they_may(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    other = inv.create_datacenter("dc2")
    cluster = inv.create_cluster(dc.id, "c")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    inv.apply_snapshot(host.id, snapshot(vm("1")))
    vm_id = inv.vms()[0].id
    refused: list[Callable[[], object]] = [
        lambda: inv.create_folder(cluster.id, "f"),
        lambda: inv.create_cluster(cluster.id, "c2"),
        lambda: inv.create_folder(host.id, "f"),
        lambda: inv.create_cluster(host.id, "c2"),
        lambda: inv.add_host(host.id, "h2", "fake", "fake://h2"),
        lambda: inv.add_host(vm_id, "h2", "fake", "fake://h2"),
        lambda: inv.move(cluster.id, host.id),
    ]
    for attempt in refused:
        with unchanged(inv), pytest.raises(InvalidArgument) as caught:
            attempt()
        assert caught.value.field == "parent", caught.value
    # Under its own VM: what is wrong is the kind of parent, not a loop.
    with unchanged(inv), pytest.raises(InvalidArgument) as caught:
        inv.move(host.id, vm_id)
    assert str(caught.value) == (
        "parent: a host cannot be in vm /dc1/h/1 (only in a cluster, datacenter or folder)"
    )
    not_movable: list[Callable[[], object]] = [
        lambda: inv.move(dc.id, other.id),
        lambda: inv.move(vm_id, other.id),
    ]
    for attempt in not_movable:
        with unchanged(inv), pytest.raises(InvalidArgument) as caught:
            attempt()
        assert caught.value.field == "node"
    with unchanged(inv), pytest.raises(InvalidArgument, match="belongs to its host"):
        inv.rename(vm_id, "new")
    with unchanged(inv), pytest.raises(NotFound, match="id 999999"):
        inv.create_folder(999999, "f")


@pytest.mark.parametrize(
    "name", ["", "   ", "a/b", "x" * 256, " lead", "trail ", "tab\there", "nul\x00"]
)
def test_bad_names_are_refused(inv: Inventory, name: str) -> None:
    dc = inv.create_datacenter("dc1")
    folder = inv.create_folder(dc.id, "f")
    for attempt in (
        lambda: inv.create_datacenter(name),
        lambda: inv.create_folder(dc.id, name),
        lambda: inv.create_cluster(dc.id, name),
        lambda: inv.rename(folder.id, name),
        lambda: inv.add_host(dc.id, name, "fake", "fake://h"),
        lambda: inv.create_tag(name),
    ):
        with unchanged(inv), pytest.raises(InvalidArgument) as caught:
            attempt()
        assert caught.value.field == "name"
    inv.create_folder(dc.id, "x" * 255)  # the longest name there may be


def test_resolve(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    inv.apply_snapshot(host.id, snapshot(vm("1", "a/b"), vm("2", "50%")))
    assert inv.resolve("/dc1/h/a%2Fb").name == "a/b"
    assert inv.resolve("/dc1/h/50%25").name == "50%"
    assert {v.path for v in inv.vms()} == {"/dc1/h/a%2Fb", "/dc1/h/50%25"}
    assert inv.resolve("/dc1/h/lan").kind == "network"
    with pytest.raises(NotFound, match="/dc1/nope/h"):
        inv.resolve("/dc1/nope/h")
    for bad in ("dc1/h", "/", "", "/dc1//h"):
        with pytest.raises(InvalidArgument) as caught:
            inv.resolve(bad)
        assert caught.value.field == "path"


# --- hosts ----------------------------------------------------------------------------


def test_host_password_is_sealed_in_the_database(
    inv: Inventory, db: Database, tmp_path: Path
) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "vsphere", "https://vc", "root", "hunter2", "AA:BB")
    assert (host.state, host.username, host.fingerprint) == (HostState.CONNECTING, "root", "AA:BB")
    assert not hasattr(host, "password") and not hasattr(host, "secret")
    with db.read() as session:
        stored = session.scalar(select(HostModel.secret).where(HostModel.node_id == host.id))
    assert stored is not None and "hunter2" not in stored
    assert inv.host_password(host.id) == "hunter2"
    key = tmp_path / "state" / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Another center process with the same key file opens it; another key does not.
    assert Inventory(db, SecretBox(key)).host_password(host.id) == "hunter2"
    with pytest.raises(InvalidConfig, match="cannot be opened"):
        Inventory(db, SecretBox(tmp_path / "other.key")).host_password(host.id)
    none = inv.add_host(dc.id, "n", "libvirt", "qemu:///system")
    assert inv.host_password(none.id) is None
    updated = inv.update_host_credentials(none.id, "admin", "pw2", None)
    assert updated.username == "admin"
    assert inv.host_password(none.id) == "pw2"


def test_a_host_is_registered_once(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    inv.add_host(dc.id, "h", "thinvisor", "https://h:8443")
    with unchanged(inv), pytest.raises(AlreadyExists, match="already registered as /dc1/h"):
        inv.add_host(dc.id, "h2", "thinvisor", "https://h:8443")
    # Whatever spelling a host was stored in, it is the same host.
    for spelling in ("https://H:8443/", "h", "https://h:8443/api/v1"):
        with unchanged(inv), pytest.raises(AlreadyExists, match=r"as /dc1/h$"):
            inv.add_host(dc.id, "h2", "thinvisor", spelling)
    found = inv.host_at("thinvisor", "H")
    assert found is not None and found.path == "/dc1/h"
    assert inv.host_at("thinvisor", "https://h:9443") is None
    assert inv.host_at("libvirt", "https://h:8443") is None
    with unchanged(inv), pytest.raises(InvalidArgument) as caught:
        inv.add_host(dc.id, "h3", "thinvisor", "")
    assert caught.value.field == "address"
    with pytest.raises(NotFound, match="no host with id"):
        inv.host(dc.id)


def test_hosts_listed_with_what_they_said(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    b = inv.add_host(dc.id, "b", "fake", "fake://b")
    a = inv.add_host(dc.id, "a", "fake", "fake://a")
    connected = inv.set_host_connected(b.id, HOST)
    assert connected.state == HostState.CONNECTED
    assert (connected.vendor, connected.version, connected.cpus) == ("fake", "1.0", 8)
    assert connected.memory_mib == 16384 and connected.maintenance is False
    assert connected.last_seen is not None and connected.last_seen.tzinfo is not None
    assert [h.id for h in inv.hosts()] == [a.id, b.id]
    assert inv.hosts()[1] == inv.host(b.id)


# --- sync -----------------------------------------------------------------------------


def test_apply_snapshot_adds_changes_removes(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    first = snapshot(vm("1", "web", datastores=("local",), networks=("lan",)), vm("2", "db"))
    diff = inv.apply_snapshot(host.id, first)
    assert sorted(n.name for n in diff.added) == ["db", "lan", "local", "web"]
    assert not diff.changed and not diff.removed
    web = inv.vm_by_ext_id(host.id, "1")
    assert (web.path, web.host_name, web.datastores, web.networks) == (
        "/dc1/h/web",
        "h",
        ("local",),
        ("lan",),
    )
    assert inv.datastores(host.id)[0].capacity_bytes == 100 << 30
    assert inv.networks()[0].path == "/dc1/h/lan"

    second = snapshot(vm("1", "web2", power_state=PowerState.STOPPED), vm("3", "new"))
    diff = inv.apply_snapshot(host.id, second)
    assert [n.name for n in diff.added] == ["new"]
    assert [n.name for n in diff.changed] == ["web2"]
    assert [n.name for n in diff.removed] == ["db"]
    renamed = inv.vm(web.id)  # renamed on its host: the same node
    assert (renamed.name, renamed.power_state) == ("web2", PowerState.STOPPED)
    assert [v.ext_id for v in inv.vms(host.id)] == ["3", "1"]


def test_apply_snapshot_twice_changes_nothing(inv: Inventory, db: Database) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    snap = snapshot(vm("1"), vm("2", template=True), vm("1", "repeated id: the last wins"))
    assert inv.apply_snapshot(host.id, snap)
    before = inv.vms()
    assert len(before) == 2
    again = inv.apply_snapshot(host.id, snap)
    assert not again and again.added == again.changed == again.removed == ()
    assert inv.vms() == before
    assert (count(db, NodeModel), count(db, VmModel)) == (1 + 1 + 2 + 1 + 1, 2)
    assert [v.name for v in inv.vms(template=True)] == ["2"]
    assert [v.name for v in inv.vms(template=False)] == ["repeated id: the last wins"]


def test_disconnect_keeps_vms_unknown_and_reconnect_restores_them(
    inv: Inventory, db: Database
) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    snap = snapshot(vm("1", "up"), vm("2", "down", power_state=PowerState.STOPPED))
    inv.apply_snapshot(host.id, snap)
    ids = {v.ext_id: v.id for v in inv.vms()}

    away = inv.set_host_disconnected(host.id, "no answer in time")
    assert (away.state, away.error) == (HostState.DISCONNECTED, "no answer in time")
    states = {v.name: (v.power_state, v.last_power_state) for v in inv.vms()}
    assert states == {
        "up": (PowerState.UNKNOWN, PowerState.RUNNING),
        "down": (PowerState.UNKNOWN, PowerState.STOPPED),
    }
    inv.set_host_disconnected(host.id, "still away")  # twice: the last known state stays
    assert inv.vm(ids["1"]).last_power_state == PowerState.RUNNING

    diff = inv.apply_snapshot(host.id, snap)
    assert {n.id for n in diff.changed} == set(ids.values()) and not diff.added
    back = inv.host(host.id)
    assert (back.state, back.error) == (HostState.CONNECTED, None)
    assert {v.ext_id: v.id for v in inv.vms()} == ids
    assert inv.vm(ids["1"]).power_state == PowerState.RUNNING
    assert count(db, VmModel) == 2


def test_apply_vm_and_remove_vm(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    row = inv.apply_vm(host.id, vm("9", "nine", uuid="u-9"))
    assert (row.path, row.ext_id, row.uuid, row.host_id) == ("/dc1/h/nine", "9", "u-9", host.id)
    again = inv.apply_vm(host.id, vm("9", "nine", power_state=PowerState.PAUSED, cpus=2))
    assert again.id == row.id and (again.power_state, again.cpus) == (PowerState.PAUSED, 2)
    assert again.last_power_state == PowerState.PAUSED
    assert inv.apply_vm(host.id, vm("9", "nine", power_state=PowerState.UNKNOWN)).last_power_state
    assert inv.remove_vm(host.id, "9") is True
    assert inv.remove_vm(host.id, "9") is False
    with pytest.raises(NotFound):
        inv.vm(row.id)
    with pytest.raises(NotFound, match="no host"):
        inv.apply_vm(dc.id, vm("1"))


def test_remove_host_cascades_in_the_database(inv: Inventory, db: Database) -> None:
    dc = inv.create_datacenter("dc1")
    gone = inv.add_host(dc.id, "gone", "fake", "fake://gone", "u", "p")
    kept = inv.add_host(dc.id, "kept", "fake", "fake://kept")
    inv.apply_snapshot(gone.id, snapshot(vm("1"), vm("2")))
    inv.apply_snapshot(kept.id, snapshot(vm("1")))
    inv.create_tag("prod")
    inv.tag(inv.vm_by_ext_id(gone.id, "1").id, "prod")
    inv.tag(gone.id, "prod")
    inv.tag(kept.id, "prod")
    with db.write() as session:
        for node_id in (gone.id, inv.vm_by_ext_id(gone.id, "2").id, kept.id):
            session.add(PermissionModel(node_id=node_id, principal="ann", role="operator"))

    inv.remove_host(gone.id)
    assert [h.name for h in inv.hosts()] == ["kept"]
    assert (count(db, VmModel), count(db, DatastoreModel), count(db, NetworkModel)) == (1, 1, 1)
    assert (count(db, NodeTagModel), count(db, PermissionModel)) == (1, 1)
    assert count(db, NodeModel) == 1 + 1 + 3  # dc1, kept and what kept holds
    assert [n.name for n in inv.tagged("prod")] == ["kept"]
    with pytest.raises(NotFound):
        inv.remove_host(gone.id)


def test_find_vms_by_name_or_pattern(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    h1 = inv.add_host(dc.id, "h1", "fake", "fake://1")
    h2 = inv.add_host(dc.id, "h2", "fake", "fake://2")
    inv.apply_snapshot(h1.id, snapshot(vm("1", "web-1"), vm("2", "Web-2"), vm("3", "a_c")))
    inv.apply_snapshot(h2.id, snapshot(vm("1", "web-1"), vm("2", "abc"), vm("3", "50%")))

    assert [v.path for v in inv.find_vms("web-1")] == ["/dc1/h1/web-1", "/dc1/h2/web-1"]
    assert [v.name for v in inv.find_vms("web-*")] == ["web-1", "web-1"]  # case counts
    assert sorted(v.name for v in inv.find_vms("a?c")) == ["a_c", "abc"]
    assert [v.name for v in inv.find_vms("a_c")] == ["a_c"]  # '_' is no wildcard
    assert [v.name for v in inv.find_vms("5*%")] == ["50%"]
    assert inv.find_vms("5%") == []
    assert len(inv.find_vms("*")) == 6
    assert inv.find_vms("nope") == []


# --- moving VMs between hosts (live migration) ----------------------------------------


def two_hosts(inv: Inventory) -> tuple[Node, Node]:
    """/dc1/a (VMs 'app' and 'other') and /dc1/b/h2 (VM 'db'), both synced."""
    dc = inv.create_datacenter("dc1")
    folder = inv.create_folder(dc.id, "b")
    a = inv.add_host(dc.id, "a", "fake", "fake://a")
    b = inv.add_host(folder.id, "h2", "fake", "fake://b")
    inv.apply_snapshot(a.id, snapshot(vm("vm-1", "app"), vm("vm-2", "other")))
    inv.apply_snapshot(b.id, snapshot(vm("vm-3", "db")))
    return a, b


def test_a_moved_vm_keeps_its_id_tags_and_grants(inv: Inventory, db: Database) -> None:
    a, b = two_hosts(inv)
    app = inv.vm_by_ext_id(a.id, "vm-1")
    inv.create_tag("prod")
    inv.tag(app.id, "prod")
    Permissions(db).grant(app.id, "ann", "operator")
    moved = inv.move_vm(app.id, b.id)
    assert (moved.id, moved.path, moved.host_id, moved.host_name) == (
        app.id, "/dc1/b/h2/app", b.id, "h2")  # fmt: skip
    assert (moved.ext_id, moved.power_state, moved.cpus) == ("vm-1", app.power_state, app.cpus)
    assert [t.name for t in inv.tags_of(app.id)] == ["prod"]
    assert [(g.path, g.role) for g in Permissions(db).grants(principal="ann")] == [
        ("/dc1/b/h2/app", "operator")
    ]
    assert [v.name for v in inv.vms(a.id)] == ["other"]
    # Later syncs: the source no longer lists it, the destination does (same ext_id).
    inv.apply_snapshot(a.id, snapshot(vm("vm-2", "other")))
    diff = inv.apply_snapshot(b.id, snapshot(vm("vm-3", "db"), vm("vm-1", "app", cpus=2)))
    assert (diff.added, diff.removed) == ((), ())
    assert [(v.id, v.name, v.cpus) for v in inv.vms(b.id)] == [
        (app.id, "app", 2), (inv.vm_by_ext_id(b.id, "vm-3").id, "db", 1)]  # fmt: skip
    assert inv.remove_vm(a.id, "vm-1") is False and inv.vm(app.id).host_id == b.id
    assert count(db, VmModel) == 3


def test_while_a_vm_moves_the_syncs_neither_delete_nor_duplicate_it(
    inv: Inventory, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_hosts(inv)
    app = inv.vm_by_ext_id(a.id, "vm-1")
    move = inv.begin_move(app.id, b.id)
    assert (move.ext_id, move.source, move.destination) == ("vm-1", a.id, b.id)
    with pytest.raises(Busy, match="vm /dc1/a/app is already being moved"):
        inv.begin_move(app.id, b.id)
    # The hosts tell of the move before the center knows it succeeded.
    assert inv.remove_vm(a.id, "vm-1") is False
    inv.apply_snapshot(a.id, snapshot(vm("vm-2", "other")))
    assert inv.apply_vm(b.id, vm("vm-1", "app")).id == app.id
    inv.apply_snapshot(b.id, snapshot(vm("vm-3", "db"), vm("vm-1", "app")))
    assert inv.vm(app.id).host_id == a.id and count(db, VmModel) == 3
    inv.apply_vm(a.id, vm("vm-1", "app", power_state=PowerState.PAUSED))  # the source's own
    assert inv.vm(app.id).power_state == PowerState.PAUSED
    stale = inv._moving(b.id)  # what a sync of the destination read just before ...
    inv.move_vm(app.id, b.id)  # ... the move ended
    monkeypatch.setattr(inv, "_moving", lambda host_id: stale if host_id == b.id else ((), {}))
    inv.apply_snapshot(b.id, snapshot(vm("vm-3", "db"), vm("vm-1", "app")))
    assert inv.vm(app.id).host_id == b.id and count(db, VmModel) == 3
    monkeypatch.undo()
    inv.begin_move(app.id, a.id)  # it may move again (back)
    inv.end_move(app.id)
    assert inv.remove_vm(b.id, "vm-1") is True  # no longer moving: its host's sync rules


def test_snapshots_begun_before_a_move_ended_leave_the_vm_where_it_went(
    inv: Inventory, db: Database
) -> None:
    a, b = two_hosts(inv)
    app = inv.vm_by_ext_id(a.id, "vm-1")
    inv.begin_move(app.id, b.id)
    begun = time.monotonic()  # both hosts' snapshots are asked for now ...
    inv.move_vm(app.id, b.id)  # ... the move ends while they are on their way
    # The source still listed it, the destination not yet: neither counts for the VM.
    inv.apply_snapshot(a.id, snapshot(vm("vm-1", "app"), vm("vm-2", "other")), begun)
    inv.apply_snapshot(b.id, snapshot(vm("vm-3", "db")), begun)
    assert [v.id for v in inv.find_vms("app")] == [app.id] and inv.vm(app.id).host_id == b.id
    assert count(db, VmModel) == 3
    # Snapshots begun after the end rule again: the destination's lists it.
    later = time.monotonic()
    inv.apply_snapshot(b.id, snapshot(vm("vm-3", "db"), vm("vm-1", "app", cpus=2)), later)
    assert inv.vm(app.id).cpus == 2
    inv.apply_snapshot(a.id, snapshot(vm("vm-1", "app"), vm("vm-2", "other")), later)
    assert len(inv.find_vms("app")) == 2  # the source really holds one of that id again


def test_a_vm_moved_to_another_kind_keeps_its_row_under_its_new_id(
    inv: Inventory, db: Database
) -> None:
    a, b = two_hosts(inv)
    app = inv.vm_by_ext_id(a.id, "vm-1")
    inv.create_tag("prod")
    inv.tag(app.id, "prod")
    inv.begin_move(app.id, b.id)
    twin = inv.apply_vm(b.id, vm("uuid-9", "app"))  # the destination's sync saw it first
    begun = time.monotonic()
    moved = inv.move_vm(app.id, b.id, ext_id="uuid-9")
    assert (moved.id, moved.ext_id, moved.path) == (app.id, "uuid-9", "/dc1/b/h2/app")
    with pytest.raises(NotFound):
        inv.vm(twin.id)
    # A destination snapshot asked for before it arrived does not drop it.
    inv.apply_snapshot(b.id, snapshot(vm("vm-3", "db")), begun)
    assert inv.vm(app.id).ext_id == "uuid-9" and count(db, VmModel) == 3
    assert [t.name for t in inv.tags_of(app.id)] == ["prod"]


def test_a_failed_move_leaves_the_vm_to_its_hosts_syncs(inv: Inventory) -> None:
    a, b = two_hosts(inv)
    app = inv.vm_by_ext_id(a.id, "vm-1")
    inv.begin_move(app.id, b.id)
    inv.end_move(app.id)
    inv.apply_vm(b.id, vm("vm-1", "app"))  # a VM of that id there is another VM
    assert inv.vm_by_ext_id(b.id, "vm-1").id != app.id
    inv.apply_snapshot(a.id, snapshot(vm("vm-2", "other")))
    with pytest.raises(NotFound):
        inv.vm(app.id)


def test_a_row_the_destination_made_meanwhile_gives_way(inv: Inventory, db: Database) -> None:
    a, b = two_hosts(inv)
    app = inv.vm_by_ext_id(a.id, "vm-1")
    twin = inv.apply_vm(b.id, vm("vm-1", "app"))  # the destination's sync was first
    assert inv.move_vm(app.id, b.id).id == app.id
    with pytest.raises(NotFound):
        inv.vm(twin.id)
    assert [v.id for v in inv.find_vms("app")] == [app.id] and count(db, VmModel) == 3


def test_bad_moves_are_refused_and_change_nothing(inv: Inventory) -> None:
    a, b = two_hosts(inv)
    app = inv.vm_by_ext_id(a.id, "vm-1")
    dc = inv.resolve("/dc1")
    with unchanged(inv), pytest.raises(NotFound, match="no vm with id"):
        inv.move_vm(dc.id, b.id)
    with unchanged(inv), pytest.raises(NotFound, match="no host with id"):
        inv.move_vm(app.id, dc.id)
    with pytest.raises(NotFound, match="no host with id"):
        inv.begin_move(app.id, dc.id)
    with pytest.raises(NotFound, match="no vm with id"):
        inv.begin_move(b.id, a.id)
    assert inv.remove_vm(a.id, "vm-1") is True  # nothing was left moving


# --- tags -----------------------------------------------------------------------------


def test_tags(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    folder = inv.create_folder(dc.id, "f")
    prod = inv.create_tag("prod", "env")
    inv.create_tag("gold")
    assert (prod.name, prod.category) == ("prod", "env")
    with unchanged(inv), pytest.raises(AlreadyExists, match="tag 'prod' already exists"):
        inv.create_tag("prod")
    inv.tag(folder.id, "prod")
    inv.tag(folder.id, "prod")  # again: no change
    inv.tag(folder.id, "gold")
    inv.tag(dc.id, "prod")
    assert [t.name for t in inv.tags_of(folder.id)] == ["gold", "prod"]
    assert [n.path for n in inv.tagged("prod")] == ["/dc1", "/dc1/f"]
    assert inv.untag(folder.id, "prod") is True
    assert inv.untag(folder.id, "prod") is False
    with unchanged(inv), pytest.raises(NotFound, match="no tag 'silver'"):
        inv.tag(folder.id, "silver")
    with unchanged(inv), pytest.raises(NotFound):
        inv.tag(123456, "gold")
    inv.delete_tag("gold")
    assert inv.tags_of(folder.id) == []
    assert [t.name for t in inv.tags()] == ["prod"]


# --- concurrency ----------------------------------------------------------------------


def test_writers_in_many_threads_neither_fail_nor_duplicate(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(15):
                record = vm(str(i % 5), power_state=PowerState.STOPPED, cpus=1 + n)
                if i % 4 == 0:
                    inv.apply_snapshot(host.id, snapshot(record))
                else:
                    inv.apply_vm(host.id, record)
                inv.vms()
            inv.create_folder(dc.id, f"f{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({v.ext_id for v in inv.vms()}) == len(inv.vms())
    assert len(inv.children(dc.id)) == 5


def test_a_large_host_syncs_quickly(inv: Inventory, db: Database) -> None:
    dc = inv.create_datacenter("dc1")
    host = inv.add_host(dc.id, "h", "fake", "fake://h")
    snap = snapshot(*(vm(str(i), f"vm{i:05}") for i in range(3000)))
    started = time.monotonic()
    assert len(inv.apply_snapshot(host.id, snap).added) == 3002
    assert not inv.apply_snapshot(host.id, snap)
    inv.set_host_disconnected(host.id, "gone")
    assert len(inv.vms()) == 3000
    inv.remove_host(host.id)
    assert time.monotonic() - started < 20
    assert count(db, NodeModel) == 1
    with db.read() as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
