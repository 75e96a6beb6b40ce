"""Memory overcommit on the host: page sharing (KSM) and the balloon policy.

- **Page sharing.** QEMU marks the RAM of a VM with ``resources.page_sharing`` mergeable
  (``-machine mem-merge=on``); the kernel's KSM thread merges identical pages, ESXi's
  transparent page sharing. ``start_ksm`` turns KSM on with the configured scan rate at
  agent start and returns what was there, for ``restore_ksm``.
- **Balloons.** ``balloon_targets`` is the policy, a pure function: under memory pressure
  it takes memory back from VMs, first and most from those with the fewest shares per
  MiB, never below a VM's reservation; without pressure it gives it back. A VM with a
  limit below its memory is always held at its limit. ``rebalance`` applies it to the
  host's running VMs through QMP.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from thinvisor.config import MemoryConfig
from thinvisor.errors import Busy, InvalidArgument, QemuError
from thinvisor.host import hostinfo
from thinvisor.host.engine import process
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.inventory import Inventory, VmEntry
from thinvisor.model.resources import memory_shares
from thinvisor.model.vm import MEMORY_MIN_MIB, VmSpec

log = logging.getLogger(__name__)

KSM_DIR = Path("/sys/kernel/mm/ksm")
# QMP sessions of the policy are short and never wait for a busy socket.
QMP_TIMEOUT_S = 2.0
MIB = 1 << 20


# --- page sharing (KSM) ---------------------------------------------------------------


@dataclass(frozen=True)
class KsmSettings:
    """The KSM tunables thinvisor sets: on or off (``run``: 0, 1, or 2 to unmerge all)
    and how fast it scans."""

    run: int
    pages_to_scan: int
    sleep_millisecs: int


def read_ksm(root: Path = KSM_DIR) -> dict[str, int]:
    """Every numeric value KSM shows (``pages_sharing``, ``full_scans``, ``run``, ...);
    empty when the kernel has no KSM."""
    values: dict[str, int] = {}
    if not root.is_dir():
        return values
    for path in sorted(root.iterdir()):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.lstrip("-").isdigit():
            values[path.name] = int(text)
    return values


def ksm_settings(root: Path = KSM_DIR) -> KsmSettings | None:
    """KSM's current tunables, or None when the kernel has no KSM."""
    values = read_ksm(root)
    try:
        return KsmSettings(values["run"], values["pages_to_scan"], values["sleep_millisecs"])
    except KeyError:
        return None


def apply_ksm(settings: KsmSettings, root: Path = KSM_DIR) -> None:
    """Write the tunables, the scan rate before ``run``; raises ``OSError``."""
    (root / "pages_to_scan").write_text(f"{settings.pages_to_scan}\n")
    (root / "sleep_millisecs").write_text(f"{settings.sleep_millisecs}\n")
    (root / "run").write_text(f"{settings.run}\n")


def start_ksm(config: MemoryConfig, root: Path = KSM_DIR) -> KsmSettings | None:
    """At agent start: turn KSM on at the configured scan rate (if ``config.ksm``).

    Returns the settings that were there before, for ``restore_ksm`` when the agent
    stops (VMs outlive the agent, so it may also leave KSM on); None when nothing was
    changed: KSM off in the configuration, missing, or not writable (logged).
    """
    if not config.ksm:
        return None
    previous = ksm_settings(root)
    if previous is None:
        log.warning("memory: the kernel has no KSM; no page sharing between VMs")
        return None
    wanted = KsmSettings(1, config.ksm_pages_to_scan, config.ksm_sleep_millisecs)
    try:
        apply_ksm(wanted, root)
    except OSError as exc:
        log.warning("memory: cannot turn KSM on: %s", exc)
        restore_ksm(previous, root)
        return None
    log.info(
        "memory: KSM on, %d pages every %d ms (was run=%d, %d pages every %d ms)",
        wanted.pages_to_scan, wanted.sleep_millisecs,
        previous.run, previous.pages_to_scan, previous.sleep_millisecs,
    )  # fmt: skip
    return previous


def restore_ksm(previous: KsmSettings, root: Path = KSM_DIR) -> None:
    """Put back the settings ``start_ksm`` found; failures are logged, not raised."""
    try:
        apply_ksm(previous, root)
    except OSError as exc:
        log.warning("memory: cannot restore KSM's settings: %s", exc)


# --- the balloon policy ---------------------------------------------------------------


@dataclass(frozen=True)
class BalloonVm:
    """What the balloon policy knows of one running VM; sizes in MiB."""

    name: str
    memory_mib: int
    shares: int
    reservation_mib: int = 0
    limit_mib: int | None = None
    # What the balloon holds now: memory_mib less what the guest has.
    balloon_mib: int = 0

    @classmethod
    def of(cls, spec: VmSpec, actual_mib: int) -> BalloonVm:
        """A VM from its spec and the guest memory its balloon reports (``query-balloon``)."""
        res = spec.resources
        return cls(
            name=spec.name,
            memory_mib=spec.memory_mib,
            shares=memory_shares(res.memory_shares, spec.memory_mib),
            reservation_mib=res.memory_reservation_mib,
            limit_mib=res.memory_limit_mib,
            balloon_mib=max(0, spec.memory_mib - actual_mib),
        )

    @property
    def current_mib(self) -> int:
        return self.memory_mib - self.balloon_mib

    @property
    def ceiling_mib(self) -> int:
        return min(self.memory_mib, self.limit_mib or self.memory_mib)

    def floor_mib(self, max_percent: int) -> int:
        """The least it may be left with: its reservation, and what the balloon may not
        take; its limit when that is lower still."""
        kept = self.memory_mib - self.memory_mib * max_percent // 100
        return min(max(self.reservation_mib, kept), self.ceiling_mib)


def balloon_targets(
    vms: Sequence[BalloonVm], available_mib: int, low_water_mib: int, *, max_percent: int = 65
) -> dict[str, int]:
    """Each VM's balloon target: the guest memory in MiB to ask its balloon for.

    Below the low-water mark the host is short by ``low_water_mib - available_mib``,
    which balloons take back. Above it, up to the surplus is given back. Memory goes as
    ESXi's shares do: each VM ends up with memory in proportion to its shares, within
    its bounds, so under pressure the VMs with the fewest shares per MiB give back
    first and most (VMs of one share level give back the same part of their memory),
    and without pressure those with the most shares get it back first. No VM goes
    below its reservation (or ``100 - max_percent`` % of its memory), nor above its
    limit: a VM with a limit below its memory is always ballooned down to the limit.
    """
    if not vms:
        return {}
    start = [min(max(v.current_mib, v.floor_mib(max_percent)), v.ceiling_mib) for v in vms]
    if available_mib < low_water_mib:
        lows, highs = [v.floor_mib(max_percent) for v in vms], start
    else:
        lows, highs = start, [v.ceiling_mib for v in vms]
    goal = sum(v.current_mib for v in vms) + available_mib - low_water_mib
    goal = min(max(goal, sum(lows)), sum(highs))
    shares = [max(1, v.shares) for v in vms]
    targets = _fill(shares, lows, highs, goal)
    return {v.name: t for v, t in zip(vms, targets, strict=True)}


def _fill(weights: list[int], lows: list[int], highs: list[int], goal: int) -> list[int]:
    """``clamp(level * weight, low, high)`` for each, at the level where they add up to
    ``goal`` (water-filling; found by bisection), rounded down."""

    def at(level: float) -> list[float]:
        return [min(max(level * w, lo), hi) for w, lo, hi in zip(weights, lows, highs, strict=True)]

    below, above = 0.0, max(hi / w for w, hi in zip(weights, highs, strict=True))
    for _ in range(100):
        middle = (below + above) / 2
        if sum(at(middle)) < goal:
            below = middle
        else:
            above = middle
    return [max(lo, math.floor(t + 1e-6)) for t, lo in zip(at(above), lows, strict=True)]


def check_balloon_target(spec: VmSpec, target_mib: int) -> None:
    """Refuse, with ``InvalidArgument``, a balloon target the VM cannot be given."""
    res = spec.resources
    if not res.balloon:
        raise InvalidArgument("balloon_mib", f"vm {spec.name!r} has no balloon")
    least = max(res.memory_reservation_mib, MEMORY_MIN_MIB)
    most = res.memory_limit_mib or spec.memory_mib
    if not least <= target_mib <= most:
        raise InvalidArgument(
            "balloon_mib",
            f"must be from {least} MiB (its reservation, and at least {MEMORY_MIN_MIB}) "
            f"to {most} MiB (its memory or limit)",
        )


# --- applying it ----------------------------------------------------------------------


async def rebalance(
    inventory: Inventory,
    config: MemoryConfig,
    *,
    available_mib: int | None = None,
    low_water_mib: int | None = None,
) -> dict[str, int]:
    """Set the balloon targets of the host's running VMs that have a balloon, by
    ``balloon_targets``; returns the targets it sent (VM name -> MiB).

    The agent calls it every ``config.rebalance_interval_s`` seconds, for example::

        while True:
            await memory.rebalance(service.inventory, config.memory)
            await asyncio.sleep(config.memory.rebalance_interval_s)

    The host's available memory and the low-water mark come from ``/proc/meminfo`` and
    the configuration unless given. A VM busy with another operation (its lock is
    held) or whose QMP socket does not answer at once is left alone until next time.
    """
    if available_mib is None or low_water_mib is None:
        facts = hostinfo.host_facts()
        available_mib = facts.memory_available_mib if available_mib is None else available_mib
        if low_water_mib is None:
            low_water_mib = config.low_water(facts.memory_total_mib)
    found = await _ballooned_vms(inventory, inventory.entries())
    vms = [vm for vm, _ in found]
    targets = balloon_targets(
        vms, available_mib, low_water_mib, max_percent=config.balloon_max_percent
    )
    sent: dict[str, int] = {}
    for vm, entry in found:
        target = targets[vm.name]
        if target != vm.current_mib and await _set_target(inventory, entry, target):
            sent[vm.name] = target
    if sent:
        log.info("memory: %d MiB available; balloon targets %s", available_mib, sent)
    return sent


async def _ballooned_vms(
    inventory: Inventory, entries: Iterable[VmEntry]
) -> list[tuple[BalloonVm, VmEntry]]:
    found = []
    for entry in entries:
        spec = entry.spec
        if spec is None or not spec.resources.balloon or spec.template:
            continue
        if process.running_pid(entry.paths) is None:
            continue
        try:
            async with _session(inventory, entry) as mon:
                actual = await mon.query_balloon()
        except (Busy, QemuError) as exc:
            log.debug("memory: vm %s left alone: %s", entry.name, exc)
            continue
        found.append((BalloonVm.of(spec, actual // MIB), entry))
    return found


async def _set_target(inventory: Inventory, entry: VmEntry, target_mib: int) -> bool:
    try:
        async with _session(inventory, entry) as mon:
            await mon.balloon(target_mib * MIB)
    except (Busy, QemuError) as exc:
        log.debug("memory: vm %s left alone: %s", entry.name, exc)
        return False
    return True


@asynccontextmanager
async def _session(inventory: Inventory, entry: VmEntry) -> AsyncIterator[Monitor]:
    """A QMP session with the VM unless it is busy: ``Busy`` or ``QemuError`` at once."""
    socket = entry.paths.qmp_socket
    async with (
        inventory.lock(entry.name, timeout=0),
        Monitor(entry.name, socket, connect_timeout=QMP_TIMEOUT_S) as mon,
    ):
        yield mon
