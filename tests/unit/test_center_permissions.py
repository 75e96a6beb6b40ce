"""Roles granted on the center's inventory tree, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from thinvisor.auth.roles import Permission, Role
from thinvisor.center.db import Database, open_database
from thinvisor.center.inventory import Inventory, Node, VmRow
from thinvisor.center.permissions import Grant, Permissions
from thinvisor.center.secrets import SecretBox
from thinvisor.errors import InvalidArgument, NotFound
from thinvisor.providers.base import HostRecord, InventorySnapshot, PowerState, VmRecord


@dataclass
class Site:
    """/dc1/prod/h1 (vm a, b) and /dc1/test/h2 (vm c), with permissions over them."""

    inv: Inventory
    perms: Permissions
    dc: Node
    prod: Node
    test: Node
    h1: Node
    h2: Node
    a: VmRow
    b: VmRow
    c: VmRow


def _host(inv: Inventory, parent: Node, name: str, *vms: str) -> Node:
    host = inv.add_host(parent.id, name, "fake", f"fake://{name}")
    records = tuple(VmRecord(v, v, PowerState.STOPPED, 1, 256) for v in vms)
    inv.apply_snapshot(host.id, InventorySnapshot(HostRecord(name, "fake", "1", 1, 1024), records))
    return host


@pytest.fixture
def site(database_url: str, tmp_path: Path) -> Iterator[Site]:
    db: Database = open_database(database_url)
    inv = Inventory(db, SecretBox(tmp_path / "secret.key"))
    dc = inv.create_datacenter("dc1")
    prod = inv.create_folder(dc.id, "prod")
    test = inv.create_folder(dc.id, "test")
    h1 = _host(inv, prod, "h1", "a", "b")
    h2 = _host(inv, test, "h2", "c")
    a, b = inv.vms(h1.id)
    [c] = inv.vms(h2.id)
    yield Site(inv, Permissions(db), dc, prod, test, h1, h2, a, b, c)
    db.close()


def test_operator_on_a_folder_may_power_only_what_is_in_it(site: Site) -> None:
    perms = site.perms
    perms.grant(site.prod.id, "ann", Role.OPERATOR)
    # ann's own role is read-only: it applies wherever no grant reaches.
    for vm in (site.a, site.b):
        assert perms.allowed("ann", Role.READ_ONLY, vm.id, Permission.POWER)
        assert not perms.allowed("ann", Role.READ_ONLY, vm.id, Permission.CONFIGURE)
    assert perms.effective_role("ann", site.h1.id, Role.READ_ONLY) == Role.OPERATOR
    assert not perms.allowed("ann", Role.READ_ONLY, site.c.id, Permission.POWER)
    assert perms.allowed("ann", Role.READ_ONLY, site.c.id, Permission.READ)
    assert perms.effective_role("ann", site.c.id, Role.READ_ONLY) == Role.READ_ONLY
    # Someone else is not concerned by ann's grant.
    assert not perms.allowed("bob", Role.READ_ONLY, site.a.id, Permission.POWER)


def test_the_nearest_grant_wins(site: Site) -> None:
    perms = site.perms
    perms.grant(site.dc.id, "ann", Role.ADMIN)
    perms.grant(site.prod.id, "ann", Role.READ_ONLY)
    perms.grant(site.b.id, "ann", Role.OPERATOR)
    assert perms.effective_role("ann", site.a.id, None) == Role.READ_ONLY
    assert perms.effective_role("ann", site.b.id, None) == Role.OPERATOR
    assert perms.effective_role("ann", site.c.id, None) == Role.ADMIN
    assert perms.effective_role("ann", site.prod.id, None) == Role.READ_ONLY  # the node itself
    assert not perms.allowed("ann", None, site.a.id, Permission.CONFIGURE)
    assert perms.allowed("ann", None, site.c.id, Permission.CONFIGURE)
    # The user's own role is the root's: a grant overrides it, up or down.
    assert perms.effective_role("ann", site.a.id, Role.ADMIN) == Role.READ_ONLY
    assert perms.effective_role("ann", None, Role.ADMIN) == Role.ADMIN


def test_without_role_or_grant_nothing_is_allowed(site: Site) -> None:
    perms = site.perms
    assert perms.effective_role("ann", site.a.id, None) is None
    assert not perms.allowed("ann", None, site.a.id, Permission.READ)
    assert not perms.allowed("ann", None, None, Permission.READ)
    assert perms.visible("ann", None) == set()
    with pytest.raises(NotFound):
        perms.effective_role("ann", 999999, Role.ADMIN)


def test_visible_follows_the_tree(site: Site) -> None:
    perms = site.perms
    assert perms.visible("ann", Role.READ_ONLY) is None  # everything: no need to filter
    perms.grant(site.test.id, "ann", Role.OPERATOR)
    assert perms.visible("ann", Role.READ_ONLY) is None
    seen = perms.visible("ann", None)
    assert seen is not None
    under_test = {n.id for n in site.inv.children(site.h2.id)} | {site.test.id, site.h2.id}
    assert seen == under_test
    assert site.c.id in seen and site.a.id not in seen
    power = perms.visible("ann", Role.READ_ONLY, Permission.POWER)
    assert power == under_test
    # An admin lowered to read-only on prod may configure everything but prod's objects.
    perms.grant(site.prod.id, "root", Role.READ_ONLY)
    configurable = perms.visible("root", Role.ADMIN, Permission.CONFIGURE)
    assert configurable is not None
    assert site.c.id in configurable and site.dc.id in configurable
    assert site.a.id not in configurable and site.h1.id not in configurable


def test_no_access_hides_all_but_the_way_to_what_is_granted(site: Site) -> None:
    perms = site.perms
    assert perms.visible("ann", Role.NO_ACCESS) == set()
    assert perms.shown("ann", Role.NO_ACCESS) == set()
    perms.grant(site.c.id, "ann", Role.OPERATOR)
    assert perms.visible("ann", Role.NO_ACCESS) == {site.c.id}
    # The way down to vm c; prod, beside it, stays hidden.
    assert perms.shown("ann", Role.NO_ACCESS) == {site.dc.id, site.test.id, site.h2.id, site.c.id}
    assert perms.effective_role("ann", site.h2.id, Role.NO_ACCESS) == Role.NO_ACCESS
    assert not perms.allowed("ann", Role.NO_ACCESS, site.h2.id, Permission.READ)
    assert perms.allowed("ann", Role.NO_ACCESS, site.c.id, Permission.POWER)
    assert not perms.allowed("ann", Role.NO_ACCESS, None, Permission.READ)
    # A no-access grant hides a folder from an admin, who still sees the rest.
    perms.grant(site.prod.id, "root", Role.NO_ACCESS)
    shown = perms.shown("root", Role.ADMIN)
    assert shown is not None and site.c.id in shown and site.dc.id in shown
    assert not {site.prod.id, site.h1.id, site.a.id} & shown
    assert perms.shown("bob", Role.READ_ONLY) is None


def test_every_role_can_be_granted(site: Site) -> None:
    # The database's own check on roles knows them all, on every backend.
    for role in Role:
        site.perms.grant(site.prod.id, f"user-{role}", role)
    assert sorted(g.role for g in site.perms.grants()) == sorted(Role)


def test_grants_are_replaced_listed_and_revoked(site: Site) -> None:
    perms = site.perms
    perms.grant(site.prod.id, "ann", "read-only")
    replaced = perms.grant(site.prod.id, "ann", Role.OPERATOR)
    assert replaced == Grant(site.prod.id, "/dc1/prod", "ann", Role.OPERATOR)
    perms.grant(site.a.id, "bob", Role.ADMIN)
    assert perms.grants() == [
        replaced,
        Grant(site.a.id, "/dc1/prod/h1/a", "bob", Role.ADMIN),
    ]
    assert perms.grants(node_id=site.a.id) == [perms.grants()[1]]
    assert perms.grants(principal="ann") == [replaced]
    assert perms.revoke(site.prod.id, "ann") is True
    assert perms.revoke(site.prod.id, "ann") is False
    assert perms.effective_role("ann", site.a.id, None) is None


def test_bad_grants_are_refused(site: Site) -> None:
    perms = site.perms
    with pytest.raises(InvalidArgument) as caught:
        perms.grant(site.prod.id, "ann", "superuser")
    assert caught.value.field == "role"
    assert str(caught.value) == (
        "role: 'superuser' is not a role (one of admin, operator, read-only, no-access)"
    )
    with pytest.raises(InvalidArgument) as caught:
        perms.grant(site.prod.id, "", Role.ADMIN)
    assert caught.value.field == "principal"
    with pytest.raises(NotFound):
        perms.grant(999999, "ann", Role.ADMIN)
    assert perms.grants() == []


def test_grants_go_with_their_objects(site: Site) -> None:
    perms = site.perms
    perms.grant(site.a.id, "ann", Role.OPERATOR)
    perms.grant(site.h1.id, "bob", Role.OPERATOR)
    perms.grant(site.h2.id, "bob", Role.OPERATOR)
    site.inv.apply_snapshot(site.h1.id, InventorySnapshot(HostRecord("h1", "fake", "1", 1, 1)))
    assert [g.principal for g in perms.grants()] == ["bob", "bob"]  # vm a is gone
    site.inv.remove_host(site.h1.id)
    assert [g.path for g in perms.grants()] == ["/dc1/test/h2"]
    # A grant follows its object when it moves.
    site.inv.move(site.h2.id, site.prod.id)
    assert perms.allowed("bob", None, site.c.id, Permission.POWER)
    assert [g.path for g in perms.grants()] == ["/dc1/prod/h2"]


def test_revoke_all_takes_every_grant_of_one_user_only(site: Site) -> None:
    perms = site.perms
    perms.grant(site.prod.id, "ann", Role.OPERATOR)
    perms.grant(site.c.id, "ann", Role.ADMIN)
    perms.grant(site.prod.id, "bob", Role.READ_ONLY)
    assert perms.revoke_all("ann") == 2
    assert perms.grants(principal="ann") == []
    # A new user of the same name starts from their own role, nowhere more.
    assert perms.effective_role("ann", site.a.id, None) is None
    assert [(g.path, g.principal) for g in perms.grants()] == [("/dc1/prod", "bob")]
    assert perms.revoke_all("ann") == 0
