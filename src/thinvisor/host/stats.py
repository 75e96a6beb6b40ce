"""Performance statistics of the host and its VMs, kept the way vCenter keeps them.

Every ``interval_s`` (20 s) the sampler reads the counters of the host and of every
running VM and turns them into a sample: rates between this reading and the last one,
and the gauges as they are. Samples are kept twice:

- real time: every sample of the last hour, in memory (vCenter's real-time charts);
- day: 5-minute averages of the last day (vCenter's daily charts), on disk under
  ``state_dir/stats/`` (``host.json``, ``vms/<name>.json``), written atomically when
  a 5-minute interval ends and when the agent stops, so that a restart keeps them.

Where the figures come from:

- a VM's CPU: ``/proc/<qemu pid>/stat`` (utime + stime of the whole process); its CPU
  ready: the ``run_delay`` of every thread (``/proc/<pid>/task/*/schedstat``), the time
  QEMU's threads waited runnable; its memory: ``VmRSS``, and the pages KSM merged
  (``ksm_merging_pages`` or ``ksm_stat``);
- a VM's disks and balloon: QMP ``query-blockstats`` and ``query-balloon``. QMP serves
  one client at a time, so a VM whose QMP is busy is sampled without these figures;
- a VM's NICs: the TAP's counters in ``/proc/thread-self/net/dev``, turned round (the
  TAP transmits what the guest receives). ``/sys/class/net`` would show the network
  namespace sysfs was mounted in, not the one the agent's VM networking lives in. NICs on
  QEMU's user network have no TAP and are left out;
- the host: ``/proc/stat``, ``/proc/meminfo`` and ``/sys/kernel/mm/ksm``.

Reading ``/proc`` happens in a worker thread; the QMP queries run concurrently, each
within a timeout, so that one slow VM stalls no other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from thinvisor.errors import QemuError
from thinvisor.fs import atomic_write
from thinvisor.host.engine import process
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.inventory import Inventory
from thinvisor.model.vm import USER_NETWORK
from thinvisor.network.netlink import tap_name

log = logging.getLogger(__name__)

INTERVAL_S = 20.0
REALTIME_S = 3600.0
ROLLUP_S = 300
DAY_S = 86400
QMP_CONNECT_TIMEOUT_S = 1.0
QMP_TIMEOUT_S = 3.0
QMP_CONCURRENCY = 8
PAGE_SIZE = os.sysconf("SC_PAGESIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FILE_VERSION = 1

StatsRange = Literal["realtime", "day"]
RANGES: tuple[str, ...] = get_args(StatsRange)

DISK_COUNTERS = ("read_bytes", "write_bytes", "read_ops", "write_ops")
NIC_COUNTERS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")

# What the series hold: the rates and gauges of a sample, not its raw counters.
VM_SERIES = (
    "cpu_percent",
    "cpu_ready_percent",
    "memory_resident_bytes",
    "memory_shared_bytes",
    "memory_ballooned_bytes",
    *(f"disk_{c}_per_s" for c in DISK_COUNTERS),
    *(f"net_{c}_per_s" for c in NIC_COUNTERS),
)
HOST_SERIES = (
    "cpu_percent",
    "memory_total_bytes",
    "memory_used_bytes",
    "memory_available_bytes",
    "ksm_pages_sharing",
    "ksm_pages_shared",
    "memory_ballooned_bytes",
    "vms_running",
)


# --- What the API serves ----------------------------------------------------------------


class DiskStats(BaseModel):
    """One disk's I/O: counters since QEMU started, and rates since the last sample."""

    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int
    read_bytes_per_s: float | None
    write_bytes_per_s: float | None
    read_ops_per_s: float | None
    write_ops_per_s: float | None


class NicStats(BaseModel):
    """One NIC's traffic as the guest sees it (rx: what the guest received)."""

    tap: str
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    rx_bytes_per_s: float | None
    tx_bytes_per_s: float | None
    rx_packets_per_s: float | None
    tx_packets_per_s: float | None


class VmSample(BaseModel):
    """One look at a running VM. Rates are None on the first look at a QEMU process;
    disk figures and the balloon are None when QMP did not answer in time."""

    time: float = Field(description="seconds since the epoch")
    pid: int
    cpu_seconds: float = Field(description="CPU time of the QEMU process (user + system)")
    cpu_percent: float | None = Field(description="percent of one host core")
    cpu_ready_seconds: float = Field(description="time QEMU's threads waited runnable")
    cpu_ready_percent: float | None = Field(description="percent of one host core")
    memory_resident_bytes: int
    memory_shared_bytes: int = Field(description="pages of the VM that KSM merged")
    memory_ballooned_bytes: int | None = Field(description="None without a balloon device")
    disk_read_bytes_per_s: float | None
    disk_write_bytes_per_s: float | None
    disk_read_ops_per_s: float | None
    disk_write_ops_per_s: float | None
    net_rx_bytes_per_s: float | None
    net_tx_bytes_per_s: float | None
    net_rx_packets_per_s: float | None
    net_tx_packets_per_s: float | None
    qmp: bool = Field(description="whether QMP answered (disk and balloon figures)")
    disks: dict[str, DiskStats]
    nics: dict[str, NicStats]


class HostSample(BaseModel):
    """One look at the host."""

    time: float = Field(description="seconds since the epoch")
    cpus: int
    cpu_percent: float | None = Field(description="percent of all the host's CPUs")
    memory_total_bytes: int
    memory_used_bytes: int
    memory_available_bytes: int
    ksm_pages_sharing: int
    ksm_pages_shared: int
    memory_ballooned_bytes: int = Field(description="the sum over the running VMs")
    vms_running: int


class Series(BaseModel):
    """Points in time and, for each figure, its value at each point (None: not known)."""

    timestamps: list[float] = Field(description="seconds since the epoch")
    values: dict[str, list[float | None]]


class VmStats(BaseModel):
    vm: str
    range: StatsRange
    interval_s: float = Field(description="seconds between two points of the series")
    latest: VmSample | None = Field(description="the last sample, None unless it runs")
    series: Series


class HostStats(BaseModel):
    range: StatsRange
    interval_s: float
    latest: HostSample | None
    series: Series


# --- Parsers (text in, numbers out) ------------------------------------------------------


def parse_process_cpu_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from ``/proc/<pid>/stat``."""
    # The command name is in parentheses and may hold spaces; fields 14 and 15 follow.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def parse_run_delay(schedstat: str) -> int:
    """Nanoseconds a thread waited runnable, from ``/proc/<pid>/task/<tid>/schedstat``."""
    return int(schedstat.split()[1])


def parse_rss(status: str) -> int:
    """``VmRSS`` in bytes, from ``/proc/<pid>/status``; 0 for a process without one."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def parse_ksm_stat(text: str) -> int:
    """``ksm_merging_pages`` from ``/proc/<pid>/ksm_stat``; 0 when it is not there."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "ksm_merging_pages":
            return int(value)
    return 0


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """Each interface's counters, from ``/proc/net/dev``, as the host sees them."""
    found: dict[str, dict[str, int]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 10:
            continue
        found[name.strip()] = {
            "rx_bytes": int(fields[0]),
            "rx_packets": int(fields[1]),
            "tx_bytes": int(fields[8]),
            "tx_packets": int(fields[9]),
        }
    return found


def guest_view(tap: dict[str, int]) -> dict[str, int]:
    """A TAP's counters turned round: what the TAP transmits, the guest receives."""
    return {
        "rx_bytes": tap["tx_bytes"],
        "tx_bytes": tap["rx_bytes"],
        "rx_packets": tap["tx_packets"],
        "tx_packets": tap["rx_packets"],
    }


@dataclass(frozen=True)
class CpuTimes:
    """The host's CPU time in clock ticks: busy, and everything."""

    used: int
    total: int
    cpus: int


def parse_proc_stat(text: str) -> CpuTimes:
    """The host's CPU times from ``/proc/stat``."""
    used = total = cpus = 0
    for line in text.splitlines():
        name, *values = line.split()
        if name == "cpu":
            # user nice system idle iowait irq softirq steal (guest time is in user/nice)
            ticks = [int(v) for v in values[:8]] + [0] * (8 - len(values[:8]))
            idle = ticks[3] + ticks[4]
            total = sum(ticks)
            used = total - idle
        elif name.startswith("cpu") and name[3:].isdigit():
            cpus += 1
    return CpuTimes(used, total, cpus)


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def block_device_name(entry: dict[str, Any]) -> str:
    """The guest device a ``query-blockstats`` entry belongs to: ``disk0``, ``cdrom0``."""
    qdev = str(entry.get("qdev") or "")
    if qdev.startswith("/machine/peripheral/"):
        return qdev.split("/")[3]  # /machine/peripheral/disk0/virtio-backend
    if qdev and "/" not in qdev:
        return qdev
    return str(entry.get("device") or entry.get("node-name") or qdev or "unknown")


def parse_blockstats(reply: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Each guest block device's counters from a ``query-blockstats`` reply."""
    found: dict[str, dict[str, int]] = {}
    for entry in reply:
        stats = entry.get("stats") or {}
        found[block_device_name(entry)] = {
            "read_bytes": int(stats.get("rd_bytes", 0)),
            "write_bytes": int(stats.get("wr_bytes", 0)),
            "read_ops": int(stats.get("rd_operations", 0)),
            "write_ops": int(stats.get("wr_operations", 0)),
        }
    return found


def rate(before: tuple[float, float] | None, now: tuple[float, float]) -> float | None:
    """Change per second between two (time, counter) readings; None without an earlier
    reading, without time between them, or when the counter went back (a reset)."""
    if before is None:
        return None
    dt, dv = now[0] - before[0], now[1] - before[1]
    if dt <= 0 or dv < 0:
        return None
    return dv / dt


# --- Reading /proc and /sys (blocking) ---------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """Where ``/proc`` and ``/sys`` are (tests give fake ones)."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")


@dataclass(frozen=True)
class ProcessCounters:
    cpu_seconds: float
    run_delay_ns: dict[int, int]  # per thread id
    resident_bytes: int
    ksm_bytes: int


@dataclass(frozen=True)
class HostCounters:
    cpu: CpuTimes
    memory: dict[str, int]
    ksm_pages_sharing: int
    ksm_pages_shared: int


def read_process(sources: Sources, pid: int) -> ProcessCounters | None:
    """A QEMU process's counters; None when it is gone."""
    base = sources.proc / str(pid)
    try:
        ticks = parse_process_cpu_ticks((base / "stat").read_text())
        rss = parse_rss((base / "status").read_text())
    except (OSError, ValueError, IndexError):
        return None
    delays: dict[int, int] = {}
    try:
        tasks = list((base / "task").iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        try:
            delays[int(task.name)] = parse_run_delay((task / "schedstat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # the thread ended, or the kernel keeps no schedstat
    return ProcessCounters(ticks / CLOCK_TICKS, delays, rss, _ksm_pages(base) * PAGE_SIZE)


def _ksm_pages(base: Path) -> int:
    try:
        return int((base / "ksm_merging_pages").read_text())
    except (OSError, ValueError):
        pass
    try:
        return parse_ksm_stat((base / "ksm_stat").read_text())
    except (OSError, ValueError):
        return 0


def read_host(sources: Sources) -> HostCounters:
    ksm = sources.sys / "kernel/mm/ksm"
    return HostCounters(
        cpu=parse_proc_stat((sources.proc / "stat").read_text()),
        memory=parse_meminfo((sources.proc / "meminfo").read_text()),
        ksm_pages_sharing=_read_int(ksm / "pages_sharing"),
        ksm_pages_shared=_read_int(ksm / "pages_shared"),
    )


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def read_net_dev(sources: Sources) -> dict[str, dict[str, int]]:
    """The counters of the interfaces in this thread's network namespace."""
    for name in ("thread-self/net/dev", "net/dev"):
        try:
            return parse_net_dev((sources.proc / name).read_text())
        except OSError:
            continue
    return {}


# --- Which VMs run, and what QMP says of them ---------------------------------------------


@dataclass(frozen=True)
class RunningVm:
    name: str
    pid: int
    qmp_socket: Path
    memory_bytes: int
    taps: dict[str, str] = field(default_factory=dict)  # NIC name -> TAP device


def running_vms(inventory: Inventory) -> list[RunningVm]:
    """Every VM whose QEMU runs now (blocking: pidfiles and the cached ``vm.toml``)."""
    found: list[RunningVm] = []
    for name, paths in inventory.registered():
        pid = process.running_pid(paths)
        if pid is None:
            continue
        entry = inventory.find(name)
        spec = entry.spec if entry is not None else None
        if spec is None:
            found.append(RunningVm(name, pid, paths.qmp_socket, 0))
            continue
        taps = {n.name: tap_name(spec.uuid, n.name) for n in spec.nics if n.network != USER_NETWORK}
        found.append(RunningVm(name, pid, paths.qmp_socket, spec.memory_mib << 20, taps))
    return found


@dataclass(frozen=True)
class QmpFigures:
    disks: dict[str, dict[str, int]]
    balloon_actual: int | None  # bytes; None without a balloon device


async def query_qmp(vm: RunningVm) -> QmpFigures:
    """A VM's block counters and balloon, in one short QMP session."""
    async with Monitor(vm.name, vm.qmp_socket, connect_timeout=QMP_CONNECT_TIMEOUT_S) as mon:
        disks = parse_blockstats(await mon.block_stats())
        actual = await mon.balloon_actual()
    return QmpFigures(disks, actual)


Query = Callable[[RunningVm], Awaitable[QmpFigures]]


# --- Keeping samples ---------------------------------------------------------------------

Values = Sequence[float | None]


class RingBuffer:
    """The samples of the last ``span_s`` seconds, never more than ``capacity``."""

    def __init__(self, names: Sequence[str], capacity: int, span_s: float = REALTIME_S):
        self.names = tuple(names)
        self.span_s = span_s
        self._points: deque[tuple[float, tuple[float | None, ...]]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._points)

    def add(self, t: float, values: Values) -> None:
        self._points.append((t, tuple(values)))
        while self._points and self._points[0][0] <= t - self.span_s:
            self._points.popleft()

    def newest(self) -> float | None:
        return self._points[-1][0] if self._points else None

    def series(self) -> Series:
        points = list(self._points)
        return Series(
            timestamps=[t for t, _ in points],
            values={n: [v[i] for _, v in points] for i, n in enumerate(self.names)},
        )


class RollUp:
    """Averages over ``step_s`` intervals for ``span_s``: each interval keeps a sum and a
    count per figure, so that a half-filled one goes on filling after a restart."""

    def __init__(self, names: Sequence[str], step_s: int = ROLLUP_S, span_s: int = DAY_S):
        self.names = tuple(names)
        self.step_s = step_s
        self.span_s = span_s
        self.buckets: dict[int, tuple[list[float], list[int]]] = {}
        self.dirty = False

    def bucket_of(self, t: float) -> int:
        return int(t // self.step_s) * self.step_s

    def add(self, t: float, values: Values) -> None:
        start = self.bucket_of(t)
        if start not in self.buckets:
            self.buckets[start] = ([0.0] * len(self.names), [0] * len(self.names))
            self.prune(t)
        sums, counts = self.buckets[start]
        for i, value in enumerate(values):
            if value is not None:
                sums[i] += value
                counts[i] += 1
        self.dirty = True

    def prune(self, now: float) -> None:
        """Forget the intervals that began ``span_s`` or more before ``now``."""
        for start in [s for s in self.buckets if s <= now - self.span_s]:
            del self.buckets[start]

    def series(self) -> Series:
        starts = sorted(self.buckets)
        values: dict[str, list[float | None]] = {n: [] for n in self.names}
        for start in starts:
            sums, counts = self.buckets[start]
            for i, name in enumerate(self.names):
                values[name].append(sums[i] / counts[i] if counts[i] else None)
        return Series(timestamps=[float(s) for s in starts], values=values)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FILE_VERSION,
            "step_s": self.step_s,
            "metrics": list(self.names),
            "buckets": [[s, *self.buckets[s]] for s in sorted(self.buckets)],
        }

    @classmethod
    def from_json(cls, names: Sequence[str], data: dict[str, Any], now: float) -> RollUp:
        """A roll-up from its file's content; figures are matched by name, so figures
        added or removed since it was written do no harm."""
        rollup = cls(names)
        if data.get("version") != FILE_VERSION or data.get("step_s") != rollup.step_s:
            raise ValueError("not a roll-up of this version")
        index = {name: i for i, name in enumerate(data["metrics"])}
        for start, sums, counts in data["buckets"]:
            rollup.buckets[int(start)] = (
                [float(sums[index[n]]) if n in index else 0.0 for n in rollup.names],
                [int(counts[index[n]]) if n in index else 0 for n in rollup.names],
            )
        rollup.prune(now)
        return rollup


class DayArchive:
    """The day roll-ups on disk: ``host.json`` and ``vms/<name>.json``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, key: str) -> Path:
        if key == "host":
            return self.directory / "host.json"
        return self.directory / "vms" / f"{key.removeprefix('vm/')}.json"

    def load(self, key: str, names: Sequence[str], now: float) -> RollUp:
        """What was kept for ``key``; an empty roll-up when nothing (or garbage) was."""
        path = self.path(key)
        try:
            return RollUp.from_json(names, json.loads(path.read_text()), now)
        except FileNotFoundError:
            return RollUp(names)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("statistics in %s cannot be read (%s); starting afresh", path, exc)
            return RollUp(names)

    def save(self, key: str, data: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, json.dumps(data, separators=(",", ":")), mode=0o600)

    def prune(self, now: float | None = None) -> list[Path]:
        """Remove the files of VMs not seen for a day (all they hold is too old), by
        their modification time against ``now`` (the real time by default)."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        try:
            files = list((self.directory / "vms").glob("*.json"))
        except OSError:
            return removed
        for path in files:
            try:
                if path.stat().st_mtime < now - DAY_S:
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
        return removed


# --- The sampler -------------------------------------------------------------------------


class _Track:
    """The last reading of each counter of one QEMU process, to compute rates."""

    def __init__(self, pid: int):
        self.pid = pid
        self.points: dict[str, tuple[float, float]] = {}
        self.delays: dict[int, int] | None = None
        self.ready_seconds = 0.0

    def rate(self, key: str, t: float, value: float) -> float | None:
        before = self.points.get(key)
        self.points[key] = (t, value)
        return rate(before, (t, value))

    def ready(self, delays: dict[int, int]) -> float:
        """Seconds QEMU's threads waited runnable, all its threads so far: the threads
        that ended took their run_delay with them, so only each thread's growth counts."""
        if self.delays is None:
            self.ready_seconds = sum(delays.values()) / 1e9
        else:
            grown = sum(max(0, ns - self.delays.get(tid, 0)) for tid, ns in delays.items())
            self.ready_seconds += grown / 1e9
        self.delays = delays
        return self.ready_seconds


@dataclass
class _VmHistory:
    realtime: RingBuffer
    day: RollUp | None = None
    track: _Track | None = None


@dataclass(frozen=True)
class _Reading:
    """What one round read in the worker thread."""

    host: HostCounters
    vms: list[tuple[RunningVm, ProcessCounters]]
    nets: dict[str, dict[str, int]]
    loaded: dict[str, RollUp]  # day roll-ups of VMs seen for the first time


class StatsSampler:
    """Samples the host and its running VMs every ``interval_s`` and keeps the samples.

    ``vms`` lists the running VMs and ``query`` asks QMP about one (blocking and async
    respectively; tests pass plain functions). ``directory`` None keeps nothing on disk.
    """

    def __init__(
        self,
        inventory: Inventory | None,
        directory: Path | None,
        *,
        interval_s: float | None = None,
        vms: Callable[[], list[RunningVm]] | None = None,
        query: Query = query_qmp,
        sources: Sources | None = None,
        clock: Callable[[], float] = time.time,
        qmp_timeout_s: float = QMP_TIMEOUT_S,
    ):
        if vms is None:
            if inventory is None:
                raise ValueError("give an inventory or a way to list the running VMs")
            vms = partial(running_vms, inventory)
        self.interval_s = interval_s if interval_s is not None else INTERVAL_S
        self.capacity = math.ceil(REALTIME_S / self.interval_s) + 1
        self.archive = DayArchive(directory) if directory is not None else None
        self.qmp_timeout_s = qmp_timeout_s
        self._list_vms = vms
        self._query = query
        self._sources = sources or Sources()
        self._clock = clock
        self.host_realtime = RingBuffer(HOST_SERIES, self.capacity)
        self.host_day = RollUp(HOST_SERIES)
        self.latest_host: HostSample | None = None
        self.latest_vms: dict[str, VmSample] = {}
        self._vms: dict[str, _VmHistory] = {}
        self._host_cpu: CpuTimes | None = None
        self._saved_bucket: int | None = None
        self._loaded = False

    # Running

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled."""
        await self.load()
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            try:
                await self.sample()
            except Exception:
                log.exception("sampling statistics failed")
            next_round += self.interval_s
            # A round that overran its interval is not made up for: the next starts now.
            next_round = max(next_round, loop.time())
            await asyncio.sleep(next_round - loop.time())

    async def load(self) -> None:
        """Read the host's day roll-up back and prune what is too old."""
        if self.archive is not None and not self._loaded:
            now = self._clock()
            archive = self.archive
            self.host_day = await asyncio.to_thread(archive.load, "host", HOST_SERIES, now)
            await asyncio.to_thread(archive.prune)
            self._saved_bucket = self.host_day.bucket_of(now)
        self._loaded = True

    async def close(self) -> None:
        """Write every day roll-up not yet on disk (the agent stops)."""
        if self._loaded:
            await self._save(self._clock(), None)

    async def sample(self) -> None:
        """One round: read, query, compute, keep."""
        now = self._clock()
        reading = await asyncio.to_thread(self._read, now)
        figures = await self._query_all([vm for vm, _ in reading.vms])
        samples: dict[str, VmSample] = {}
        for vm, counters in reading.vms:
            history = self._history(vm.name, reading.loaded)
            samples[vm.name] = self._vm_sample(history, vm, now, counters, reading.nets, figures)
            self._keep(history.realtime, history.day, now, samples[vm.name], VM_SERIES)
        stopped = [name for name in self.latest_vms if name not in samples]
        for name in stopped:
            self._vms[name].track = None
        self.latest_vms = samples
        self.latest_host = self._host_sample(now, reading.host, samples)
        self._keep(self.host_realtime, self.host_day, now, self.latest_host, HOST_SERIES)
        self._forget_old(now)
        await self._save_if_due(now, stopped)

    def _read(self, now: float) -> _Reading:
        vms = [(vm, c) for vm in self._list_vms() if (c := read_process(self._sources, vm.pid))]
        loaded: dict[str, RollUp] = {}
        if self.archive is not None:
            for vm, _ in vms:
                known = self._vms.get(vm.name)
                if known is None or known.day is None:
                    loaded[vm.name] = self.archive.load(f"vm/{vm.name}", VM_SERIES, now)
        nets = read_net_dev(self._sources) if any(vm.taps for vm, _ in vms) else {}
        return _Reading(read_host(self._sources), vms, nets, loaded)

    async def _query_all(self, vms: list[RunningVm]) -> dict[str, QmpFigures | None]:
        limit = asyncio.Semaphore(QMP_CONCURRENCY)

        async def one(vm: RunningVm) -> QmpFigures | None:
            async with limit:
                try:
                    return await asyncio.wait_for(self._query(vm), self.qmp_timeout_s)
                except (QemuError, TimeoutError) as exc:
                    log.debug("vm %s: sampled without QMP figures: %s", vm.name, exc)
                    return None

        answers = await asyncio.gather(*(one(vm) for vm in vms))
        return {vm.name: answer for vm, answer in zip(vms, answers, strict=True)}

    def _history(self, name: str, loaded: dict[str, RollUp]) -> _VmHistory:
        history = self._vms.get(name)
        if history is None:
            history = self._vms[name] = _VmHistory(RingBuffer(VM_SERIES, self.capacity))
        if history.day is None:
            history.day = loaded.get(name) or RollUp(VM_SERIES)
        return history

    @staticmethod
    def _keep(
        ring: RingBuffer, day: RollUp | None, t: float, sample: BaseModel, names: Sequence[str]
    ) -> None:
        values = [_number(getattr(sample, n)) for n in names]
        ring.add(t, values)
        if day is not None:
            day.add(t, values)

    # Computing samples

    def _vm_sample(
        self,
        history: _VmHistory,
        vm: RunningVm,
        now: float,
        counters: ProcessCounters,
        nets: dict[str, dict[str, int]],
        figures: dict[str, QmpFigures | None],
    ) -> VmSample:
        if history.track is None or history.track.pid != vm.pid:
            history.track = _Track(vm.pid)  # a new QEMU process: its counters start anew
        track = history.track
        ready = track.ready(counters.run_delay_ns)
        answer = figures.get(vm.name)
        disks = _disks(track, now, answer.disks) if answer is not None else {}
        nics = _nics(track, now, vm.taps, nets)
        ballooned = None
        if answer is not None and answer.balloon_actual is not None and vm.memory_bytes:
            ballooned = max(0, vm.memory_bytes - answer.balloon_actual)
        cpu_rate = track.rate("cpu", now, counters.cpu_seconds)
        ready_rate = track.rate("ready", now, ready)
        return VmSample(
            time=now,
            pid=vm.pid,
            cpu_seconds=counters.cpu_seconds,
            cpu_percent=_percent(cpu_rate),
            cpu_ready_seconds=ready,
            cpu_ready_percent=_percent(ready_rate),
            memory_resident_bytes=counters.resident_bytes,
            memory_shared_bytes=counters.ksm_bytes,
            memory_ballooned_bytes=ballooned,
            **_totals("disk", DISK_COUNTERS, disks if answer is not None else None),
            **_totals("net", NIC_COUNTERS, nics),
            qmp=answer is not None,
            disks=disks,
            nics=nics,
        )

    def _host_sample(self, now: float, host: HostCounters, vms: dict[str, VmSample]) -> HostSample:
        cpu, before = host.cpu, self._host_cpu
        self._host_cpu = cpu
        percent = None
        if before is not None and cpu.total > before.total and cpu.used >= before.used:
            percent = 100.0 * (cpu.used - before.used) / (cpu.total - before.total)
        total = host.memory.get("MemTotal", 0)
        available = host.memory.get("MemAvailable", host.memory.get("MemFree", 0))
        return HostSample(
            time=now,
            cpus=cpu.cpus,
            cpu_percent=percent,
            memory_total_bytes=total,
            memory_used_bytes=max(0, total - available),
            memory_available_bytes=available,
            ksm_pages_sharing=host.ksm_pages_sharing,
            ksm_pages_shared=host.ksm_pages_shared,
            memory_ballooned_bytes=sum(v.memory_ballooned_bytes or 0 for v in vms.values()),
            vms_running=len(vms),
        )

    # Keeping and forgetting

    def _forget_old(self, now: float) -> None:
        """Drop the real-time history of VMs not seen for an hour (their day stays on disk)."""
        for name, history in list(self._vms.items()):
            newest = history.realtime.newest()
            old = newest is None or newest <= now - REALTIME_S
            saved = history.day is None or not history.day.dirty
            if history.track is None and old and saved:
                del self._vms[name]

    async def _save_if_due(self, now: float, stopped: list[str]) -> None:
        if self.archive is None:
            return
        bucket = self.host_day.bucket_of(now)
        if bucket != self._saved_bucket or stopped:
            await self._save(now, stopped if bucket == self._saved_bucket else None)
            self._saved_bucket = bucket

    async def _save(self, now: float, stopped: list[str] | None) -> None:
        """Write the changed roll-ups: all of them, or (``stopped`` given) only those of
        the VMs that stopped. Roll-ups of VMs not running leave memory once written."""
        if self.archive is None:
            return
        keys: dict[str, RollUp] = {}
        if stopped is None:
            keys["host"] = self.host_day
        for name, history in self._vms.items():
            if history.day is not None and (stopped is None or name in stopped):
                keys[f"vm/{name}"] = history.day
        batch = []
        for key, rollup in keys.items():
            if rollup.dirty:
                rollup.prune(now)
                rollup.dirty = False
                batch.append((key, rollup.to_json()))
        for history in self._vms.values():
            if history.track is None:
                history.day = None
        archive = self.archive

        def write() -> None:
            for key, data in batch:
                try:
                    archive.save(key, data)
                except OSError as exc:
                    log.warning("statistics for %s not saved: %s", key, exc)
            if stopped is None:
                archive.prune()

        await asyncio.to_thread(write)

    # Serving

    def host_stats(self, range_: StatsRange) -> HostStats:
        if range_ == "day":
            return HostStats(
                range=range_,
                interval_s=ROLLUP_S,
                latest=self.latest_host,
                series=self.host_day.series(),
            )
        return HostStats(
            range=range_,
            interval_s=self.interval_s,
            latest=self.latest_host,
            series=self.host_realtime.series(),
        )

    async def vm_stats(self, name: str, range_: StatsRange) -> VmStats:
        """A VM's statistics; a VM that never ran has empty series."""
        history = self._vms.get(name)
        latest = self.latest_vms.get(name)
        if range_ == "realtime":
            ring = history.realtime if history else RingBuffer(VM_SERIES, 1)
            return VmStats(
                vm=name,
                range=range_,
                interval_s=self.interval_s,
                latest=latest,
                series=ring.series(),
            )
        day = history.day if history is not None else None
        if day is None:
            day = await self._load_day(name)
        return VmStats(
            vm=name, range=range_, interval_s=ROLLUP_S, latest=latest, series=day.series()
        )

    async def _load_day(self, name: str) -> RollUp:
        if self.archive is None:
            return RollUp(VM_SERIES)
        return await asyncio.to_thread(self.archive.load, f"vm/{name}", VM_SERIES, self._clock())


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _percent(per_s: float | None) -> float | None:
    return None if per_s is None else 100.0 * per_s


def _disks(track: _Track, t: float, disks: dict[str, dict[str, int]]) -> dict[str, DiskStats]:
    return {
        name: DiskStats(**counters, **_rates(track, f"disk:{name}", t, counters))
        for name, counters in disks.items()
    }


def _nics(
    track: _Track, t: float, taps: dict[str, str], nets: dict[str, dict[str, int]]
) -> dict[str, NicStats]:
    found: dict[str, NicStats] = {}
    for nic, tap in taps.items():
        if tap not in nets:
            continue  # the TAP is not (yet, or no longer) there
        counters = guest_view(nets[tap])
        found[nic] = NicStats(tap=tap, **counters, **_rates(track, f"nic:{nic}", t, counters))
    return found


def _rates(track: _Track, prefix: str, t: float, counters: dict[str, int]) -> dict[str, Any]:
    return {f"{k}_per_s": track.rate(f"{prefix}:{k}", t, v) for k, v in counters.items()}


def _totals(
    prefix: str, counters: Sequence[str], devices: dict[str, DiskStats] | dict[str, NicStats] | None
) -> dict[str, float | None]:
    """The rates of all devices added up; None when any is unknown (or ``devices`` is)."""
    totals: dict[str, float | None] = {}
    for counter in counters:
        key = f"{counter}_per_s"
        if devices is None:
            totals[f"{prefix}_{key}"] = None
            continue
        rates = [getattr(d, key) for d in devices.values()]
        known = None not in rates
        totals[f"{prefix}_{key}"] = sum(r for r in rates if r is not None) if known else None
    return totals
