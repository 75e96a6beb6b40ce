"""The center's placement at work (the part vCenter's DRS plays): the inventory's hosts
and VMs as ``thinvisor.center.placement`` sees them, and the questions that the center's
operations ask of them.

``cluster_loads`` reads one cluster (or the hosts in none) from the inventory: a
``HostLoad`` per host, a ``VmDemand`` per VM, where each powered-on VM runs, and the
rules binding the cluster's VMs. A VM holds its host's memory while it runs or is paused
(its host away: while it last did), and its CPU reservation with it. A host's CPU load,
clock and what it keeps for itself are as its last sync found them (a peer that does not
say counts as idle, with no clock: it takes no VM that reserves CPU). A host's cluster is
the nearest cluster above it.

Everything here is plain logic over what ``cluster_loads`` read, but ``cluster_loads``
and ``cluster_of`` (database reads: call them in a worker thread).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from thinvisor.center.inventory import HostRow, Inventory, VmRow
from thinvisor.center.models import HostState, NodeKind
from thinvisor.center.placement import (
    BalanceMove,
    HostLoad,
    NoPlacement,
    Plan,
    Rule,
    RuleKind,
    Stuck,
    VmDemand,
    balance,
    choose_host,
    evacuation_plan,
)
from thinvisor.center.rules import Rules
from thinvisor.providers.base import PowerState

#: The power states in which a VM holds its host's memory.
POWERED_ON = frozenset({PowerState.RUNNING, PowerState.PAUSED})


def powered_on(vm: VmRow) -> bool:
    """Whether the VM holds its host's memory: it runs or is paused (its host away: it
    did when last known)."""
    state = vm.power_state
    if state == PowerState.UNKNOWN:
        state = vm.last_power_state or PowerState.UNKNOWN
    return not vm.template and state in POWERED_ON


def demand(vm: VmRow) -> VmDemand:
    """What the VM needs of a host, and where it is."""
    memory = max(1, vm.memory_mib)
    return VmDemand(
        vm_id=vm.id,
        name=vm.name,
        memory_mib=memory,
        cpus=max(1, vm.cpus),
        reserved_memory_mib=min(memory, max(0, vm.reserved_memory_mib)),
        reserved_cpu_mhz=max(0, vm.reserved_cpu_mhz),
        host_id=vm.host_id,
    )


@dataclass(frozen=True)
class Loads:
    """One cluster's hosts (the hosts in no cluster, for ``cluster_id`` None) as
    placement sees them, with every VM of the inventory, at one moment."""

    cluster_id: int | None
    hosts: dict[int, HostLoad]
    """The cluster's hosts, by id."""
    rows: dict[int, HostRow]
    """The same hosts as the inventory has them (their provider kind, their path)."""
    vms: dict[int, VmRow]
    """Every VM (not templates) of the inventory, by id."""
    placement: dict[int, int]
    """Where each powered-on VM runs: VM id -> host id."""
    rules: list[Rule]
    """The rules binding the cluster's VMs (and the VMs asked for)."""

    def on(self, host_id: int) -> list[VmRow]:
        """The powered-on VMs of a host, by name."""
        found = [vm for vm in self.vms.values() if self.placement.get(vm.id) == host_id]
        return sorted(found, key=lambda vm: (vm.name, vm.id))

    def takers(self) -> set[int]:
        """The hosts that may take VMs (connected, not in maintenance mode)."""
        return {host.host_id for host in self.hosts.values() if host.takes_vms}


def cluster_of(inventory: Inventory, node_id: int) -> int | None:
    """The id of the nearest cluster at or above the node; None if there is none."""
    for node in reversed(inventory.ancestors(node_id)):
        if node.kind == NodeKind.CLUSTER:
            return node.id
    return None


def cluster_loads(
    inventory: Inventory,
    rules: Rules,
    cluster_id: int | None,
    *,
    vm_ids: Iterable[int] = (),
    entering: Collection[int] = (),
) -> Loads:
    """The hosts of the cluster ``cluster_id`` as placement sees them; ``rules`` binding
    their VMs and ``vm_ids``. Hosts in ``entering`` (being evacuated) count as in
    maintenance mode."""
    clusters = _clusters(inventory.tree())
    rows = {h.id: h for h in inventory.hosts() if clusters.get(h.id) == cluster_id}
    vms = {vm.id: vm for vm in inventory.vms(template=False)}
    placement = {vm.id: vm.host_id for vm in vms.values() if powered_on(vm)}
    used: dict[int, int] = {}
    reserved: dict[int, int] = {}
    for vm_id, host_id in placement.items():
        used[host_id] = used.get(host_id, 0) + vms[vm_id].memory_mib
        reserved[host_id] = reserved.get(host_id, 0) + max(0, vms[vm_id].reserved_cpu_mhz)
    hosts = {
        row.id: _load(
            row, cluster_id, used.get(row.id, 0), reserved.get(row.id, 0), row.id in entering
        )
        for row in rows.values()
    }
    wanted = {vm.id for vm in vms.values() if vm.host_id in rows} | set(vm_ids)
    bound = rules.rules_for(wanted) if wanted else []
    return Loads(cluster_id, hosts, rows, vms, placement, bound)


def _load(
    row: HostRow, cluster_id: int | None, used_mib: int, reserved_mhz: int, entering: bool
) -> HostLoad:
    load = row.cpu_load if row.cpu_load is not None else 0.0
    return HostLoad(
        host_id=row.id,
        name=row.name,
        cluster_id=cluster_id,
        connected=row.state == HostState.CONNECTED,
        maintenance=row.maintenance or entering,
        cpus=row.cpus or 0,
        core_mhz=max(0, row.core_mhz),
        memory_mib=row.memory_mib or 0,
        used_memory_mib=used_mib,
        cpu_load=min(1.0, max(0.0, load)),
        reserved_memory_mib=max(0, row.reserved_memory_mib),
        reserved_cpu_mhz=max(0, row.reserved_cpu_mhz) + reserved_mhz,
    )


def _clusters(tree: list[dict[str, Any]], cluster: int | None = None) -> dict[int, int | None]:
    """The nearest cluster above each host of ``tree`` (``Inventory.tree``), by host id."""
    found: dict[int, int | None] = {}
    for entry in tree:
        if entry["kind"] == NodeKind.HOST:
            found[entry["id"]] = cluster
        elif entry["kind"] not in (NodeKind.VM, NodeKind.DATASTORE, NodeKind.NETWORK):
            inner = entry["id"] if entry["kind"] == NodeKind.CLUSTER else cluster
            found |= _clusters(entry["children"], inner)
    return found


# --- questions asked of the loads -----------------------------------------------------


def refusal(loads: Loads, vm_id: int, host_id: int, *, room: bool = True) -> str | None:
    """Why the host ``host_id`` (of ``loads``) may not take the VM ``vm_id``, one
    clause; None if it may. Without ``room``, only its state and the rules count (a
    stopped VM takes no memory)."""
    host = loads.hosts[host_id]
    vm = demand(loads.vms[vm_id])
    if not room:
        host = replace(
            host,
            cpus=max(host.cpus, vm.cpus),
            memory_mib=max(host.memory_mib, vm.memory_mib),
            used_memory_mib=0,
        )
    try:
        choose_host(vm, [host], [], loads.placement)
    except NoPlacement as exc:
        return exc.refused[host_id]
    return broken_rule(loads, vm_id, host_id)


def broken_rule(loads: Loads, vm_id: int, host_id: int) -> str | None:
    """The rule the VM would break on the host, said in one clause; None if none.

    As placement reads them: an anti-affinity rule is broken by a host where another of
    its VMs runs; an affinity rule by a host other than those where its other VMs run,
    as far as those take VMs (where none does, any host will do)."""
    takers = loads.takers()
    names = {i: vm.name for i, vm in loads.vms.items()}
    for rule in sorted(loads.rules, key=lambda r: r.name):
        if vm_id not in rule.vm_ids:
            continue
        peers = sorted(rule.vm_ids - {vm_id})
        if rule.kind == RuleKind.ANTI_AFFINITY:
            there = [names.get(p, str(p)) for p in peers if loads.placement.get(p) == host_id]
            if there:
                return f"{there[0]} runs there and anti-affinity rule {rule.name!r} parts them"
            continue
        homes = {loads.placement[p]: p for p in peers if loads.placement.get(p) in takers}
        if homes and host_id not in homes:
            home, peer = min(homes.items())
            where = loads.hosts[home].name if home in loads.hosts else str(home)
            return f"affinity rule {rule.name!r} keeps it with {names.get(peer)} on {where}"
    return None


def choose(
    loads: Loads, vm: VmDemand, candidates: Collection[int], rules: Iterable[Rule] = ()
) -> HostLoad:
    """The best of the hosts ``candidates`` (of ``loads``) for ``vm``; ``NoPlacement``
    saying why of each if none may take it."""
    hosts = [loads.hosts[i] for i in sorted(candidates) if i in loads.hosts]
    return choose_host(vm, hosts, rules, loads.placement)


def evacuation(loads: Loads, host_id: int, vm_ids: Iterable[int], targets: Collection[int]) -> Plan:
    """Where each of the VMs ``vm_ids`` (powered on on the host ``host_id``) goes among
    the hosts ``targets``, so that the host may enter maintenance mode."""
    hosts = [h for i, h in loads.hosts.items() if i == host_id or i in targets]
    vms = [demand(loads.vms[i]) for i in vm_ids]
    return evacuation_plan(host_id, vms, hosts, loads.rules, loads.placement)


def balance_moves(
    loads: Loads,
    movable: Collection[int],
    *,
    recent: Mapping[int, tuple[int, int, float]],
    now: float,
    guard_s: float,
    threshold: float,
    max_moves: int,
) -> list[BalanceMove]:
    """At most ``max_moves`` moves that ``balance`` proposes for the cluster of ``loads``:
    among the hosts ``movable`` (whose VMs may migrate), each provider kind apart (a VM
    migrates only between hosts of its kind), only running VMs moving."""
    moves: list[BalanceMove] = []
    for kind in sorted({loads.rows[i].provider for i in movable}):
        ids = {i for i in movable if loads.rows[i].provider == kind}
        hosts = [loads.hosts[i] for i in sorted(ids)]
        vms = [
            demand(vm)
            for vm in loads.vms.values()
            if vm.host_id in ids and vm.power_state == PowerState.RUNNING
        ]
        moves += balance(
            hosts,
            vms,
            loads.rules,
            loads.placement,
            recent=recent,
            now=now,
            threshold=threshold,
            guard_s=guard_s,
            max_moves=max_moves - len(moves),
        )
        if len(moves) >= max_moves:
            break
    return moves


def stuck_reason(stuck: Stuck) -> str:
    """Why a VM of an evacuation fits nowhere, without the VM's name said again."""
    return stuck.reason.removeprefix(f"no host can take vm {stuck.vm.name!r}: ")


def recent_moves(
    history: Mapping[int, tuple[int, int, float]], now: float, keep_s: float
) -> dict[int, tuple[int, int, float]]:
    """The moves of ``history`` made less than ``keep_s`` before ``now``."""
    return {vm_id: move for vm_id, move in history.items() if now - move[2] < keep_s}
