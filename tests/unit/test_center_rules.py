"""The center's store of placement rules, on SQLite and on a real PostgreSQL server alike."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select

from thinvisor.center.db import Database, alembic_config, open_database
from thinvisor.center.inventory import Inventory, Node
from thinvisor.center.models import Base, RuleMemberModel, RuleModel
from thinvisor.center.placement import Rule, RuleKind
from thinvisor.center.rules import Rules
from thinvisor.center.secrets import SecretBox
from thinvisor.errors import AlreadyExists, InvalidArgument, NotFound
from thinvisor.providers.base import (
    HostRecord,
    InventorySnapshot,
    PowerState,
    VmRecord,
)

ANTI = RuleKind.ANTI_AFFINITY


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = open_database(database_url)
    yield database
    database.close()


@pytest.fixture
def inv(db: Database, tmp_path: Path) -> Inventory:
    return Inventory(db, SecretBox(tmp_path / "state" / "secret.key"))


@pytest.fixture
def rules(db: Database) -> Rules:
    return Rules(db)


@dataclass(frozen=True)
class Site:
    """/dc1/c1 with hosts h1 (web1, web2, tpl) and h2 (db1); /dc1/c2 with h3 (other);
    /dc1/h4 (loose) in no cluster."""

    dc: Node
    c1: Node
    c2: Node
    vms: dict[str, int]
    hosts: dict[str, int]


def _vm(ext_id: str, template: bool = False) -> VmRecord:
    return VmRecord(ext_id, ext_id, PowerState.RUNNING, 1, 256, template=template)


def _host(inv: Inventory, parent: Node, name: str, *vms: VmRecord) -> int:
    host = inv.add_host(parent.id, name, "fake", f"fake://{name}")
    record = HostRecord(name, "fake", "1.0", cpus=8, memory_mib=16384)
    inv.apply_snapshot(host.id, InventorySnapshot(host=record, vms=vms))
    return host.id


@pytest.fixture
def site(inv: Inventory) -> Site:
    dc = inv.create_datacenter("dc1")
    c1 = inv.create_cluster(dc.id, "c1")
    c2 = inv.create_cluster(dc.id, "c2")
    hosts = {
        "h1": _host(inv, c1, "h1", _vm("web1"), _vm("web2"), _vm("tpl", template=True)),
        "h2": _host(inv, c1, "h2", _vm("db1")),
        "h3": _host(inv, c2, "h3", _vm("other")),
        "h4": _host(inv, dc, "h4", _vm("loose")),
    }
    vms = {row.name: row.id for row in inv.vms()}
    return Site(dc, c1, c2, vms, hosts)


def count(db: Database, model: type[Base]) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


# --- the schema -----------------------------------------------------------------------


def test_migrations_build_exactly_the_models_schema(db: Database) -> None:
    head = ScriptDirectory.from_config(alembic_config(db.engine.url)).get_current_head()
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == head
        assert compare_metadata(context, Base.metadata) == []
        tables = set(inspect(connection).get_table_names())
    assert {"rules", "rule_members"} <= tables


def test_migration_0002_goes_down_and_up_again(db: Database, database_url: str) -> None:
    config = alembic_config(db.engine.url)
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
        assert not {"rules", "rule_members"} & set(inspect(connection).get_table_names())
        command.upgrade(config, "head")
        assert {"rules", "rule_members"} <= set(inspect(connection).get_table_names())


# --- creating -------------------------------------------------------------------------


def test_create_and_list(rules: Rules, site: Site) -> None:
    web = rules.create(site.c1.id, "web", "anti-affinity", [site.vms["web2"], site.vms["web1"]])
    assert web.cluster_id == site.c1.id
    assert web.cluster_path == "/dc1/c1"
    assert web.kind is ANTI
    assert web.vm_paths == ("/dc1/c1/h1/web1", "/dc1/c1/h1/web2")
    assert web.vm_ids == (site.vms["web1"], site.vms["web2"])
    pair = rules.create(site.c1.id, "app", "affinity", [site.vms["web1"], site.vms["db1"]])
    assert pair.kind is RuleKind.AFFINITY
    assert pair.vm_paths == ("/dc1/c1/h1/web1", "/dc1/c1/h2/db1")
    assert pair.id != web.id


def test_rules_are_listed_by_cluster_and_name(rules: Rules, site: Site) -> None:
    vms = site.vms
    web = rules.create(site.c1.id, "web", ANTI, [vms["web1"], vms["web2"]])
    app = rules.create(site.c1.id, "app", RuleKind.AFFINITY, [vms["web1"], vms["db1"]])
    assert [r.name for r in rules.list()] == ["app", "web"]
    assert rules.list(site.c1.id) == [app, web]
    assert rules.list(site.c2.id) == []
    assert rules.get(web.id) == web


def test_a_rule_needs_two_vms(rules: Rules, site: Site) -> None:
    one = site.vms["web1"]
    for given in ([], [one], [one, one]):
        with pytest.raises(InvalidArgument) as caught:
            rules.create(site.c1.id, "web", ANTI, given)
        assert caught.value.field == "vms"
        assert "two different VMs" in str(caught.value)
    assert rules.list() == []


def test_the_kind_must_be_known(rules: Rules, site: Site) -> None:
    with pytest.raises(InvalidArgument) as caught:
        rules.create(site.c1.id, "web", "apart", [site.vms["web1"], site.vms["web2"]])
    assert str(caught.value) == ("kind: 'apart' is not a kind of rule (affinity, anti-affinity)")


@pytest.mark.parametrize("name", ["", " web", "a/b", "x" * 256])
def test_the_name_must_be_a_name(rules: Rules, site: Site, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        rules.create(site.c1.id, name, ANTI, [site.vms["web1"], site.vms["web2"]])
    assert caught.value.field == "name"


def test_the_vms_must_exist_and_be_vms_of_the_cluster(rules: Rules, site: Site) -> None:
    vms, c1 = site.vms, site.c1.id
    cases = [
        ([vms["web1"], 999_999], "vms: no VM with id 999999"),
        ([vms["web1"], site.hosts["h2"]], "vms: host /dc1/c1/h2 is not a VM"),
        ([vms["web1"], vms["other"]], "vms: vm /dc1/c2/h3/other is not in cluster /dc1/c1"),
        ([vms["loose"], vms["web1"]], "vms: vm /dc1/h4/loose is not in cluster /dc1/c1"),
        ([vms["web1"], vms["tpl"]], "vms: /dc1/c1/h1/tpl is a template, not a VM"),
    ]
    for given, message in cases:
        with pytest.raises(InvalidArgument) as caught:
            rules.create(c1, "web", ANTI, given)
        assert str(caught.value) == message
    assert rules.list() == []


def test_the_cluster_must_be_a_cluster(rules: Rules, site: Site) -> None:
    pair = [site.vms["web1"], site.vms["web2"]]
    with pytest.raises(InvalidArgument, match="cluster: no cluster with id 999999"):
        rules.create(999_999, "web", ANTI, pair)
    with pytest.raises(InvalidArgument, match="cluster: datacenter /dc1 is not a cluster"):
        rules.create(site.dc.id, "web", ANTI, pair)


def test_names_are_unique_in_a_cluster(rules: Rules, site: Site) -> None:
    vms = site.vms
    rules.create(site.c1.id, "web", ANTI, [vms["web1"], vms["web2"]])
    with pytest.raises(AlreadyExists, match="cluster /dc1/c1 already has a rule named 'web'"):
        rules.create(site.c1.id, "web", RuleKind.AFFINITY, [vms["web1"], vms["db1"]])
    assert len(rules.list()) == 1


def test_names_may_repeat_across_clusters(rules: Rules, site: Site, inv: Inventory) -> None:
    h3 = site.hosts["h3"]
    record = HostRecord("h3", "fake", "1.0", cpus=8, memory_mib=16384)
    inv.apply_snapshot(h3, InventorySnapshot(host=record, vms=(_vm("other"), _vm("more"))))
    more = inv.vm_by_ext_id(h3, "more").id
    rules.create(site.c1.id, "web", ANTI, [site.vms["web1"], site.vms["web2"]])
    rules.create(site.c2.id, "web", ANTI, [site.vms["other"], more])
    assert [r.cluster_path for r in rules.list()] == ["/dc1/c1", "/dc1/c2"]


def test_concurrent_creates_of_one_name_make_one_rule(rules: Rules, site: Site) -> None:
    pair = [site.vms["web1"], site.vms["web2"]]
    outcomes: list[str] = []

    def create() -> None:
        try:
            rules.create(site.c1.id, "web", ANTI, pair)
            outcomes.append("created")
        except AlreadyExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created", "exists", "exists", "exists"]
    assert len(rules.list()) == 1


# --- deleting, and what the inventory deletes -----------------------------------------


def test_delete(rules: Rules, site: Site, db: Database) -> None:
    web = rules.create(site.c1.id, "web", ANTI, [site.vms["web1"], site.vms["web2"]])
    assert rules.delete(web.id) == web
    assert rules.list() == []
    assert count(db, RuleMemberModel) == 0
    with pytest.raises(NotFound, match=f"no rule with id {web.id}"):
        rules.delete(web.id)
    with pytest.raises(NotFound):
        rules.get(web.id)


def test_a_gone_vm_leaves_its_rules(rules: Rules, site: Site, inv: Inventory) -> None:
    vms = site.vms
    web = rules.create(site.c1.id, "web", ANTI, [vms["web1"], vms["web2"], vms["db1"]])
    assert inv.remove_vm(site.hosts["h2"], "db1")
    assert rules.get(web.id).vm_paths == ("/dc1/c1/h1/web1", "/dc1/c1/h1/web2")
    inv.remove_host(site.hosts["h1"])
    left = rules.get(web.id)
    assert left.vm_ids == ()  # still listed, for an operator to delete
    assert rules.rules_for([vms["web1"]]) == []


def test_a_rule_goes_with_its_cluster(
    rules: Rules, site: Site, inv: Inventory, db: Database
) -> None:
    rules.create(site.c1.id, "web", ANTI, [site.vms["web1"], site.vms["web2"]])
    inv.remove_host(site.hosts["h1"])
    inv.remove_host(site.hosts["h2"])
    inv.delete(site.c1.id)
    assert rules.list() == []
    assert count(db, RuleModel) == 0


# --- what placement reads -------------------------------------------------------------


def test_rules_for_gives_the_rules_binding_any_of_the_vms(rules: Rules, site: Site) -> None:
    vms = site.vms
    rules.create(site.c1.id, "web", ANTI, [vms["web1"], vms["web2"]])
    rules.create(site.c1.id, "app", RuleKind.AFFINITY, [vms["web2"], vms["db1"]])
    assert rules.rules_for([vms["db1"]]) == [
        Rule("app", RuleKind.AFFINITY, frozenset({vms["web2"], vms["db1"]}))
    ]
    assert rules.rules_for([vms["web2"]]) == [
        Rule("app", RuleKind.AFFINITY, frozenset({vms["web2"], vms["db1"]})),
        Rule("web", ANTI, frozenset({vms["web1"], vms["web2"]})),
    ]
    assert rules.rules_for([vms["other"]]) == []
    assert rules.rules_for([]) == []


def test_a_rule_left_with_one_vm_binds_nothing(rules: Rules, site: Site, inv: Inventory) -> None:
    vms = site.vms
    rules.create(site.c1.id, "app", RuleKind.AFFINITY, [vms["web1"], vms["db1"]])
    inv.remove_vm(site.hosts["h2"], "db1")
    assert rules.rules_for([vms["web1"]]) == []
    assert [r.vm_paths for r in rules.list()] == [("/dc1/c1/h1/web1",)]
