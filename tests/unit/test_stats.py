"""Performance statistics without QEMU: the parsers on fake ``/proc`` files, rates,
the real-time ring buffer, the 5-minute roll-ups, their files, the sampler's rounds,
the REST and Prometheus edges through FastAPI's TestClient, and the CLI locally."""

from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from prometheus_client.parser import text_string_to_metric_families
from starlette.exceptions import StarletteDeprecationWarning

from thinvisor.api.app import create_app
from thinvisor.auth import Role, UserStore
from thinvisor.cli.stats import size
from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import QemuError
from thinvisor.host import stats
from thinvisor.host.agent import HostAgent
from thinvisor.host.stats import (
    DAY_S,
    HOST_SERIES,
    ROLLUP_S,
    VM_SERIES,
    DayArchive,
    QmpFigures,
    RingBuffer,
    RollUp,
    RunningVm,
    Sources,
    StatsSampler,
)

from .clienv import host_env, tv

with warnings.catch_warnings():
    # Starlette prefers httpx2 to the httpx we pin; the test client works with either.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

TICKS = stats.CLOCK_TICKS
T0 = 1_800_000_000.0  # a multiple of 300: the start of a roll-up interval

# --- Fake /proc and /sys -----------------------------------------------------------------


class FakeProc:
    """The files the sampler reads, under ``tmp_path``."""

    def __init__(self, root: Path):
        self.sources = Sources(proc=root / "proc", sys=root / "sys")
        (root / "sys/kernel/mm/ksm").mkdir(parents=True)
        self.host(used=0, idle=0)
        self.net({})

    def write(self, relative: str, text: str, under: str = "proc") -> None:
        path = Path(getattr(self.sources, under)) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def host(self, *, used: int, idle: int, avail_kib: int = 1024, ksm: tuple[int, int] = (0, 0)):
        # user nice system idle iowait irq softirq steal guest guest_nice
        self.write("stat", f"cpu  {used} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1\ncpu1 1\nintr 5\n")
        self.write("meminfo", f"MemTotal: 4096 kB\nMemFree: 10 kB\nMemAvailable: {avail_kib} kB\n")
        self.write("kernel/mm/ksm/pages_sharing", f"{ksm[0]}\n", under="sys")
        self.write("kernel/mm/ksm/pages_shared", f"{ksm[1]}\n", under="sys")

    def process(
        self, pid: int, *, ticks: int, delays: dict[int, int], rss_kib: int = 2048,
        ksm_pages: int | None = None,
    ) -> None:  # fmt: skip
        fields = ["S", *["0"] * 10, str(ticks - ticks // 4), str(ticks // 4), *["0"] * 30]
        self.write(f"{pid}/stat", f"{pid} (qemu-system-x86 (x)) {' '.join(fields)}\n")
        self.write(f"{pid}/status", f"Name:\tqemu\nVmRSS:\t  {rss_kib} kB\nThreads:\t3\n")
        task_dir = Path(self.sources.proc) / str(pid) / "task"
        if task_dir.exists():
            for old in task_dir.iterdir():
                (old / "schedstat").unlink()
                old.rmdir()
        for tid, ns in delays.items():
            self.write(f"{pid}/task/{tid}/schedstat", f"123 {ns} 7\n")
        if ksm_pages is not None:
            self.write(f"{pid}/ksm_merging_pages", f"{ksm_pages}\n")

    def net(self, taps: dict[str, tuple[int, int, int, int]]) -> None:
        """Each TAP's rx bytes, rx packets, tx bytes, tx packets (the host's view)."""
        lines = [
            "Inter-|   Receive                            |  Transmit",
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...",
            "    lo:  10  1  0 0 0 0 0 0  10  1  0 0 0 0 0 0",
        ]
        for tap, (rb, rp, tb, tp) in taps.items():
            lines.append(f"{tap}: {rb} {rp} 0 0 0 0 0 0 {tb} {tp} 0 0 0 0 0 0")
        self.write("thread-self/net/dev", "\n".join(lines) + "\n")


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- Parsers -----------------------------------------------------------------------------


def test_process_cpu_ticks_despite_spaces_and_parentheses_in_the_name() -> None:
    stat = "42 (qemu (a) b) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100"
    assert stats.parse_process_cpu_ticks(stat) == 300


def test_schedstat_rss_and_ksm_stat() -> None:
    assert stats.parse_run_delay("5000 7000 12\n") == 7000
    assert stats.parse_rss("Name:\tqemu\nVmRSS:\t  1234 kB\n") == 1234 * 1024
    assert stats.parse_rss("Name:\tkthread\n") == 0
    ksm_stat = "ksm_rmap_items 10\nksm_zero_pages 0\nksm_merging_pages 33\nksm_mergeable: no\n"
    assert stats.parse_ksm_stat(ksm_stat) == 33
    assert stats.parse_ksm_stat("ksm_rmap_items 10\n") == 0


def test_host_cpu_and_memory() -> None:
    cpu = stats.parse_proc_stat(
        "cpu  10 2 3 100 5 1 1 4 7 0\ncpu0 5 1 1 50 2 0 0 2 3 0\ncpu1 5\nintr 99\nctxt 5\n"
    )
    # idle and iowait are not used; guest time is already in user and nice
    assert (cpu.used, cpu.total, cpu.cpus) == (21, 126, 2)
    mem = stats.parse_meminfo("MemTotal:  2048 kB\nMemAvailable: 1024 kB\nHugePages_Total: 4\n")
    assert mem == {"MemTotal": 2 << 20, "MemAvailable": 1 << 20, "HugePages_Total": 4}


def test_net_dev_and_the_guests_view_of_a_tap() -> None:
    text = (
        "Inter-|   Receive  |  Transmit\n face |bytes packets ...\n"
        "  tvab12: 1000 10 0 0 0 0 0 0 5000 50 0 0 0 0 0 0\n"
        "lo:7 1 0 0 0 0 0 0 7 1 0 0 0 0 0 0\n"
    )
    found = stats.parse_net_dev(text)
    assert found["tvab12"] == {
        "rx_bytes": 1000,
        "rx_packets": 10,
        "tx_bytes": 5000,
        "tx_packets": 50,
    }
    assert found["lo"]["rx_bytes"] == 7  # no space after the colon
    # What the TAP sent went to the guest.
    assert stats.guest_view(found["tvab12"]) == {
        "rx_bytes": 5000,
        "tx_bytes": 1000,
        "rx_packets": 50,
        "tx_packets": 10,
    }


def test_blockstats_by_guest_device() -> None:
    def entry(qdev: str, rd: int, **extra: str) -> dict[str, object]:
        counters = {"rd_bytes": rd, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4}
        return {"device": "", "qdev": qdev, "stats": counters, **extra}

    reply = [
        entry("/machine/peripheral/disk0/virtio-backend", 10, **{"node-name": "disk0-fmt"}),
        entry("cdrom0", 0),
        entry("", 5, device="ide0-hd0"),
    ]
    found = stats.parse_blockstats(reply)
    assert sorted(found) == ["cdrom0", "disk0", "ide0-hd0"]
    assert found["disk0"] == {"read_bytes": 10, "write_bytes": 2, "read_ops": 3, "write_ops": 4}


def test_rates() -> None:
    assert stats.rate(None, (10.0, 5.0)) is None
    assert stats.rate((0.0, 100.0), (20.0, 300.0)) == 10.0
    assert stats.rate((5.0, 1.0), (5.0, 2.0)) is None  # no time between
    assert stats.rate((0.0, 300.0), (20.0, 100.0)) is None  # a counter reset


def test_process_files(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.process(7, ticks=400, delays={7: 1000, 8: 2000}, rss_kib=100)
    counters = stats.read_process(fake.sources, 7)
    assert counters is not None
    assert counters.cpu_seconds == 400 / TICKS
    assert counters.run_delay_ns == {7: 1000, 8: 2000}
    assert counters.resident_bytes == 100 * 1024
    assert counters.ksm_bytes == 0  # neither ksm file: nothing merged
    fake.write("7/ksm_stat", "ksm_merging_pages 3\n")
    assert stats._ksm_pages(fake.sources.proc / "7") == 3
    fake.write("7/ksm_merging_pages", "5\n")  # preferred over ksm_stat
    counters = stats.read_process(fake.sources, 7)
    assert counters is not None and counters.ksm_bytes == 5 * stats.PAGE_SIZE
    assert stats.read_process(fake.sources, 8) is None  # gone


# --- Ring buffer and roll-ups ------------------------------------------------------------


def test_the_ring_buffer_keeps_an_hour_and_no_more_than_its_capacity() -> None:
    ring = RingBuffer(("a", "b"), capacity=181)
    for i in range(400):
        ring.add(T0 + 20 * i, [i, None])
    assert len(ring) == 180  # an hour of 20 s samples: older than an hour is dropped
    series = ring.series()
    assert series.timestamps[0] == T0 + 20 * 220 and series.timestamps[-1] == T0 + 20 * 399
    assert series.values["a"][-1] == 399 and set(series.values["b"]) == {None}
    small = RingBuffer(("a",), capacity=3)
    for i in range(10):
        small.add(T0 + i, [i])
    assert small.series().values["a"] == [7, 8, 9]


def test_rollups_average_each_five_minutes_and_skip_unknown_values() -> None:
    rollup = RollUp(("cpu", "disk"))
    for i in range(15):  # 20 s apart: 15 samples per interval
        rollup.add(T0 + 20 * i, [float(i), None if i % 2 else 10.0])
    rollup.add(T0 + 300, [100.0, None])
    rollup.add(T0 + 320, [50.0, None])
    series = rollup.series()
    assert series.timestamps == [T0, T0 + 300]
    assert series.values["cpu"] == [7.0, 75.0]  # the mean of 0..14, then of 100 and 50
    assert series.values["disk"] == [10.0, None]


def test_rollups_keep_a_day() -> None:
    rollup = RollUp(("x",))
    for i in range(300):  # 25 hours of 5-minute intervals
        rollup.add(T0 + ROLLUP_S * i, [1.0])
    series = rollup.series()
    assert len(series.timestamps) == DAY_S // ROLLUP_S
    assert series.timestamps[-1] == T0 + ROLLUP_S * 299


def test_rollups_survive_a_round_trip_through_json_by_name() -> None:
    rollup = RollUp(("a", "b"))
    rollup.add(T0, [1.0, 2.0])
    rollup.add(T0 + 10, [3.0, None])
    data = json.loads(json.dumps(rollup.to_json()))
    again = RollUp.from_json(("b", "new", "a"), data, T0 + 60)
    assert again.series().values == {"b": [2.0], "new": [None], "a": [2.0]}
    again.add(T0 + 20, [4.0, 1.0, 5.0])  # a half-filled interval goes on filling
    assert again.series().values == {"b": [3.0], "new": [1.0], "a": [3.0]}
    with pytest.raises(ValueError):
        RollUp.from_json(("a",), {**data, "step_s": 60}, T0)
    assert RollUp.from_json(("a",), data, T0 + DAY_S + ROLLUP_S).series().timestamps == []


def test_the_archive_writes_atomically_reads_back_and_prunes(tmp_path: Path) -> None:
    archive = DayArchive(tmp_path / "stats")
    rollup = RollUp(("a",))
    rollup.add(T0, [4.0])
    archive.save("host", rollup.to_json())
    archive.save("vm/web1", rollup.to_json())
    archive.save("vm/old", rollup.to_json())
    assert sorted(p.name for p in (tmp_path / "stats").rglob("*")) == [
        "host.json",
        "old.json",
        "vms",
        "web1.json",
    ]  # no temporary file left behind
    assert archive.load("vm/web1", ("a",), T0).series().values == {"a": [4.0]}
    assert archive.load("vm/nothing", ("a",), T0).series().timestamps == []
    archive.path("vm/web1").write_text("{garbage")
    assert archive.load("vm/web1", ("a",), T0).series().timestamps == []
    now = time.time()
    os.utime(archive.path("vm/old"), (now - DAY_S - 60, now - DAY_S - 60))
    assert archive.prune(now) == [archive.path("vm/old")]
    assert archive.path("host").exists()


# --- The sampler -------------------------------------------------------------------------

TAPS = {"net0": "tvaaa", "net1": "tvbbb"}
VM1 = RunningVm("vm1", 101, Path("/nonexistent/qmp1"), 256 << 20, TAPS)
VM2 = RunningVm("vm2", 202, Path("/nonexistent/qmp2"), 128 << 20)


def disks(rd: int, wr: int) -> dict[str, dict[str, int]]:
    return {"disk0": {"read_bytes": rd, "write_bytes": wr, "read_ops": rd // 512, "write_ops": 0}}


class FakeQmp:
    """Answers like QMP, with a VM that can be made to hang."""

    def __init__(self) -> None:
        self.disks: dict[str, dict[str, dict[str, int]]] = {"vm1": disks(0, 0), "vm2": {}}
        self.balloon: dict[str, int | None] = {"vm1": 200 << 20, "vm2": None}
        self.hang: set[str] = set()
        self.fail: set[str] = set()

    async def __call__(self, vm: RunningVm) -> QmpFigures:
        if vm.name in self.hang:
            await asyncio.sleep(30)
        if vm.name in self.fail:
            raise QemuError("busy")
        return QmpFigures(self.disks[vm.name], self.balloon[vm.name])


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def sampler_for(
    fake: FakeProc, clock: Clock, qmp: FakeQmp, vms: list[RunningVm], directory: Path | None
) -> StatsSampler:
    return StatsSampler(
        None,
        directory,
        interval_s=20,
        vms=lambda: list(vms),
        query=qmp,
        sources=fake.sources,
        clock=clock,
        qmp_timeout_s=0.2,
    )


def test_two_rounds_make_rates(fake: FakeProc) -> None:
    clock, qmp = Clock(), FakeQmp()
    sampler = sampler_for(fake, clock, qmp, [VM1, VM2], None)
    fake.host(used=1000, idle=1000, avail_kib=1024, ksm=(7, 3))
    fake.process(101, ticks=100, delays={101: 10**9, 102: 0})
    fake.process(202, ticks=0, delays={202: 0}, ksm_pages=4)
    fake.net({"tvaaa": (1000, 10, 2000, 20)})  # net1's TAP is not there
    asyncio.run(sampler.sample())
    first = sampler.latest_vms["vm1"]
    assert first.cpu_percent is None and first.cpu_seconds == 100 / TICKS
    assert first.cpu_ready_seconds == 1.0
    assert first.disk_read_bytes_per_s is None and first.net_rx_bytes_per_s is None

    clock.t += 20
    fake.host(used=1300, idle=1700, avail_kib=512, ksm=(7, 3))
    # Thread 102 ended; thread 103 is new: only what each thread grew by counts.
    fake.process(101, ticks=100 + 10 * TICKS, delays={101: 3 * 10**9, 103: 10**9})
    fake.process(202, ticks=TICKS, delays={202: 0}, ksm_pages=4)
    fake.net({"tvaaa": (1000 + 20 * 100, 10 + 20, 2000 + 20 * 300, 20 + 60)})
    qmp.disks["vm1"] = disks(20 * 4096, 20 * 512)
    asyncio.run(sampler.sample())
    vm1, vm2 = sampler.latest_vms["vm1"], sampler.latest_vms["vm2"]
    assert vm1.cpu_percent == pytest.approx(50.0)  # 10 s of CPU in 20 s
    assert vm1.cpu_ready_seconds == pytest.approx(4.0)
    assert vm1.cpu_ready_percent == pytest.approx(15.0)  # 3 s waited in 20 s
    assert vm1.memory_resident_bytes == 2048 * 1024
    assert vm1.memory_ballooned_bytes == 56 << 20
    assert vm1.disks["disk0"].read_bytes_per_s == 4096 and vm1.disk_write_bytes_per_s == 512
    assert vm1.disk_read_ops_per_s == 8
    assert set(vm1.nics) == {"net0"}
    # The guest received what the TAP transmitted.
    assert vm1.nics["net0"].rx_bytes == 8000 and vm1.net_rx_bytes_per_s == 300
    assert vm1.net_tx_bytes_per_s == 100 and vm1.net_tx_packets_per_s == 1
    assert vm2.cpu_percent == pytest.approx(5.0)
    assert vm2.memory_ballooned_bytes is None  # no balloon device
    assert vm2.memory_shared_bytes == 4 * stats.PAGE_SIZE
    assert vm2.disk_read_bytes_per_s == 0 and vm2.disks == {}
    host = sampler.latest_host
    assert host is not None
    assert host.cpu_percent == pytest.approx(30.0)  # 300 of 1000 ticks busy
    assert (host.memory_total_bytes, host.memory_available_bytes) == (4 << 20, 512 << 10)
    assert host.memory_used_bytes == (4 << 20) - (512 << 10)
    assert (host.ksm_pages_sharing, host.ksm_pages_shared) == (7, 3)
    assert host.memory_ballooned_bytes == 56 << 20 and host.vms_running == 2
    series = sampler.host_stats("realtime").series
    assert series.timestamps == [T0, T0 + 20]
    assert series.values["cpu_percent"] == [None, pytest.approx(30.0)]


def test_a_new_qemu_process_starts_its_rates_anew(fake: FakeProc) -> None:
    clock, qmp = Clock(), FakeQmp()
    vms = [VM2]
    sampler = sampler_for(fake, clock, qmp, vms, None)
    fake.process(202, ticks=50 * TICKS, delays={202: 0})
    asyncio.run(sampler.sample())
    clock.t += 20
    vms[0] = RunningVm("vm2", 303, VM2.qmp_socket, VM2.memory_bytes)
    fake.process(303, ticks=TICKS, delays={303: 0})
    asyncio.run(sampler.sample())
    assert sampler.latest_vms["vm2"].pid == 303
    assert sampler.latest_vms["vm2"].cpu_percent is None


def test_one_slow_or_busy_qmp_stalls_no_one(fake: FakeProc) -> None:
    clock, qmp = Clock(), FakeQmp()
    qmp.disks["vm2"] = disks(0, 0)
    sampler = sampler_for(fake, clock, qmp, [VM1, VM2], None)
    fake.process(101, ticks=0, delays={})
    fake.process(202, ticks=0, delays={})
    qmp.hang.add("vm1")
    started = time.monotonic()
    asyncio.run(sampler.sample())
    assert time.monotonic() - started < 5
    vm1, vm2 = sampler.latest_vms["vm1"], sampler.latest_vms["vm2"]
    assert not vm1.qmp and vm1.disks == {} and vm1.memory_ballooned_bytes is None
    assert vm1.memory_resident_bytes > 0  # what /proc says is there all the same
    assert vm2.qmp and set(vm2.disks) == {"disk0"}
    qmp.hang.clear()
    qmp.fail.add("vm2")
    clock.t += 20
    asyncio.run(sampler.sample())
    assert sampler.latest_vms["vm1"].qmp and not sampler.latest_vms["vm2"].qmp


def test_a_vm_that_stops_leaves_the_latest_samples(fake: FakeProc, tmp_path: Path) -> None:
    clock, qmp = Clock(), FakeQmp()
    vms = [VM1, VM2]
    sampler = sampler_for(fake, clock, qmp, vms, tmp_path / "stats")
    fake.process(101, ticks=0, delays={})
    fake.process(202, ticks=0, delays={})
    asyncio.run(sampler.sample())
    vms.pop()
    clock.t += 20
    asyncio.run(sampler.sample())
    assert set(sampler.latest_vms) == {"vm1"}
    # Its real-time history stays for the hour; its day went to disk.
    after = asyncio.run(sampler.vm_stats("vm2", "realtime"))
    assert after.latest is None and after.series.timestamps == [T0]
    assert (tmp_path / "stats/vms/vm2.json").exists()
    assert asyncio.run(sampler.vm_stats("vm2", "day")).series.timestamps == [T0]
    never = asyncio.run(sampler.vm_stats("other", "realtime"))
    assert never.latest is None and never.series.timestamps == []
    clock.t += stats.REALTIME_S + 20
    asyncio.run(sampler.sample())
    assert asyncio.run(sampler.vm_stats("vm2", "realtime")).series.timestamps == []


def test_day_rollups_are_written_and_read_back_by_the_next_agent(
    fake: FakeProc, tmp_path: Path
) -> None:
    directory = tmp_path / "stats"
    clock, qmp = Clock(), FakeQmp()

    def run_rounds(sampler: StatsSampler, count: int, ticks: int) -> int:
        for _ in range(count):
            fake.host(used=ticks, idle=ticks)
            fake.process(202, ticks=ticks, delays={})
            asyncio.run(sampler.sample())
            clock.t += 20
            ticks += 10 * TICKS  # half a core
        return ticks

    first = sampler_for(fake, clock, qmp, [VM2], directory)
    asyncio.run(first.load())
    ticks = run_rounds(first, 15, 0)  # one whole interval
    assert not (directory / "host.json").exists()  # written once the interval ends
    ticks = run_rounds(first, 1, ticks)
    assert (directory / "host.json").exists() and (directory / "vms/vm2.json").exists()
    ticks = run_rounds(first, 2, ticks)
    asyncio.run(first.close())  # the agent stops: the half-filled interval is written too

    second = sampler_for(fake, clock, qmp, [VM2], directory)
    asyncio.run(second.load())
    run_rounds(second, 2, ticks + 1000 * TICKS)
    day = asyncio.run(second.vm_stats("vm2", "day"))
    assert day.interval_s == ROLLUP_S
    assert day.series.timestamps == [T0, T0 + 300]
    assert day.series.values["cpu_percent"] == [pytest.approx(50.0), pytest.approx(50.0)]
    host_day = second.host_stats("day").series
    assert host_day.timestamps == [T0, T0 + 300]
    assert host_day.values["vms_running"] == [1.0, 1.0]
    assert set(host_day.values) == set(HOST_SERIES)
    assert set(day.series.values) == set(VM_SERIES)


def test_old_files_are_pruned_when_the_agent_starts(fake: FakeProc, tmp_path: Path) -> None:
    archive = DayArchive(tmp_path / "stats")
    old = RollUp(HOST_SERIES)
    old.add(T0 - DAY_S - 2 * ROLLUP_S, [1.0] * len(HOST_SERIES))
    archive.save("host", old.to_json())
    archive.save("vm/gone", old.to_json())
    a_day_ago = time.time() - DAY_S - 60
    os.utime(archive.path("vm/gone"), (a_day_ago, a_day_ago))
    sampler = sampler_for(fake, Clock(), FakeQmp(), [], tmp_path / "stats")
    asyncio.run(sampler.load())
    assert sampler.host_stats("day").series.timestamps == []
    assert not archive.path("vm/gone").exists()


# --- REST and Prometheus ---------------------------------------------------------------------

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ADMIN = ("admin", "password123")
READER = ("reader", "password123")


@pytest.fixture
def agent(tmp_path: Path, fake: FakeProc) -> Iterator[HostAgent]:
    local = tmp_path / "local"
    (local / "vm1").mkdir(parents=True)
    (local / "vm1" / "vm.toml").write_text('name = "vm1"\nmemory_mib = 256\n')
    config = HostConfig(
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        datastores=[DatastoreConfig(name="local", path=local)],
    )
    agent = HostAgent(config)
    agent.users = UserStore(config.state_dir / "users.json", hasher=FAST)
    agent.users.add_user(*ADMIN, Role.ADMIN)
    agent.users.add_user(*READER, Role.READ_ONLY)
    clock, qmp = Clock(), FakeQmp()
    agent.stats = sampler_for(fake, clock, qmp, [VM1], config.state_dir / "stats")
    fake.process(101, ticks=0, delays={101: 0})
    fake.net({"tvaaa": (0, 0, 0, 0)})
    asyncio.run(agent.stats.sample())
    clock.t += 20
    fake.host(used=500, idle=500)
    fake.process(101, ticks=18 * TICKS, delays={101: 10**9})
    fake.net({"tvaaa": (100, 1, 200, 2)})
    qmp.disks["vm1"] = disks(4096, 0)
    asyncio.run(agent.stats.sample())
    yield agent
    agent.events.close()


@pytest.fixture
def client(agent: HostAgent) -> Iterator[TestClient]:
    with TestClient(create_app(agent, start_agent=False)) as client:
        yield client


def test_vm_and_host_stats_over_rest(client: TestClient) -> None:
    vm = client.get("/api/v1/vms/vm1/stats", auth=READER)
    assert vm.status_code == 200, vm.text
    body = vm.json()
    assert (body["vm"], body["range"], body["interval_s"]) == ("vm1", "realtime", 20)
    assert body["latest"]["cpu_percent"] == pytest.approx(90.0)
    assert body["latest"]["disks"]["disk0"]["read_bytes"] == 4096
    assert body["series"]["timestamps"] == [T0, T0 + 20]
    assert body["series"]["values"]["cpu_percent"] == [None, pytest.approx(90.0)]
    day = client.get("/api/v1/vms/vm1/stats", params={"range": "day"}, auth=READER).json()
    assert (day["range"], day["interval_s"], day["series"]["timestamps"]) == ("day", 300, [T0])
    host = client.get("/api/v1/host/stats", auth=READER).json()
    assert host["latest"]["vms_running"] == 1 and host["latest"]["cpus"] == 2
    assert client.get("/api/v1/host/stats", params={"range": "day"}, auth=READER).status_code == 200


def test_rest_refusals(client: TestClient) -> None:
    assert client.get("/api/v1/vms/vm1/stats").status_code == 401
    assert client.get("/api/v1/host/stats").status_code == 401
    missing = client.get("/api/v1/vms/nope/stats", auth=READER)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    for path in ("/api/v1/vms/vm1/stats", "/api/v1/host/stats"):
        bad = client.get(path, params={"range": "week"}, auth=READER)
        assert bad.status_code == 422
        assert bad.json() == {
            "error": "invalid_argument",
            "message": "range: must be one of realtime, day, not 'week'",
        }


def test_prometheus_metrics(client: TestClient, agent: HostAgent) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    _, token = agent.users.create_token("reader", "prometheus")
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert client.get("/metrics", auth=READER).text == answer.text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }
    vm = (("vm", "vm1"),)
    dev = (("device", "disk0"), ("vm", "vm1"))
    nic = (("device", "net0"), ("vm", "vm1"))
    assert samples["thinvisor_vm_cpu_seconds_total", vm] == 18.0
    assert samples["thinvisor_vm_cpu_usage_ratio", vm] == pytest.approx(0.9)
    assert samples["thinvisor_vm_cpu_ready_seconds_total", vm] == 1.0
    assert samples["thinvisor_vm_memory_resident_bytes", vm] == 2048 * 1024
    assert samples["thinvisor_vm_memory_ballooned_bytes", vm] == 56 << 20
    assert samples["thinvisor_vm_disk_read_bytes_total", dev] == 4096
    assert samples["thinvisor_vm_network_receive_bytes_total", nic] == 200
    assert samples["thinvisor_vm_network_transmit_packets_total", nic] == 1
    assert samples["thinvisor_host_cpu_usage_ratio", ()] == pytest.approx(0.5)
    assert samples["thinvisor_host_vms_running", ()] == 1
    assert samples["thinvisor_host_memory_total_bytes", ()] == 4 << 20
    openmetrics = client.get(
        "/metrics", auth=READER, headers={"Accept": "application/openmetrics-text"}
    )
    assert openmetrics.text.endswith("# EOF\n")


def test_metrics_stay_out_of_the_api_schema(client: TestClient) -> None:
    schema = client.get("/api/v1/openapi.json").json()
    assert "/metrics" not in schema["paths"]
    ranges = schema["paths"]["/api/v1/vms/{vm}/stats"]["get"]["parameters"]
    assert any(p["name"] == "range" and p["schema"]["enum"] == ["realtime", "day"] for p in ranges)


# --- The CLI on the local host -----------------------------------------------------------


def test_cli_on_the_local_host(tmp_path: Path) -> None:
    env = host_env(tmp_path)
    assert tv(env, "vm", "stats", "ghost", code=1) == "error: vm 'ghost' does not exist\n"
    host = json.loads(tv(env, "host", "stats", "--json"))
    assert host["vms_running"] == 0 and host["cpus"] >= 1
    assert host["cpu_percent"] is not None  # measured over a second
    assert "memory" in tv(env, "host", "stats")


def test_sizes_for_people() -> None:
    assert [size(n) for n in (0, 512, 1536, 5 << 20, 3 << 40, 2 << 50)] == [
        "0 B",
        "512 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 TiB",
        "2048.0 TiB",
    ]
