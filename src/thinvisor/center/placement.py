"""Where a VM should run: the center's placement, evacuation and balancing (the role of
VirtualCenter's DRS), as pure logic over plain records: no database, no host, no clock.

Three questions:

- ``choose_host``: which host takes a new VM, or a VM being powered on;
- ``evacuation_plan``: where each VM of a host entering maintenance mode goes;
- ``balance``: which few moves even out the memory use of a cluster's hosts, and which
  repair a broken anti-affinity rule.

A host may take a VM only if (``NoPlacement`` says, for each host, the first that fails):

- it is not excluded by the caller, it is connected and not in maintenance mode;
- it has at least as many CPUs as the VM;
- its free memory, ``memory_mib - used_memory_mib - reserved_memory_mib``, holds the
  whole VM. Memory is never overcommitted, so a VM's memory reservation (at most its
  memory) is honoured wherever the VM fits;
- its unreserved CPU, ``cpus * core_mhz - reserved_cpu_mhz``, holds the VM's CPU
  reservation; a host whose clock is unknown (``core_mhz`` 0) takes only VMs that
  reserve no CPU;
- it holds no other VM of an anti-affinity rule of the VM's;
- for each affinity rule of the VM's whose other VMs run on hosts that may take VMs
  (given, connected, not in maintenance, not excluded), it is one of those hosts. Where
  none does (a new group, or one whose host is being left), any host will do.

Among the hosts left, the highest score wins, ties broken by name, then id::

    score = 0.7 * (free memory once the VM is placed) / memory_mib
          + 0.3 * (1 - cpu_load - planned_cpus / cpus)

Memory weighs more: a host cannot overcommit it, while CPU is shared by time. A plan
adds each VM's memory and CPU reservation to the host it chooses, so that the next VM
sees it. ``cpu_load`` is a measurement, of the VMs already there; how busy a VM will be
where it does not run yet is not known, so a plan counts each vCPU it places on a host as
busy (``planned_cpus``, the cautious guess, as Proxmox's static load counts vCPUs). That
keeps an evacuation from piling every VM onto the host that happened to be idlest when
measured.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NamedTuple

from thinvisor.errors import InsufficientResources, InvalidArgument

#: The weights of a host's free memory and idle CPU in its score.
MEMORY_WEIGHT = 0.7
CPU_WEIGHT = 0.3
# Scores and spreads closer than this are equal (floating point sums differ by less).
_EPSILON = 1e-9


class RuleKind(StrEnum):
    AFFINITY = "affinity"
    """The rule's VMs run on one host."""
    ANTI_AFFINITY = "anti-affinity"
    """No two of the rule's VMs run on one host."""


def _check_count(field: str, owner: str, value: object, least: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidArgument(field, f"{owner}: {value!r} is not a whole number >= {least}")


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class HostLoad:
    """A host as placement sees it: what it has, what its VMs use, and its state."""

    host_id: int
    name: str
    cluster_id: int | None
    connected: bool
    maintenance: bool
    cpus: int
    core_mhz: int
    """One core's clock, the unit of CPU reservations; 0: unknown."""
    memory_mib: int
    used_memory_mib: int
    """The memory of its running VMs."""
    cpu_load: float
    """How busy its CPUs are: 0 (idle) to 1 (all busy)."""
    reserved_memory_mib: int = 0
    """Memory kept from VMs besides theirs: the host's own, or promised to a VM arriving."""
    reserved_cpu_mhz: int = 0
    """CPU reserved by its VMs, and kept for itself."""
    planned_cpus: int = 0
    """The vCPUs of the VMs a plan has put there so far (not yet in ``cpu_load``)."""

    def __post_init__(self) -> None:
        owner = f"host {self.name!r}"
        for name in ("cpus", "core_mhz", "memory_mib", "used_memory_mib"):
            _check_count(name, owner, getattr(self, name))
        for name in ("reserved_memory_mib", "reserved_cpu_mhz", "planned_cpus"):
            _check_count(name, owner, getattr(self, name))
        load = self.cpu_load
        if isinstance(load, bool) or not isinstance(load, int | float) or not 0 <= load <= 1:
            raise InvalidArgument("cpu_load", f"{owner}: {load!r} is not between 0 and 1")

    @property
    def free_memory_mib(self) -> int:
        """Memory that a VM may still take (negative: overcommitted already)."""
        return self.memory_mib - self.used_memory_mib - self.reserved_memory_mib

    @property
    def unreserved_cpu_mhz(self) -> int:
        return self.cpus * self.core_mhz - self.reserved_cpu_mhz

    @property
    def memory_use(self) -> float:
        """The fraction of its memory used or reserved (1 where it has none)."""
        if self.memory_mib <= 0:
            return 1.0
        return (self.used_memory_mib + self.reserved_memory_mib) / self.memory_mib

    @property
    def takes_vms(self) -> bool:
        """Connected and not in maintenance mode."""
        return self.connected and not self.maintenance


@dataclass(frozen=True)
class VmDemand:
    """What a VM needs of a host, and where it runs now (``host_id`` None: nowhere yet)."""

    vm_id: int
    name: str
    memory_mib: int
    cpus: int
    reserved_memory_mib: int = 0
    reserved_cpu_mhz: int = 0
    host_id: int | None = None

    def __post_init__(self) -> None:
        owner = f"vm {self.name!r}"
        _check_count("memory_mib", owner, self.memory_mib, 1)
        _check_count("cpus", owner, self.cpus, 1)
        _check_count("reserved_memory_mib", owner, self.reserved_memory_mib)
        _check_count("reserved_cpu_mhz", owner, self.reserved_cpu_mhz)
        if self.reserved_memory_mib > self.memory_mib:
            raise InvalidArgument(
                "reserved_memory_mib",
                f"{owner}: {self.reserved_memory_mib} MiB is more than its "
                f"{self.memory_mib} MiB of memory",
            )


@dataclass(frozen=True)
class Rule:
    """An affinity or anti-affinity rule over ``vm_ids`` (two at least)."""

    name: str
    kind: RuleKind
    vm_ids: frozenset[int]

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", RuleKind(self.kind))
        except ValueError:
            choices = ", ".join(k.value for k in RuleKind)
            raise InvalidArgument(
                "kind", f"rule {self.name!r}: {self.kind!r} is not one of {choices}"
            ) from None
        object.__setattr__(self, "vm_ids", frozenset(self.vm_ids))
        if len(self.vm_ids) < 2:
            raise InvalidArgument("vms", f"rule {self.name!r}: a rule needs two VMs at least")


class Move(NamedTuple):
    """``vm`` goes to ``host`` (the host as it was given)."""

    vm: VmDemand
    host: HostLoad


class Stuck(NamedTuple):
    """``vm`` fits on no host: ``reason`` says why of each."""

    vm: VmDemand
    reason: str


@dataclass(frozen=True)
class Plan:
    """An evacuation: the moves, in order, and the VMs that fit nowhere."""

    moves: list[Move] = field(default_factory=list)
    stuck: list[Stuck] = field(default_factory=list)


@dataclass(frozen=True)
class BalanceMove:
    """A move ``balance`` proposes: ``vm`` from ``source`` to ``target`` (both hosts as
    they were given), and why."""

    vm: VmDemand
    source: HostLoad
    target: HostLoad
    reason: str


class NoPlacement(InsufficientResources):
    """No host may take the VM; ``refused`` has each host's reason, by host id."""

    def __init__(self, vm: VmDemand, refused: Iterable[tuple[HostLoad, str]]) -> None:
        pairs = list(refused)
        clauses = "; ".join(f"{host.name}: {why}" for host, why in pairs)
        super().__init__(f"no host can take vm {vm.name!r}: {clauses or 'no hosts given'}")
        self.vm = vm
        self.refused = {host.host_id: why for host, why in pairs}


# --- choosing a host ------------------------------------------------------------------


def choose_host(
    vm: VmDemand,
    hosts: Iterable[HostLoad],
    rules: Iterable[Rule],
    placement: Mapping[int, int],
    *,
    exclude: Collection[int] = (),
) -> HostLoad:
    """The best host of ``hosts`` for ``vm`` (see the module's docstring), where
    ``placement`` says on which host each other VM runs; never one of ``exclude``.
    ``NoPlacement`` listing each host and why it was refused if none may take it."""
    given = sorted(_by_id(hosts).values(), key=lambda h: (h.name, h.host_id))
    own = [rule for rule in rules if vm.vm_id in rule.vm_ids]
    takers = {h.host_id for h in given if h.takes_vms and h.host_id not in exclude}
    refused: list[tuple[HostLoad, str]] = []
    fitting: list[HostLoad] = []
    for host in given:
        why = _refusal(vm, host, exclude) or _rule_refusal(vm, host, own, placement, takers)
        if why is None:
            fitting.append(host)
        else:
            refused.append((host, why))
    if not fitting:
        raise NoPlacement(vm, refused)
    return min(fitting, key=lambda h: (-round(score(vm, h), 9), h.name, h.host_id))


def score(vm: VmDemand, host: HostLoad) -> float:
    """How good a home ``host`` is for ``vm`` (higher is better; see the module)."""
    if host.memory_mib <= 0:
        return -math.inf
    free_after = (host.free_memory_mib - vm.memory_mib) / host.memory_mib
    planned = host.planned_cpus / host.cpus if host.cpus > 0 else 0.0
    return MEMORY_WEIGHT * free_after + CPU_WEIGHT * (1 - host.cpu_load - planned)


def _refusal(vm: VmDemand, host: HostLoad, exclude: Collection[int]) -> str | None:
    """Why ``host`` cannot take ``vm`` whatever the rules say; None if it can."""
    if host.host_id in exclude:
        return "excluded"
    if not host.connected:
        return "disconnected"
    if host.maintenance:
        return "in maintenance mode"
    if host.cpus < vm.cpus:
        return f"has {host.cpus} CPUs, the VM {vm.cpus}"
    if host.free_memory_mib < vm.memory_mib:
        free = max(0, host.free_memory_mib)
        return f"{free} MiB free, the VM needs {vm.memory_mib} MiB"
    if vm.reserved_cpu_mhz and host.core_mhz == 0:
        return f"CPU clock unknown: cannot reserve {vm.reserved_cpu_mhz} MHz"
    if host.unreserved_cpu_mhz < vm.reserved_cpu_mhz:
        free = max(0, host.unreserved_cpu_mhz)
        return f"{free} MHz of CPU unreserved, the VM reserves {vm.reserved_cpu_mhz} MHz"
    return None


def _rule_refusal(
    vm: VmDemand,
    host: HostLoad,
    rules: Iterable[Rule],
    placement: Mapping[int, int],
    takers: Collection[int],
) -> str | None:
    """Why ``vm``'s rules keep it off ``host``; None if they do not."""
    for rule in sorted(rules, key=lambda r: r.name):
        peers = [placement.get(vm_id) for vm_id in rule.vm_ids if vm_id != vm.vm_id]
        if rule.kind == RuleKind.ANTI_AFFINITY and host.host_id in peers:
            return f"holds another VM of anti-affinity rule {rule.name!r}"
        homes = {peer for peer in peers if peer in takers}
        if rule.kind == RuleKind.AFFINITY and homes and host.host_id not in homes:
            return f"the other VMs of affinity rule {rule.name!r} run elsewhere"
    return None


def _by_id(hosts: Iterable[HostLoad]) -> dict[int, HostLoad]:
    found: dict[int, HostLoad] = {}
    for host in hosts:
        if host.host_id in found:
            raise InvalidArgument("hosts", f"host id {host.host_id} is given twice")
        found[host.host_id] = host
    return found


def _vms_by_id(vms: Iterable[VmDemand]) -> dict[int, VmDemand]:
    found: dict[int, VmDemand] = {}
    for vm in vms:
        if vm.vm_id in found:
            raise InvalidArgument("vms", f"vm id {vm.vm_id} is given twice")
        found[vm.vm_id] = vm
    return found


def _plus(host: HostLoad, vm: VmDemand) -> HostLoad:
    """``host`` once ``vm`` runs there."""
    return replace(
        host,
        used_memory_mib=host.used_memory_mib + vm.memory_mib,
        reserved_cpu_mhz=host.reserved_cpu_mhz + vm.reserved_cpu_mhz,
        planned_cpus=host.planned_cpus + vm.cpus,
    )


def _minus(host: HostLoad, vm: VmDemand) -> HostLoad:
    """``host`` once ``vm`` has left it."""
    return replace(
        host,
        used_memory_mib=max(0, host.used_memory_mib - vm.memory_mib),
        reserved_cpu_mhz=max(0, host.reserved_cpu_mhz - vm.reserved_cpu_mhz),
    )


# --- evacuating a host ----------------------------------------------------------------


def evacuation_plan(
    host_id: int,
    vms: Iterable[VmDemand],
    hosts: Iterable[HostLoad],
    rules: Iterable[Rule],
    placement: Mapping[int, int],
) -> Plan:
    """Where each of ``vms`` (running on ``host_id``) goes so that the host may enter
    maintenance mode: onto the other hosts of its cluster (without a cluster: the other
    hosts given), largest VM first, each choice counted before the next so that the VMs
    spread. The VMs that fit nowhere are ``stuck``, with the reason."""
    given = _by_id(hosts)
    source = given.get(host_id)
    if source is None:
        raise InvalidArgument("host_id", f"host {host_id} is not among the hosts given")
    leaving = _vms_by_id(vms)
    for vm in leaving.values():
        if vm.host_id not in (None, host_id):
            raise InvalidArgument("vms", f"vm {vm.name!r} runs on host {vm.host_id}, not here")
    targets = {
        i: h
        for i, h in given.items()
        if i != host_id and (source.cluster_id is None or h.cluster_id == source.cluster_id)
    }
    where = {**placement, **dict.fromkeys(leaving, host_id)}
    rule_list = list(rules)
    plan = Plan()
    for vm in sorted(leaving.values(), key=_largest_first):
        try:
            chosen = choose_host(vm, targets.values(), rule_list, where)
        except NoPlacement as exc:
            plan.stuck.append(Stuck(vm, exc.message))
            continue
        plan.moves.append(Move(vm, given[chosen.host_id]))
        targets[chosen.host_id] = _plus(chosen, vm)
        where[vm.vm_id] = chosen.host_id
    return plan


def _largest_first(vm: VmDemand) -> tuple[int, int, int, str, int]:
    return (-vm.memory_mib, -vm.reserved_cpu_mhz, -vm.cpus, vm.name, vm.vm_id)


# --- balancing ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Guard:
    """The anti-flap guard: what moved within ``guard_s`` of ``now``."""

    recent: Mapping[int, tuple[int, int, float]]
    now: float
    guard_s: float

    def moved(self, vm_id: int) -> bool:
        """Whether the VM moved within the guard."""
        entry = self.recent.get(vm_id)
        return entry is not None and self.now - entry[2] < self.guard_s

    def left(self, vm_id: int) -> tuple[int, ...]:
        """The host the VM left within the guard (it may not go back), if any."""
        entry = self.recent.get(vm_id)
        return (entry[0],) if entry is not None and self.moved(vm_id) else ()


class _World:
    """The hosts and VMs as the moves proposed so far leave them."""

    def __init__(
        self, hosts: Iterable[HostLoad], vms: Iterable[VmDemand], placement: Mapping[int, int]
    ) -> None:
        self.given = _by_id(hosts)
        self.loads = dict(self.given)
        self.vms = _vms_by_id(vms)
        self.where: dict[int, int] = dict(placement)
        for vm in self.vms.values():
            if vm.vm_id not in self.where and vm.host_id is not None:
                self.where[vm.vm_id] = vm.host_id

    def group(self, host_id: int) -> list[HostLoad]:
        """The hosts that may take VMs in the cluster of ``host_id``, by name."""
        cluster = self.given[host_id].cluster_id
        found = [h for h in self.loads.values() if h.cluster_id == cluster and h.takes_vms]
        return sorted((h for h in found if h.memory_mib > 0), key=lambda h: (h.name, h.host_id))

    def groups(self) -> list[list[HostLoad]]:
        """Every cluster's hosts that may take VMs (hosts in none: one group)."""
        clusters = {h.cluster_id: h.host_id for h in sorted(self.loads.values(), key=_by_name)}
        return [self.group(host_id) for host_id in clusters.values()]

    def on(self, host_id: int) -> list[VmDemand]:
        """The VMs known to run on ``host_id``, by name."""
        found = [vm for vm in self.vms.values() if self.where.get(vm.vm_id) == host_id]
        return sorted(found, key=lambda vm: (vm.name, vm.vm_id))

    def bound(self, vm: VmDemand, rules: Iterable[Rule]) -> bool:
        """Whether an affinity rule holds ``vm`` where it is (with another of its VMs)."""
        here = self.where.get(vm.vm_id)
        return any(
            self.where.get(peer) == here
            for rule in rules
            if rule.kind == RuleKind.AFFINITY and vm.vm_id in rule.vm_ids
            for peer in rule.vm_ids - {vm.vm_id}
        )

    def move(self, vm: VmDemand, target_id: int, reason: str) -> BalanceMove:
        source_id = self.where[vm.vm_id]
        done = BalanceMove(vm, self.given[source_id], self.given[target_id], reason)
        self.loads[source_id] = _minus(self.loads[source_id], vm)
        self.loads[target_id] = _plus(self.loads[target_id], vm)
        self.where[vm.vm_id] = target_id
        return done


def _by_name(host: HostLoad) -> tuple[str, int]:
    return (host.name, host.host_id)


def balance(
    hosts: Iterable[HostLoad],
    vms: Iterable[VmDemand],
    rules: Iterable[Rule],
    placement: Mapping[int, int],
    *,
    recent: Mapping[int, tuple[int, int, float]],
    now: float,
    threshold: float = 0.2,
    guard_s: float = 600.0,
    max_moves: int = 1,
) -> list[BalanceMove]:
    """At most ``max_moves`` moves (live migrations) that make the hosts better, the
    first ones first:

    - repairs of broken anti-affinity rules: all but one of a rule's VMs sharing a host
      move to hosts of the same cluster that hold none of its VMs;
    - then, in each cluster (hosts in none count as one), while the spread of memory use
      (``HostLoad.memory_use``) between its most and least used host is above
      ``threshold``, the move off the most used host that narrows that spread most.

    ``placement`` (else ``VmDemand.host_id``) says where each VM runs; ``recent`` when
    each VM last moved (``(from_host, to_host, when)``, on the clock of ``now``): a VM
    moved within ``guard_s`` is not moved again to balance, and never back to the host
    it left. A repair moves such a VM only when no other VM of the rule sharing its host
    can go instead. A VM kept on its host by an affinity rule is not moved alone.
    """
    _check_balance(threshold, guard_s, max_moves)
    rule_list = list(rules)
    world = _World(hosts, vms, placement)
    guard = _Guard(recent, now, guard_s)
    moves: list[BalanceMove] = []
    for repair in _repairs(world, rule_list, guard):
        if len(moves) == max_moves:
            return moves
        moves.append(repair)
    while len(moves) < max_moves:
        step = _balancing_move(world, rule_list, guard, threshold)
        if step is None:
            break
        moves.append(step)
    return moves


def _check_balance(threshold: float, guard_s: float, max_moves: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise InvalidArgument("threshold", f"{threshold!r} is not a number")
    if not 0 <= threshold < 1:
        raise InvalidArgument("threshold", f"{threshold!r} is not at least 0 and below 1")
    if isinstance(guard_s, bool) or not isinstance(guard_s, int | float) or not guard_s >= 0:
        raise InvalidArgument("guard_s", f"{guard_s!r} is not a number of seconds >= 0")
    _check_count("max_moves", "balance", max_moves)


def _repairs(world: _World, rules: list[Rule], guard: _Guard) -> Iterator[BalanceMove]:
    """Moves repairing each broken anti-affinity rule, made in ``world`` as they are
    yielded (stop early: the moves not taken are not made)."""
    for rule in sorted(rules, key=lambda r: r.name):
        if rule.kind != RuleKind.ANTI_AFFINITY:
            continue
        for host_id, members in _crowded(world, rule):
            yield from _spread_out(world, rule, host_id, members, rules, guard)


def _spread_out(
    world: _World,
    rule: Rule,
    host_id: int,
    members: list[VmDemand],
    rules: list[Rule],
    guard: _Guard,
) -> Iterator[BalanceMove]:
    """Move ``rule``'s VMs off ``host_id`` until one is left there: the VMs not moved
    lately first, the smaller first (the cheaper to move)."""
    order = sorted(members, key=lambda vm: (guard.moved(vm.vm_id), vm.memory_mib))
    left = len(members)
    for vm in order:
        if left == 1:
            return
        if world.bound(vm, rules):
            continue
        exclude = (host_id, *guard.left(vm.vm_id))
        try:
            target = choose_host(vm, world.group(host_id), rules, world.where, exclude=exclude)
        except NoPlacement:
            continue
        left -= 1
        host = world.given[host_id].name
        reason = f"anti-affinity rule {rule.name!r}: another of its VMs is on {host}"
        yield world.move(vm, target.host_id, reason)


def _crowded(world: _World, rule: Rule) -> list[tuple[int, list[VmDemand]]]:
    """The hosts (that ``world`` knows) holding two VMs or more of ``rule``, with them."""
    found: dict[int, list[VmDemand]] = {}
    for vm_id in sorted(rule.vm_ids):
        host_id = world.where.get(vm_id)
        if vm_id in world.vms and host_id in world.given:
            found.setdefault(host_id, []).append(world.vms[vm_id])
    return [(host_id, vms) for host_id, vms in sorted(found.items()) if len(vms) > 1]


def _spread(hosts: Iterable[HostLoad]) -> float:
    uses = [host.memory_use for host in hosts]
    return max(uses) - min(uses) if uses else 0.0


def _balancing_move(
    world: _World, rules: list[Rule], guard: _Guard, threshold: float
) -> BalanceMove | None:
    """The move that narrows the widest spread above ``threshold`` most; made in
    ``world``. None if no move narrows any."""
    groups = sorted(world.groups(), key=_spread, reverse=True)
    for hosts in groups:
        spread = _spread(hosts)
        if spread <= threshold + _EPSILON:
            return None  # the groups after it are even more even
        # Hosts are by name: the first of equals wins.
        busiest = max(hosts, key=lambda h: h.memory_use)
        best = _best_off(world, hosts, busiest, rules, guard, spread)
        if best is not None:
            vm, target = best
            least = min(hosts, key=lambda h: h.memory_use)
            reason = (
                f"memory use {busiest.memory_use:.0%} on {busiest.name}, "
                f"{least.memory_use:.0%} on {least.name}"
            )
            return world.move(vm, target.host_id, reason)
    return None


def _best_off(
    world: _World,
    hosts: list[HostLoad],
    busiest: HostLoad,
    rules: list[Rule],
    guard: _Guard,
    spread: float,
) -> tuple[VmDemand, HostLoad] | None:
    """The VM of ``busiest`` and its new host that leave ``hosts`` the narrowest spread,
    if narrower than ``spread``."""
    best: tuple[float, VmDemand, HostLoad] | None = None
    for vm in world.on(busiest.host_id):
        if guard.moved(vm.vm_id) or world.bound(vm, rules):
            continue
        try:
            exclude = (busiest.host_id, *guard.left(vm.vm_id))
            target = choose_host(vm, hosts, rules, world.where, exclude=exclude)
        except NoPlacement:
            continue
        after = _spread(_after(hosts, vm, busiest.host_id, target.host_id))
        if after < spread - _EPSILON and (best is None or after < best[0] - _EPSILON):
            best = (after, vm, target)
    return None if best is None else (best[1], best[2])


def _after(hosts: list[HostLoad], vm: VmDemand, source: int, target: int) -> list[HostLoad]:
    """``hosts`` once ``vm`` moved from ``source`` to ``target``."""
    return [_after_one(host, vm, source, target) for host in hosts]


def _after_one(host: HostLoad, vm: VmDemand, source: int, target: int) -> HostLoad:
    if host.host_id == source:
        return _minus(host, vm)
    if host.host_id == target:
        return _plus(host, vm)
    return host
