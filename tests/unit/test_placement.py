"""The center's placement logic: choosing a host, evacuating one, balancing a cluster."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from thinvisor.center.placement import (
    BalanceMove,
    HostLoad,
    NoPlacement,
    Rule,
    RuleKind,
    VmDemand,
    balance,
    choose_host,
    evacuation_plan,
    score,
)
from thinvisor.errors import InsufficientResources, InvalidArgument

ANTI = RuleKind.ANTI_AFFINITY
AFFINITY = RuleKind.AFFINITY


def host(host_id: int, name: str, **kw: Any) -> HostLoad:
    values: dict[str, Any] = {
        "cluster_id": 100,
        "connected": True,
        "maintenance": False,
        "cpus": 8,
        "core_mhz": 2000,
        "memory_mib": 16384,
        "used_memory_mib": 0,
        "cpu_load": 0.1,
    }
    values.update(kw)
    return HostLoad(host_id, name, **values)


def vm(vm_id: int, name: str, memory_mib: int = 1024, **kw: Any) -> VmDemand:
    values: dict[str, Any] = {"cpus": 1}
    values.update(kw)
    return VmDemand(vm_id, name, memory_mib, **values)


def rule(name: str, kind: RuleKind, *vm_ids: int) -> Rule:
    return Rule(name, kind, frozenset(vm_ids))


# --- choose_host ----------------------------------------------------------------------


def test_the_host_with_most_free_memory_wins() -> None:
    hosts = [host(1, "a", used_memory_mib=8192), host(2, "b", used_memory_mib=2048)]
    assert choose_host(vm(10, "web"), hosts, [], {}).name == "b"


def test_cpu_load_counts_when_memory_is_equal() -> None:
    hosts = [host(1, "a", cpu_load=0.9), host(2, "b", cpu_load=0.2)]
    assert choose_host(vm(10, "web"), hosts, [], {}).name == "b"


def test_score_follows_the_documented_formula() -> None:
    one = host(1, "a", memory_mib=10000, used_memory_mib=2000, reserved_memory_mib=1000)
    one = replace(one, cpu_load=0.25)
    expected = 0.7 * (10000 - 2000 - 1000 - 1000) / 10000 + 0.3 * 0.75
    assert score(vm(10, "web", 1000), one) == pytest.approx(expected)


def test_the_score_counts_the_vcpus_a_plan_placed_as_busy() -> None:
    one = host(1, "a", cpus=4, memory_mib=10000, cpu_load=0.25, planned_cpus=2)
    expected = 0.7 * (10000 - 1000) / 10000 + 0.3 * (1 - 0.25 - 2 / 4)
    assert score(vm(10, "web", 1000), one) == pytest.approx(expected)


def test_memory_outweighs_cpu() -> None:
    # a: 25% free memory, idle; b: 75% free memory, busy. 0.7*0.25+0.3 < 0.7*0.75+0.3*0.2
    hosts = [
        host(1, "a", memory_mib=4096, used_memory_mib=2048, cpu_load=0.0),
        host(2, "b", memory_mib=4096, cpu_load=0.8),
    ]
    assert choose_host(vm(10, "web"), hosts, [], {}).name == "b"


def test_ties_go_to_the_first_name() -> None:
    hosts = [host(1, "zeta"), host(2, "alpha"), host(3, "mid")]
    assert choose_host(vm(10, "web"), hosts, [], {}).name == "alpha"


def test_disconnected_and_maintenance_hosts_are_never_chosen() -> None:
    hosts = [
        host(1, "a", connected=False),
        host(2, "b", maintenance=True),
        host(3, "c", used_memory_mib=15000),
    ]
    assert choose_host(vm(10, "web", 1024), hosts, [], {}).name == "c"
    with pytest.raises(NoPlacement) as caught:
        choose_host(vm(10, "web", 2048), hosts, [], {})
    assert caught.value.refused == {
        1: "disconnected",
        2: "in maintenance mode",
        3: "1384 MiB free, the VM needs 2048 MiB",
    }


def test_no_placement_lists_every_host_and_why_in_one_line() -> None:
    hosts = [
        host(1, "a", connected=False),
        host(2, "b", maintenance=True),
        host(3, "c", memory_mib=4096, used_memory_mib=3072, reserved_memory_mib=512),
        host(4, "d", cpus=2),
        host(5, "e", core_mhz=0),
        host(6, "f", reserved_cpu_mhz=15500),
        host(7, "g"),
    ]
    big = vm(10, "db", 2048, cpus=4, reserved_cpu_mhz=1000)
    with pytest.raises(NoPlacement) as caught:
        choose_host(big, hosts, [], {}, exclude={7})
    error = caught.value
    assert isinstance(error, InsufficientResources)
    assert error.http_status == 409
    assert str(error) == (
        "no host can take vm 'db': a: disconnected; b: in maintenance mode; "
        "c: 512 MiB free, the VM needs 2048 MiB; d: has 2 CPUs, the VM 4; "
        "e: CPU clock unknown: cannot reserve 1000 MHz; "
        "f: 500 MHz of CPU unreserved, the VM reserves 1000 MHz; g: excluded"
    )
    assert "\n" not in str(error)


def test_no_hosts_at_all() -> None:
    with pytest.raises(NoPlacement, match="no hosts given"):
        choose_host(vm(10, "web"), [], [], {})


def test_free_memory_counts_the_hosts_reservation() -> None:
    hosts = [host(1, "a", memory_mib=4096, used_memory_mib=1024, reserved_memory_mib=1024)]
    assert choose_host(vm(10, "web", 2048), hosts, [], {}).name == "a"
    with pytest.raises(NoPlacement, match="2048 MiB free, the VM needs 2049 MiB"):
        choose_host(vm(10, "web", 2049), hosts, [], {})


def test_an_unknown_clock_refuses_only_cpu_reservations() -> None:
    hosts = [host(1, "a", core_mhz=0)]
    assert choose_host(vm(10, "web"), hosts, [], {}).name == "a"
    with pytest.raises(NoPlacement, match="clock unknown"):
        choose_host(vm(10, "web", reserved_cpu_mhz=1), hosts, [], {})


def test_cpu_reservation_fits_exactly() -> None:
    hosts = [host(1, "a", cpus=2, core_mhz=1000, reserved_cpu_mhz=1500)]
    assert choose_host(vm(10, "web", reserved_cpu_mhz=500), hosts, [], {}).name == "a"
    with pytest.raises(NoPlacement):
        choose_host(vm(10, "web", reserved_cpu_mhz=501), hosts, [], {})


def test_anti_affinity_never_shares_a_host() -> None:
    hosts = [host(1, "a"), host(2, "b", used_memory_mib=8192)]
    rules = [rule("web", ANTI, 10, 11)]
    # a is emptier, but holds web1.
    assert choose_host(vm(11, "web2"), hosts, rules, {10: 1}).name == "b"
    with pytest.raises(NoPlacement) as caught:
        choose_host(vm(11, "web2"), hosts, rules, {10: 1, 12: 2, 13: 2} | {}, exclude={2})
    assert caught.value.refused[1] == "holds another VM of anti-affinity rule 'web'"


def test_anti_affinity_of_other_vms_does_not_bind() -> None:
    hosts = [host(1, "a")]
    rules = [rule("web", ANTI, 10, 11)]
    assert choose_host(vm(12, "db"), hosts, rules, {10: 1, 11: 1}).name == "a"


def test_affinity_requires_the_host_of_a_placed_peer() -> None:
    hosts = [host(1, "a", used_memory_mib=8192), host(2, "b")]
    rules = [rule("pair", AFFINITY, 10, 11)]
    assert choose_host(vm(11, "app"), hosts, rules, {10: 1}).name == "a"
    full = [host(1, "a", used_memory_mib=16000), host(2, "b")]
    with pytest.raises(NoPlacement) as caught:
        choose_host(vm(11, "app"), full, rules, {10: 1})
    assert caught.value.refused == {
        1: "384 MiB free, the VM needs 1024 MiB",
        2: "the other VMs of affinity rule 'pair' run elsewhere",
    }


def test_affinity_without_a_placed_peer_allows_any_host() -> None:
    hosts = [host(1, "a", used_memory_mib=8192), host(2, "b")]
    rules = [rule("pair", AFFINITY, 10, 11)]
    assert choose_host(vm(11, "app"), hosts, rules, {}).name == "b"


def test_affinity_peer_on_a_host_that_takes_no_vms_does_not_bind() -> None:
    hosts = [host(1, "a", maintenance=True), host(2, "b"), host(3, "c", used_memory_mib=9000)]
    rules = [rule("pair", AFFINITY, 10, 11)]
    assert choose_host(vm(11, "app"), hosts, rules, {10: 1}).name == "b"
    # A peer on an excluded host does not bind either (that host is being left).
    assert choose_host(vm(11, "app"), hosts, rules, {10: 3}, exclude={3}).name == "b"
    assert choose_host(vm(11, "app"), hosts, rules, {10: 3}).name == "c"


def test_the_vm_itself_is_no_peer() -> None:
    hosts = [host(1, "a"), host(2, "b", used_memory_mib=4096)]
    rules = [rule("web", ANTI, 10, 11)]
    # Powering web1 on where the center last saw it: its own entry does not refuse a.
    assert choose_host(vm(10, "web1"), hosts, rules, {10: 1}).name == "a"


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"cpu_load": 1.5}, "cpu_load"),
        ({"cpu_load": -0.1}, "cpu_load"),
        ({"cpu_load": float("nan")}, "cpu_load"),
        ({"cpu_load": "high"}, "cpu_load"),
        ({"memory_mib": -1}, "memory_mib"),
        ({"used_memory_mib": 1.5}, "used_memory_mib"),
        ({"cpus": True}, "cpus"),
        ({"reserved_cpu_mhz": -5}, "reserved_cpu_mhz"),
    ],
)
def test_bad_host_loads_are_refused(values: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        host(1, "a", **values)
    assert caught.value.field == field
    assert "host 'a'" in str(caught.value)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"memory_mib": 0}, "memory_mib"),
        ({"cpus": 0}, "cpus"),
        ({"reserved_cpu_mhz": -1}, "reserved_cpu_mhz"),
        ({"reserved_memory_mib": 2048, "memory_mib": 1024}, "reserved_memory_mib"),
    ],
)
def test_bad_vm_demands_are_refused(values: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        vm(10, "web", **values)
    assert caught.value.field == field


def test_bad_rules_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="kind: rule 'x': 'together'"):
        Rule("x", "together", frozenset({1, 2}))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="vms: rule 'x': a rule needs two VMs"):
        rule("x", ANTI, 1)
    # A kind given as text is taken as the kind.
    assert Rule("x", "anti-affinity", frozenset({1, 2})).kind is ANTI  # type: ignore[arg-type]


def test_a_host_given_twice_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="hosts: host id 1 is given twice"):
        choose_host(vm(10, "web"), [host(1, "a"), host(1, "b")], [], {})


def test_evacuating_an_unknown_host_or_foreign_vms_is_refused() -> None:
    hosts = [host(1, "a"), host(2, "b")]
    with pytest.raises(InvalidArgument, match="host_id: host 9"):
        evacuation_plan(9, [vm(10, "web")], hosts, [], {})
    with pytest.raises(InvalidArgument, match="vms: vm 'web' runs on host 2"):
        evacuation_plan(1, [vm(10, "web", host_id=2)], hosts, [], {})
    with pytest.raises(InvalidArgument, match="vms: vm id 10 is given twice"):
        evacuation_plan(1, [vm(10, "web"), vm(10, "web")], hosts, [], {})


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"guard_s": -1}, "guard_s"),
        ({"guard_s": float("nan")}, "guard_s"),
        ({"max_moves": -1}, "max_moves"),
    ],
)
def test_bad_balance_settings_are_refused(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        balance([host(1, "a")], [], [], {}, recent={}, now=0.0, **kw)
    assert caught.value.field == field


# --- evacuation -----------------------------------------------------------------------


def test_evacuation_spreads_vms_over_equal_hosts() -> None:
    hosts = [host(1, "src"), host(2, "a"), host(3, "b")]
    vms = [vm(10 + i, f"vm{i}", 2048, host_id=1) for i in range(4)]
    plan = evacuation_plan(1, vms, hosts, [], {v.vm_id: 1 for v in vms})
    assert plan.stuck == []
    assert sorted(m.vm.name for m in plan.moves) == ["vm0", "vm1", "vm2", "vm3"]
    assert Counter(m.host.name for m in plan.moves) == {"a": 2, "b": 2}


def test_evacuation_spreads_vms_though_one_host_was_measured_idle() -> None:
    # Small VMs on big hosts: memory hardly differs; the measured load alone would send
    # every VM to the idle host. Each placed vCPU counts as busy there, so they spread,
    # the idle host still taking more.
    hosts = [host(1, "src", cpus=2), host(2, "busy", cpus=2, cpu_load=1.0),
             host(3, "idle", cpus=2, cpu_load=0.0)]  # fmt: skip
    vms = [vm(10 + i, f"vm{i}", 128, host_id=1) for i in range(4)]
    plan = evacuation_plan(1, vms, hosts, [], {v.vm_id: 1 for v in vms})
    assert Counter(m.host.name for m in plan.moves) == {"idle": 3, "busy": 1}


def test_evacuation_moves_the_largest_first() -> None:
    hosts = [host(1, "src"), host(2, "a", memory_mib=4096), host(3, "b", memory_mib=4096)]
    vms = [vm(10, "small", 1024), vm(11, "big", 3072), vm(12, "mid", 2048)]
    plan = evacuation_plan(1, vms, hosts, [], {})
    assert [m.vm.name for m in plan.moves] == ["big", "mid", "small"]
    # big fills a; mid goes to b; small fits on either: a has 1024 left, b 2048.
    assert [(m.vm.name, m.host.name) for m in plan.moves] == [
        ("big", "a"),
        ("mid", "b"),
        ("small", "b"),
    ]


def test_evacuation_lists_vms_that_fit_nowhere_with_the_reason() -> None:
    hosts = [host(1, "src"), host(2, "a", memory_mib=4096), host(3, "b", maintenance=True)]
    vms = [vm(10, "huge", 8192), vm(11, "ok", 2048), vm(12, "also", 2048), vm(13, "late", 1024)]
    plan = evacuation_plan(1, vms, hosts, [], {})
    assert [(m.vm.name, m.host.name) for m in plan.moves] == [("also", "a"), ("ok", "a")]
    assert [s.vm.name for s in plan.stuck] == ["huge", "late"]
    assert plan.stuck[0].reason == (
        "no host can take vm 'huge': a: 4096 MiB free, the VM needs 8192 MiB; "
        "b: in maintenance mode"
    )
    assert "a: 0 MiB free, the VM needs 1024 MiB" in plan.stuck[1].reason


def test_evacuation_stays_in_the_cluster() -> None:
    hosts = [host(1, "src"), host(2, "a", cluster_id=200), host(3, "b", used_memory_mib=12000)]
    plan = evacuation_plan(1, [vm(10, "web")], hosts, [], {})
    assert [m.host.name for m in plan.moves] == ["b"]
    plan = evacuation_plan(1, [vm(10, "web", 8192)], hosts, [], {})
    assert plan.moves == []
    assert "a:" not in plan.stuck[0].reason  # another cluster's host is no candidate


def test_evacuation_of_a_host_in_no_cluster_uses_every_other_host() -> None:
    hosts = [host(1, "src", cluster_id=None), host(2, "a", cluster_id=200), host(3, "b")]
    plan = evacuation_plan(1, [vm(10, "x"), vm(11, "y")], hosts, [], {})
    assert sorted(m.host.name for m in plan.moves) == ["a", "b"]


def test_evacuation_keeps_anti_affinity() -> None:
    hosts = [host(1, "src"), host(2, "a"), host(3, "b", used_memory_mib=1024)]
    rules = [rule("web", ANTI, 10, 11, 12)]
    vms = [vm(10, "web1"), vm(11, "web2"), vm(12, "web3")]
    placement = {10: 1, 11: 1, 12: 1}
    plan = evacuation_plan(1, vms, hosts, rules, placement)
    assert [(m.vm.name, m.host.name) for m in plan.moves] == [("web1", "a"), ("web2", "b")]
    assert [s.vm.name for s in plan.stuck] == ["web3"]
    assert "holds another VM of anti-affinity rule 'web'" in plan.stuck[0].reason
    assert placement == {10: 1, 11: 1, 12: 1}  # the caller's mapping is left as it was


def test_evacuation_keeps_affine_vms_together() -> None:
    hosts = [host(1, "src"), host(2, "a"), host(3, "b")]
    rules = [rule("pair", AFFINITY, 10, 11)]
    vms = [vm(10, "app", 2048), vm(11, "db", 2048), vm(12, "other", 2048)]
    plan = evacuation_plan(1, vms, hosts, rules, dict.fromkeys((10, 11, 12), 1))
    moved = {m.vm.name: m.host.name for m in plan.moves}
    assert moved["app"] == moved["db"]
    assert moved["other"] != moved["app"]  # and the rest still spread


def test_evacuation_returns_the_hosts_as_given() -> None:
    target = host(2, "a")
    plan = evacuation_plan(1, [vm(10, "x"), vm(11, "y")], [host(1, "src"), target], [], {})
    assert all(m.host is target for m in plan.moves)


# --- balance --------------------------------------------------------------------------


def test_balance_moves_from_the_busiest_to_even_out() -> None:
    hosts = [host(1, "a", used_memory_mib=12288), host(2, "b", used_memory_mib=2048)]
    vms = [vm(10, "x", 4096, host_id=1), vm(11, "y", 8192, host_id=1), vm(12, "z", 2048, host_id=2)]
    moves = balance(hosts, vms, [], {}, recent={}, now=1000.0)
    assert len(moves) == 1
    only = moves[0]
    assert isinstance(only, BalanceMove)
    # x (4096) leaves 8192 vs 6144: a spread of 0.125; y would leave 4096 vs 10240.
    assert (only.vm.name, only.source.name, only.target.name) == ("x", "a", "b")
    assert only.reason == "memory use 75% on a, 12% on b"


def test_balance_does_nothing_under_the_threshold() -> None:
    # A spread of 2048 MiB of 16384 (0.125); moving x makes it 0.0625.
    hosts = [host(1, "a", used_memory_mib=6144), host(2, "b", used_memory_mib=4096)]
    vms = [vm(10, "x", 1024, host_id=1)]
    assert balance(hosts, vms, [], {}, recent={}, now=0.0) == []
    assert len(balance(hosts, vms, [], {}, recent={}, now=0.0, threshold=0.1)) == 1


def test_balance_never_makes_the_spread_worse() -> None:
    # One VM as large as the gap: moving it would only swap the hosts' roles.
    hosts = [host(1, "a", used_memory_mib=8192), host(2, "b", used_memory_mib=0)]
    vms = [vm(10, "x", 8192, host_id=1)]
    assert balance(hosts, vms, [], {}, recent={}, now=0.0) == []


def test_balance_respects_max_moves_and_counts_each_move() -> None:
    hosts = [host(1, "a", used_memory_mib=8192), host(2, "b"), host(3, "c")]
    vms = [vm(10 + i, f"v{i}", 2048, host_id=1) for i in range(4)]
    assert len(balance(hosts, vms, [], {}, recent={}, now=0.0)) == 1
    moves = balance(hosts, vms, [], {}, recent={}, now=0.0, max_moves=5)
    # 8192 over three hosts: a keeps 4096, b and c take 2048 each; then the spread is
    # 0.125, under the threshold.
    assert sorted(m.target.name for m in moves) == ["b", "c"]
    assert balance(hosts, vms, [], {}, recent={}, now=0.0, max_moves=0) == []


def test_balance_stays_within_each_cluster() -> None:
    hosts = [
        host(1, "a", used_memory_mib=12288),
        host(2, "b", used_memory_mib=12288),
        host(3, "c", cluster_id=200),
    ]
    vms = [vm(10, "x", 4096, host_id=1)]
    assert balance(hosts, vms, [], {}, recent={}, now=0.0) == []


def test_balance_ignores_hosts_in_maintenance_or_away() -> None:
    hosts = [
        host(1, "a", used_memory_mib=8192),
        host(2, "b", used_memory_mib=8192),
        host(3, "c", maintenance=True),
        host(4, "d", connected=False),
    ]
    vms = [vm(10, "x", 4096, host_id=1)]
    assert balance(hosts, vms, [], {}, recent={}, now=0.0) == []


def test_the_guard_keeps_a_recently_moved_vm_where_it_is() -> None:
    hosts = [host(1, "a", used_memory_mib=12288), host(2, "b"), host(3, "c", used_memory_mib=6144)]
    # x is the best move (to b, it evens all out); y would leave 10240, 2048 and 6144.
    vms = [vm(10, "x", 6144, host_id=1), vm(11, "y", 2048, host_id=1)]
    moves = balance(hosts, vms, [], {}, recent={}, now=0.0)
    assert [(m.vm.name, m.target.name) for m in moves] == [("x", "b")]
    recent = {10: (3, 1, 1000.0)}
    # x came from c 599 s ago: not even b may have it; y moves instead.
    moves = balance(hosts, vms, [], {}, recent=recent, now=1599.0)
    assert [(m.vm.name, m.target.name) for m in moves] == [("y", "b")]
    # 600 s after, the guard is over: x is the better move again.
    moves = balance(hosts, vms, [], {}, recent=recent, now=1600.0)
    assert [m.vm.name for m in moves] == ["x"]
    moves = balance(hosts, vms, [], {}, recent=recent, now=1100.0, guard_s=50)
    assert [m.vm.name for m in moves] == ["x"]


def test_the_guard_never_sends_a_vm_back_where_it_came_from() -> None:
    # web1 was just moved onto a, next to web2: the repair may move web1 (web2 is on a
    # for good), but not back to b, which it left.
    hosts = [host(1, "a"), host(2, "b"), host(3, "c", used_memory_mib=8192)]
    rules = [rule("web", ANTI, 10, 11)]
    vms = [vm(10, "web1", 2048, host_id=1), vm(11, "web2", 4096, host_id=1)]
    recent = {10: (2, 1, 900.0), 11: (3, 1, 950.0)}
    moves = balance(hosts, vms, rules, {}, recent=recent, now=1000.0)
    assert [(m.vm.name, m.target.name) for m in moves] == [("web1", "c")]
    # Without the guard, b (emptier) would be chosen.
    moves = balance(hosts, vms, rules, {}, recent={}, now=1000.0)
    assert [(m.vm.name, m.target.name) for m in moves] == [("web1", "b")]


def test_balance_repairs_a_broken_anti_affinity_rule_first() -> None:
    hosts = [host(1, "a", used_memory_mib=4096), host(2, "b", used_memory_mib=4096)]
    rules = [rule("web", ANTI, 10, 11)]
    vms = [vm(10, "web1", 2048, host_id=1), vm(11, "web2", 2048, host_id=1)]
    moves = balance(hosts, vms, rules, {}, recent={}, now=0.0)
    # Memory is even: only the rule asks for a move; the smaller (or, equal, either) goes.
    assert len(moves) == 1
    assert moves[0].target.name == "b"
    assert moves[0].source.name == "a"
    assert moves[0].reason == "anti-affinity rule 'web': another of its VMs is on a"


def test_a_repair_moves_the_vm_not_recently_moved() -> None:
    hosts = [host(1, "a"), host(2, "b"), host(3, "c")]
    rules = [rule("web", ANTI, 10, 11)]
    vms = [vm(10, "web1", 1024, host_id=1), vm(11, "web2", 4096, host_id=1)]
    moves = balance(hosts, vms, rules, {}, recent={10: (3, 1, 0.0)}, now=10.0)
    assert [(m.vm.name, m.target.name) for m in moves] == [("web2", "b")]


def test_a_repair_moves_the_smaller_vm() -> None:
    hosts = [host(1, "a"), host(2, "b"), host(3, "c")]
    rules = [rule("web", ANTI, 10, 11)]
    vms = [vm(10, "web1", 4096, host_id=1), vm(11, "web2", 1024, host_id=1)]
    # One move repairs it, however many are allowed: web1 stays.
    moves = balance(hosts, vms, rules, {}, recent={}, now=0.0, max_moves=5)
    assert [m.vm.name for m in moves] == ["web2"]


def test_a_repair_leaves_alone_a_vm_held_by_affinity() -> None:
    hosts = [host(1, "a"), host(2, "b")]
    rules = [rule("web", ANTI, 10, 11), rule("pair", AFFINITY, 11, 12)]
    vms = [vm(10, "web1", 4096, host_id=1), vm(11, "web2", 1024, host_id=1)]
    moves = balance(hosts, vms, rules, {12: 1}, recent={}, now=0.0)
    assert [m.vm.name for m in moves] == ["web1"]


def test_a_repair_spreads_three_vms_of_a_rule() -> None:
    hosts = [host(1, "a"), host(2, "b"), host(3, "c")]
    rules = [rule("web", ANTI, 10, 11, 12)]
    vms = [vm(10 + i, f"web{i}", 1024, host_id=1) for i in range(3)]
    moves = balance(hosts, vms, rules, {}, recent={}, now=0.0, max_moves=5)
    assert sorted(m.target.name for m in moves) == ["b", "c"]


def test_a_repair_that_fits_nowhere_is_skipped() -> None:
    hosts = [host(1, "a"), host(2, "b", used_memory_mib=16000)]
    rules = [rule("web", ANTI, 10, 11)]
    vms = [vm(10, "web1", 1024, host_id=1), vm(11, "web2", 1024, host_id=1)]
    assert balance(hosts, vms, rules, {}, recent={}, now=0.0) == []


def test_balance_does_not_split_affine_vms() -> None:
    hosts = [host(1, "a", used_memory_mib=12288), host(2, "b")]
    rules = [rule("pair", AFFINITY, 10, 11)]
    vms = [vm(10, "app", 6144, host_id=1), vm(11, "db", 6144, host_id=1)]
    assert balance(hosts, vms, rules, {}, recent={}, now=0.0) == []
    assert len(balance(hosts, vms, [], {}, recent={}, now=0.0)) == 1


def test_placement_overrides_the_vms_own_host() -> None:
    hosts = [host(1, "a", used_memory_mib=12288), host(2, "b")]
    vms = [vm(10, "x", 4096, host_id=2)]
    # The mapping says x runs on a (the busy one): it may move to b.
    moves = balance(hosts, vms, [], {10: 1}, recent={}, now=0.0)
    assert [(m.vm.name, m.source.name, m.target.name) for m in moves] == [("x", "a", "b")]
    assert balance(hosts, vms, [], {}, recent={}, now=0.0) == []
