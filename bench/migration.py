"""Live migration: the downtime and the total time of moving a running appliance VM from
one process to another on this machine, idle and busy, thinvisor against QEMU by hand.

The same guest for every contender (256 MiB, one vCPU, q35, headless, a 32 MiB disk),
moved back and forth, one move per round:

- qemu: two QEMU processes started by hand with the command line thinvisor builds for
  the VM (the destination with ``-incoming defer``), both opening one disk image, moved
  over QMP as one does by hand: ``migrate-incoming`` on a loopback TCP port, ``migrate``
  with the same downtime limit, auto-converge and bandwidth as thinvisor's;
- thinvisor: two host agents on loopback, each with its own datastore and a datastore
  directory both see; the VM on the shared one, moved as the center moves it, over REST:
  a ticket from the destination (``POST /migrations/incoming``), then ``POST
  /vms/{name}/migrate`` on the source and its task followed to the end;
- thinvisor (mirror): the same, the VM on the source's own datastore: its disk is
  mirrored to the destination's while the memory moves.

Busy: before each move the guest starts rewriting a 32 MiB file of random bytes in its
tmpfs, over and over (random, not zeros: QEMU sends a zero page as a flag only), and
stops once it has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from bench.harness import DEFAULT_WARMUP, Comparison, Round, alternate, wait_until
from bench.hosts import ThinvisorHost, free_port, gone, ready_uptime
from bench.raw_qemu import RawQemu
from thinvisor.config import HostConfig, load_config
from thinvisor.console.serial import SerialConsole
from thinvisor.errors import QemuError
from thinvisor.host.engine.paths import VmPaths
from thinvisor.host.engine.process import kill
from thinvisor.host.inventory import Inventory
from thinvisor.host.migration import UNLIMITED_BYTES_S
from thinvisor.model.vm import VmSpec

VM = "migrate"
MIRROR_VM = "migrate-mirror"
MEMORY_MIB = 256
DISK_MIB = 32
DOWNTIME_MS = 300
SERIAL = "serial0"
LOADS = ("idle", "busy")
THINVISOR = "thinvisor"
MIRROR = "thinvisor (mirror)"
QEMU = "qemu"
QEMU_GUEST = "qemu (STOP to RESUME)"
READY_TIMEOUT_S = 120.0
MOVE_TIMEOUT_S = 120.0
QMP_POLL_S = 0.005
TASK_POLL_S = 0.02  # the center's first poll interval
# A thinvisor move's last progress messages: the memory has been sent.
FINISHING = ("switching over", "cleaning up the source")
PHASES = {
    "prepare": "connecting and starting the destination's QEMU",
    "mirror": "mirroring the disk",
    "memory": "sending the memory",
    "finish": "switch-over and clean-up",
}
CONSOLE_TIMEOUT_S = 60.0
MIB = 1 << 20

# The busy guest: a working set of random bytes rewritten in place, again and again.
LOAD_MIB = 32
LOAD_SETTLE_S = 1.0  # the load runs this long before the move starts
LOAD_SETUP = f"[ -e /tmp/src ] || dd if=/dev/urandom of=/tmp/src bs=1M count={LOAD_MIB} 2>/dev/null"
LOAD_START = (
    "rm -f /tmp/stop /tmp/passes; touch /tmp/loading; (i=0; while [ ! -e /tmp/stop ]; do "
    "dd if=/tmp/src of=/tmp/x bs=1M conv=notrunc 2>/dev/null; i=$((i+1)); "
    "echo $i >/tmp/passes; done; rm -f /tmp/stop /tmp/loading) >/dev/null 2>&1 & true"
)
LOAD_PASSES = "cat /tmp/passes 2>/dev/null || echo 0"
# Waits until the loop has ended, so that the next round starts from a quiet guest (a
# guest that rebooted meanwhile has no loop to wait for).
LOAD_STOP = (
    "[ ! -e /tmp/loading ] || { touch /tmp/stop; while [ -e /tmp/loading ]; do sleep 0.1; done; }"
)
UPTIME = "cut -d' ' -f1 /proc/uptime"
#: How long a guest may take to answer after a move before it counts as crashed.
CHECK_TIMEOUT_S = 20.0
#: Moves tried per round when the guest crashes after one (it is then moved again).
MOVES_PER_ROUND = 2

METRICS = {
    "downtime": ("downtime", "ms"),
    "total": ("total time", "ms"),
    "wall": ("end to end", "ms"),
    "stream": ("memory stream sent", "MiB"),
    "load": ("the guest's write rate before the move (the control)", "MiB/s"),
}
NOTES = {
    "downtime": [
        "qemu: query-migrate's downtime on the source (from stopping the guest to the "
        "last byte sent); qemu (STOP to RESUME): the same moves, from the source's STOP "
        "event to the destination's RESUME event (QEMU stamps both with the host's "
        "clock): the time the guest really stood still",
        "thinvisor: the task's downtime_ms, QEMU's figure plus the switch-over until the "
        "destination agent has taken the VM and let it run: to be read against qemu "
        "(STOP to RESUME)",
        f"both allow {DOWNTIME_MS} ms; thinvisor starts at a quarter of it and raises the "
        "limit step by step when copying stalls",
        "thinvisor copies the memory live only where that is safe: with KVM, or with QEMU "
        "9.0 or later. QEMU before 9.0 emulating the CPU (TCG) can lose a guest's writes "
        "between passes (QEMU commit 03bfc2188f), and the guest then crashes at the "
        "destination; there thinvisor pauses the guest for the whole copy, and its downtime "
        "is the copy's time. QEMU by hand copies live, and its crashes are counted below",
    ],
    "total": [
        "qemu: from the migrate command until the source says completed and the "
        "destination runs (its RESUME event); the destination QEMU was started before",
        "thinvisor: the task's total_ms, from the source's check to its QEMU ended: "
        "the destination's QEMU start, the channels over TLS and the clean-up included",
    ],
    "wall": [
        "qemu: from spawning the destination QEMU until the source QEMU has exited; "
        "thinvisor: from POST /migrations/incoming until GET /tasks/{id} says success "
        f"(polled every {TASK_POLL_S * 1000:.0f} ms)",
    ],
    "stream": [
        "qemu: query-migrate's ram.transferred; thinvisor: the task's memory_bytes "
        "(QEMU's whole migration stream, device state included)",
    ],
    "load": [
        f"busy: the guest rewrites {LOAD_MIB} MiB of random bytes in its tmpfs in a loop; "
        f"passes counted over the {LOAD_SETTLE_S:g} s before the move",
    ],
}

Log = Callable[[str], None]


def run(log: Log, rounds: int) -> list[dict[str, Any]]:
    """Move each contender's VM back and forth, idle then busy, ``rounds`` times each
    after a warm-up; nothing is left running afterwards."""
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        movers = set_up(stack, log)
        for load in LOADS:
            log(f"migration, {load}: {', '.join(movers)}; {rounds} rounds after a warm-up")
            results += measure(movers, load, rounds, log)
    return results


def set_up(stack: contextlib.ExitStack, log: Log) -> dict[str, Mover]:
    """Two thinvisor agents and two QEMU processes by hand, each contender's guest
    booted; all of it ended by ``stack``."""
    shared = Path(tempfile.mkdtemp(prefix="tvmig", dir="/tmp"))
    stack.callback(shutil.rmtree, shared, True)
    roots = [shared]
    stack.callback(end_strays, roots)  # after the hosts have closed
    log("migration: starting two thinvisor hosts")
    hosts = []
    for name in ("a", "b"):
        hosts.append(stack.enter_context(migration_host(name, shared)))
        roots.append(hosts[-1].root)
    clients = [stack.enter_context(h.token_client()) for h in hosts]
    create_vm(hosts[0], clients[0], VM, "shared")
    create_vm(hosts[0], clients[0], MIRROR_VM, "local")
    spec = Inventory(load_config(hosts[0].config_file)).get_valid(VM)[1]
    log("migration: booting the guests")
    hand = stack.enter_context(HandMove(spec, agent_vm_paths(hosts[0], VM).vm_dir))
    movers: dict[str, Mover] = {
        THINVISOR: AgentMove(list(hosts), list(clients), VM, "auto"),
        MIRROR: AgentMove(list(hosts), list(clients), MIRROR_VM, "mirror", "local"),
        QEMU: hand,
    }
    for vm in (VM, MIRROR_VM):
        clients[0].post(f"/vms/{vm}/start").raise_for_status()
    hand.boot()
    for mover in movers.values():
        mover.wait_ready()
    return movers


def measure(movers: dict[str, Mover], load: str, rounds: int, log: Log) -> list[dict[str, Any]]:
    """Every contender's moves under ``load``, in turn; the comparisons."""
    comparisons = {
        m: Comparison(f"{load}: {title}", m, unit)
        for m, (title, unit) in METRICS.items()
        if m != "load" or load == "busy"
    }
    for metric, comparison in comparisons.items():
        comparison.notes += NOTES[metric]
    contenders = {name: move_round(mover, load) for name, mover in movers.items()}
    alternate(contenders, comparisons, rounds=rounds, log=log)
    add_details(movers, comparisons)
    return [with_mirror_ratio(c) for c in comparisons.values()]


# --- the thinvisor side ---------------------------------------------------------------


def migration_host(name: str, shared: Path) -> ThinvisorHost:
    """A thinvisor host whose agent also sees ``shared`` (the datastore ``shared``) and
    serves live migration on a free port; started."""
    host = ThinvisorHost(f"migration-{name}")
    try:
        with host.config_file.open("a") as f:
            f.write(f'[[datastores]]\nname = "shared"\npath = "{shared}"\n[migration]\nport = 0\n')
        host.start()
    except BaseException:
        host.close()
        raise
    return host


def end_strays(roots: list[Path]) -> None:
    """End, by pid, any QEMU still running from files under ``roots``: one that an agent
    stopped mid-migration (killed after its grace time) could leave behind."""
    marks = [f"{root}/".encode() for root in roots]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in argv.split(b"\0", 1)[0] and any(m in argv for m in marks):
            pid = int(proc.name)
            kill(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                wait_until(functools.partial(gone, pid), 10, f"QEMU (pid {pid}) gone")


def create_vm(host: ThinvisorHost, client: httpx.Client, name: str, datastore: str) -> None:
    """The benchmark's appliance VM with an empty disk, on ``datastore``."""
    body = {
        "name": name,
        "memory_mib": MEMORY_MIB,
        "vcpus": 1,
        "machine": "q35",
        "appliance": True,
        "graphics": {"kind": "none"},
        "disks": [{"size": DISK_MIB * MIB}],
        "datastore": datastore,
    }
    host.wait_task(client, client.post("/vms", json=body))


def agent_vm_paths(host: ThinvisorHost, vm: str) -> VmPaths:
    return Inventory(load_config(host.config_file)).get(vm).paths


class Mover:
    """One contender's VM, moved to its other process each time it is called; what each
    move showed besides its figures goes to ``details``. The rounds keep the guest's last
    uptime seen, and count the moves and the guest's crashes after one."""

    details: list[dict[str, float]]
    uptime: float = 0.0
    moves: int = 0
    crashes: int = 0
    resets: int = 0

    def __call__(self) -> dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        """Reset the guest where it runs now (a hard reset, as a hung guest needs)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What its managers say of the VM, for a guest that never answers again."""
        return ""

    def serial_socket(self) -> Path:
        """The guest's serial console where it runs now."""
        raise NotImplementedError

    def serial_log(self) -> Path:
        raise NotImplementedError

    def wait_ready(self) -> None:
        log = self.serial_log()
        self.uptime = wait_until(lambda: ready_uptime(log), READY_TIMEOUT_S, f"ready in {log}")


@dataclass
class AgentMove(Mover):
    """A VM moved between two agents as the center does it; ``hosts[0]`` runs it."""

    hosts: list[ThinvisorHost]
    clients: list[httpx.Client]
    vm: str
    mode: str
    datastore: str | None = None
    details: list[dict[str, float]] = field(default_factory=list)
    copies: dict[str, int] = field(default_factory=dict)  # memory_copy: moves

    def __call__(self) -> dict[str, float]:
        source, dest = self.clients
        spec = source.get(f"/vms/{self.vm}").raise_for_status().json()["spec"]
        body: dict[str, Any] = {"vm": spec, "mode": self.mode}
        if self.datastore is not None:
            body["datastore"] = self.datastore
        started = time.monotonic()
        ticket = dest.post("/migrations/incoming", json=body).raise_for_status().json()
        expected = "shared" if self.mode == "auto" else self.mode
        if ticket["mode"] != expected:
            raise RuntimeError(
                f"{self.vm}: the destination offers {ticket['mode']}, not {expected}"
            )
        request = {
            "address": "127.0.0.1",
            "port": ticket["port"],
            "fingerprint": ticket["fingerprint"],
            "token": ticket["token"],
            "mode": ticket["mode"],
            "downtime_ms": DOWNTIME_MS,
        }
        asked = time.monotonic()
        task, seen = follow_task(source, source.post(f"/vms/{self.vm}/migrate", json=request))
        ended = time.monotonic()
        self.details.append(phases_ms(asked, seen, ended))
        wall = ended - started
        self.hosts.reverse()
        self.clients.reverse()
        result = task["result"]
        copy = str(result.get("memory_copy"))
        self.copies[copy] = self.copies.get(copy, 0) + 1
        return {
            "downtime": float(result["downtime_ms"]),
            "total": float(result["total_ms"]),
            "wall": wall * 1000,
            "stream": result["memory_bytes"] / MIB,
        }

    def reset(self) -> None:
        self.clients[0].post(f"/vms/{self.vm}/reset").raise_for_status()

    def describe(self) -> str:
        said = []
        for host, client in zip(self.hosts, self.clients, strict=True):
            try:
                answer = client.get(f"/vms/{self.vm}")
                state = answer.json().get("state") if answer.is_success else answer.text
                tail = "".join(host.log.read_text(errors="replace").splitlines(True)[-15:])
            except (httpx.HTTPError, OSError, ValueError) as exc:
                state, tail = f"not known ({exc})", ""
            said.append(f"{host.root}: vm {self.vm}: {state}\n{tail}")
        return "\n".join(said)

    def serial_socket(self) -> Path:
        return agent_vm_paths(self.hosts[0], self.vm).serial_socket(SERIAL)

    def serial_log(self) -> Path:
        return agent_vm_paths(self.hosts[0], self.vm).serial_log(SERIAL)


def follow_task(
    client: httpx.Client, response: httpx.Response
) -> tuple[dict[str, Any], dict[str, float]]:
    """A 202's task once it has succeeded (a failed one raises), and when each of its
    progress messages was first seen."""
    if response.status_code != 202:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text}")
    task_id = response.json()["id"]
    seen: dict[str, float] = {}

    def finished() -> dict[str, Any] | None:
        task: dict[str, Any] = client.get(f"/tasks/{task_id}").raise_for_status().json()
        message = str(task.get("message") or "").split(" (")[0]
        seen.setdefault(message, time.monotonic())
        return task if task["state"] in ("success", "error") else None

    task: dict[str, Any] = wait_until(finished, MOVE_TIMEOUT_S, f"task {task_id}", TASK_POLL_S)
    if task["state"] == "error":
        raise RuntimeError(f"task {task_id}: {task['error']}")
    return task, seen


def phases_ms(started: float, seen: dict[str, float], ended: float) -> dict[str, float]:
    """A move's phases from its task's progress messages (as first seen by polling)."""
    mirror = seen.get("mirroring the disks")
    memory = seen.get("migrating memory")
    after = min((seen[m] for m in FINISHING if m in seen), default=ended)
    phases = {"prepare": (mirror or memory or after) - started}
    if mirror is not None:
        phases["mirror"] = (memory or after) - mirror
    if memory is not None:
        phases["memory"] = after - memory
    phases["finish"] = ended - after
    return {name: seconds * 1000 for name, seconds in phases.items()}


# --- QEMU by hand ---------------------------------------------------------------------


class HandMove(Mover):
    """The VM in two QEMU processes started by hand, moved between them over QMP; both
    open one disk image (shared storage), each has its own kernel, initrd and sockets."""

    def __init__(self, spec: VmSpec, source_dir: Path) -> None:
        self.disk_dir = Path(tempfile.mkdtemp(prefix="tvmigq", dir="/tmp"))
        self.qemus: list[RawQemu] = []
        self.details = []
        try:
            image = self.disk_dir / "disk.qcow2"
            qemu_img = HostConfig().qemu_img_binary
            subprocess.run(
                [qemu_img, "create", "-q", "-f", "qcow2", str(image), f"{DISK_MIB}M"],
                check=True,
            )
            disks = [d.model_copy(update={"path": str(image)}) for d in spec.disks]
            spec = spec.model_copy(update={"disks": disks})
            self.qemus = [RawQemu(spec, source_dir), RawQemu(spec, source_dir)]
        except BaseException:
            self.close()
            raise
        self.boot_argv = [list(q.argv) for q in self.qemus]

    def boot(self) -> None:
        self.qemus[0].start()

    def __call__(self) -> dict[str, float]:
        source, dest = self.qemus
        started = time.monotonic()
        dest.argv = [*self.boot_argv[1], "-incoming", "defer"]
        dest.start()
        try:
            figures = asyncio.run(hand_migrate(source, dest))
        except BaseException:
            dest.stop()  # the guest runs on at the source
            raise
        self.details.append({"stop_to_resume": figures.pop("stop_to_resume")})
        source.stop()
        figures["wall"] = (time.monotonic() - started) * 1000
        self.qemus.reverse()
        self.boot_argv.reverse()
        return figures

    def reset(self) -> None:
        async def go() -> None:
            client = await qmp_connect(self.qemus[0])
            try:
                await client.execute("system_reset")
            finally:
                await client.disconnect()

        asyncio.run(go())

    def serial_socket(self) -> Path:
        return self.qemus[0].paths.serial_socket(SERIAL)

    def serial_log(self) -> Path:
        return self.qemus[0].serial_log

    def close(self) -> None:
        for qemu in self.qemus:
            qemu.close()
        shutil.rmtree(self.disk_dir, ignore_errors=True)

    def __enter__(self) -> HandMove:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def hand_migrate(source: RawQemu, dest: RawQemu) -> dict[str, float]:
    """Migrate ``source``'s guest to ``dest`` (waiting in ``-incoming defer``) over
    loopback TCP; downtime, total time and memory sent."""
    src = await qmp_connect(source)
    try:
        dst = await qmp_connect(dest)
        try:
            return await hand_migrate_with(src, dst)
        finally:
            await dst.disconnect()
    finally:
        await src.disconnect()


async def hand_migrate_with(src: QMPClient, dst: QMPClient) -> dict[str, float]:
    """The move itself, as one makes it by hand with thinvisor's settings."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    caps = [{"capability": "auto-converge", "state": True}]
    await src.execute("migrate-set-capabilities", {"capabilities": caps})
    params = {"downtime-limit": DOWNTIME_MS, "max-bandwidth": UNLIMITED_BYTES_S}
    await src.execute("migrate-set-parameters", params)
    await dst.execute("migrate-incoming", {"uri": uri})
    with src.listener(("STOP",)) as stopped, dst.listener(("RESUME",)) as resumed:
        started = time.monotonic()
        await src.execute("migrate", {"uri": uri})
        info = await until_completed(src)
        resume = await asyncio.wait_for(resumed.get(), MOVE_TIMEOUT_S)
        total = time.monotonic() - started
        stop = await asyncio.wait_for(stopped.get(), MOVE_TIMEOUT_S)
    return {
        "downtime": float(info["downtime"]),
        "total": total * 1000,
        "stream": info["ram"]["transferred"] / MIB,
        # QEMU stamps events with the host's clock: the same clock for both processes.
        "stop_to_resume": (event_time(resume) - event_time(stop)) * 1000,
    }


def event_time(event: Any) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


async def until_completed(src: QMPClient) -> dict[str, Any]:
    """query-migrate on the source once it says completed (failed or cancelled raise)."""
    deadline = time.monotonic() + MOVE_TIMEOUT_S
    while time.monotonic() < deadline:
        info = await src.execute("query-migrate")
        assert isinstance(info, dict)
        if info.get("status") == "completed":
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"the migration failed: {info.get('error-desc', info['status'])}")
        await asyncio.sleep(QMP_POLL_S)
    raise TimeoutError(f"the migration: not completed within {MOVE_TIMEOUT_S:g} s")


async def qmp_connect(qemu: RawQemu, timeout: float = 30.0) -> QMPClient:
    """A QMP session with ``qemu``, once it serves QMP (it may just have been spawned)."""
    deadline = time.monotonic() + timeout
    while True:
        client = QMPClient(f"bench:{qemu.spec.name}")
        try:
            await client.connect(str(qemu.paths.qmp_socket))
            return client
        except ConnectError:
            if qemu.exited() or gone(qemu.pid):
                raise RuntimeError(f"QEMU ended: see {qemu.paths.qemu_log}") from None
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


# --- rounds ---------------------------------------------------------------------------


def move_round(mover: Mover, load: str) -> Round:
    """One move of ``mover``'s VM (when busy, with the guest writing all along), checked:
    the guest must answer on its console afterwards, with a larger uptime. A guest that
    crashed is waited for (it reboots) and moved once more; the crash is counted."""

    def one() -> dict[str, float]:
        for _ in range(MOVES_PER_ROUND):
            rate = start_load(mover) if load == "busy" else None
            figures = mover()
            mover.moves += 1
            uptime = console_uptime(mover, LOAD_STOP if rate is not None else "")
            if uptime is not None and uptime > mover.uptime:
                mover.uptime = uptime
                return figures if rate is None else {**figures, "load": rate}
            mover.crashes += 1
            mover.details.pop()
            try:
                mover.uptime = wait_console(mover)
            except TimeoutError:  # hung rather than rebooting: reset it
                mover.resets += 1
                mover.reset()
                try:
                    mover.uptime = wait_console(mover)
                except TimeoutError as exc:
                    raise TimeoutError(f"{exc}, even after a reset\n{mover.describe()}") from exc
        raise RuntimeError(f"the guest crashed after {MOVES_PER_ROUND} moves in a row")

    return one


def start_load(mover: Mover) -> float:
    """Start the guest's writing, let it run a while; the MiB/s it wrote meanwhile."""
    guest(mover, LOAD_SETUP)
    guest(mover, LOAD_START)
    started = time.monotonic()
    time.sleep(LOAD_SETTLE_S)
    passes = int(guest(mover, LOAD_PASSES).strip() or 0)
    return passes * LOAD_MIB / (time.monotonic() - started)


def console_uptime(mover: Mover, before: str = "") -> float | None:
    """The guest's uptime, asked on its console after ``before``; None when the guest
    does not answer in time (it crashed, or is rebooting)."""
    try:
        out = guest(mover, f"{before}; {UPTIME}" if before else UPTIME, CHECK_TIMEOUT_S)
    except (TimeoutError, QemuError, RuntimeError):
        return None
    try:
        return float(out.split()[-1])
    except (IndexError, ValueError):
        return None


def wait_console(mover: Mover) -> float:
    """Wait until a rebooted guest answers on its console again; its uptime."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        uptime = console_uptime(mover)
        if uptime is not None:
            return uptime
    raise TimeoutError(f"the guest's console: no answer within {READY_TIMEOUT_S:g} s")


def guest(mover: Mover, command: str, timeout: float = CONSOLE_TIMEOUT_S) -> str:
    """Run a shell command on the guest's serial console where it runs now; its output
    (a failure raises)."""

    async def go() -> tuple[int, str]:
        async with SerialConsole(mover.serial_socket()) as console:
            return await console.run(command, timeout)

    status, out = asyncio.run(go())
    if status != 0:
        raise RuntimeError(f"{command!r} failed in the guest ({status}): {out}")
    return out


def _crashes_said(name: str, mover: Mover) -> str:
    hung = f" ({mover.resets} hung: reset)" if mover.resets else ""
    return f"{mover.crashes} of {mover.moves} moves by {name}{hung}"


def add_details(movers: dict[str, Mover], comparisons: dict[str, Comparison]) -> None:
    """What the recorded moves showed besides their figures: QEMU's STOP to RESUME as a
    downtime series of its own, thinvisor's phases as notes; the details are cleared for
    the next load."""
    crashes = [_crashes_said(name, m) for name, m in movers.items() if m.crashes]
    checked = (
        "every move was checked: the guest answered on its console afterwards, its uptime grown"
    )
    if crashes:
        checked += (
            f"; it had crashed (a kernel panic, then a reboot; or hung, then reset by the"
            f" benchmark) after {', '.join(crashes)} "
            "(warm-up included): each such move was made again, and only that one counts"
        )
    comparisons["downtime"].notes.append(checked if crashes else f"{checked} (no crash)")
    for name, mover in movers.items():
        if isinstance(mover, AgentMove) and mover.copies:
            said = ", ".join(f"{how} {n} times" for how, n in sorted(mover.copies.items()))
            comparisons["downtime"].notes.append(
                f"{name} copied the memory (warm-up included): {said}"
            )
            mover.copies.clear()
        mover.moves = mover.crashes = mover.resets = 0
        recorded = mover.details[DEFAULT_WARMUP:]
        mover.details.clear()
        for details in recorded:
            if "stop_to_resume" in details:
                comparisons["downtime"].add(QEMU_GUEST, details["stop_to_resume"])
        keys = [k for k in PHASES if any(k in d for d in recorded)]
        medians = {k: statistics.median(d[k] for d in recorded if k in d) for k in keys}
        if medians:
            phases = ", ".join(f"{PHASES[k]} {v:.0f} ms" for k, v in medians.items())
            comparisons["total"].notes.append(
                f"{name} by phase (medians; its task polled every {TASK_POLL_S * 1000:.0f} "
                f"ms from POST /vms/{{name}}/migrate on): {phases}"
            )


def with_mirror_ratio(comparison: Comparison) -> dict[str, Any]:
    """The comparison's data, the mirror variant's ratios against qemu in notes instead
    of one against thinvisor's own shared-storage move."""
    data = comparison.to_dict()
    data["notes"] = list(data["notes"])
    data["ratios"].pop(MIRROR, None)
    for peer in (QEMU, QEMU_GUEST):
        ratios = comparison.ratios(peer, base=MIRROR)
        if ratios:
            data["notes"].append(
                f"{MIRROR} / {peer}: median {statistics.median(ratios):.2f} "
                f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
    return data
