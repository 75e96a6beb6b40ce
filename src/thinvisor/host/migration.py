"""Live migration (VMotion) between thinvisor hosts: the migration port, and the source's
side of a move.

The center drives a move in two calls: it asks the destination for a ticket
(``thinvisor.host.incoming``), then asks the source to migrate to it. From there the two
agents talk directly over TLS on the destination's migration port (``engine.tunnel``),
so that the switch-over waits for no one:

1. *check*: the source holds the VM's lock and checks it runs; the destination checked
   at its ticket.
2. *prepare*: over the control channel, the source sends what the destination lacks
   (mirror: the kernel and initrd, the disks' sizes); the destination starts QEMU paused,
   waiting for the state, its images inactive.
3. *mirror* (no shared storage): each disk is mirrored into the destination's new image
   over NBD (``blockdev-mirror`` in write-blocking mode: once ready, every guest write
   reaches both).
4. *migrate*: memory is sent while the guest runs, the allowed downtime raised step by
   step (oVirt's convergence schedule) when copying stalls, with QEMU's auto-converge
   slowing a busy guest down; QEMU stops the guest for the last pass. Where a live copy
   is not safe (``memory_copy_of``: QEMU before 9.0 emulating the CPU with TCG loses
   guest writes between passes) the guest is paused for the whole copy instead.
5. *finish*: the mirror jobs end without switching (the destination's copy is whole);
   the destination makes the VM its own in one atomic step and lets it run.
6. *confirm*: the source ends its QEMU and, for mirror, removes its copy.

Any failure before the destination's step (a refused channel, QEMU's error, the
destination gone, a cancellation) is a rollback: the mirror jobs and the migration are
cancelled and the guest runs on at the source, never having stopped for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from thinvisor.errors import BackendError, InvalidArgument, QemuError, ThinvisorError
from thinvisor.fs import fsync_dir
from thinvisor.host.engine import blocks, process, tunnel
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.engine.tunnel import Counter, Stream, TunnelError
from thinvisor.host.incoming import IncomingMigrations, IncomingRequest, Ticket
from thinvisor.host.inventory import DELETING, VmEntry, owner_of
from thinvisor.host.state import Action, PowerState, check_allowed, check_template
from thinvisor.host.tasks import Progress
from thinvisor.model.base import StrictModel
from thinvisor.model.vm import DiskSpec, KernelBoot, VmSpec
from thinvisor.storage.snapshots import load_tree

if TYPE_CHECKING:
    from thinvisor.host.service import HostService

log = logging.getLogger(__name__)

POLL_S = 0.02
#: Dirty-memory passes at one downtime step before the next is allowed.
PASSES_PER_STEP = 2
#: Passes at the last step (auto-converge throttling harder each time) before giving up.
PASSES_AT_LIMIT = 12
#: No limit of QEMU's own on the stream (its default is 128 MiB/s).
UNLIMITED_BYTES_S = 64 << 30
FINISH_TIMEOUT_S = 60.0
#: The first QEMU whose TCG keeps the migration's dirty-page bitmap coherent with the
#: guest's writes (commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with
#: TCG memory access"). Before it, a page the guest rewrites after a pass may never be
#: sent again: the guest runs on at the destination with stale memory and crashes.
TCG_LIVE_COPY_SINCE = (9, 0)

MemoryCopy = Literal["live", "paused"]
#: What a move may ask for: ``auto`` leaves it to ``memory_copy_of``.
MemoryCopyChoice = Literal["auto", "live", "paused"]


class MigrateRequest(StrictModel):
    address: str = Field(description="the destination's address, as this host reaches it")
    port: int = Field(ge=1, le=65535, description="its migration port (from the ticket)")
    fingerprint: str = Field(description="its certificate's SHA-256 fingerprint")
    token: str = Field(min_length=16, max_length=256, description="the ticket's token")
    mode: Literal["shared", "mirror"] = Field(description="the ticket's mode")
    downtime_ms: int = Field(default=300, ge=10, le=10_000, description="the downtime allowed")
    auto_converge: bool = Field(default=True, description="slow a busy guest down to converge")
    bandwidth_mib_s: int | None = Field(default=None, ge=1, le=100_000)
    memory_copy: MemoryCopyChoice = Field(
        default="auto",
        description="live: memory copied while the guest runs; paused: the guest paused for "
        "the whole copy (a longer downtime); auto: live where it is safe (KVM, or QEMU 9.0 "
        "or later)",
    )


def downtime_steps(limit_ms: int) -> list[int]:
    """oVirt-style escalation: start at a quarter of the allowed downtime, then half,
    three quarters, the whole."""
    return sorted({max(10, limit_ms * k // 4) for k in (1, 2, 3, 4)})


def memory_copy_of(requested: MemoryCopyChoice, kvm: bool, qemu: tuple[int, int]) -> MemoryCopy:
    """How the memory is copied: as ``requested``, or for ``auto`` live unless QEMU
    (version ``qemu``) emulates the CPU (``kvm`` false) and its TCG loses writes between
    passes (before ``TCG_LIVE_COPY_SINCE``)."""
    if requested != "auto":
        return requested
    return "live" if kvm or qemu >= TCG_LIVE_COPY_SINCE else "paused"


class MigrationService:
    """The agent's migration port, its incoming migrations, and outgoing moves."""

    def __init__(self, service: HostService, port: int, fingerprint: str) -> None:
        self.service = service
        self.incoming = IncomingMigrations(service, port, fingerprint)
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket, cert: Path, key: Path) -> None:
        """Serve the migration port on ``sock`` (bound already)."""
        swept = await asyncio.to_thread(self.incoming.sweep)
        for name in swept:
            log.info("vm %s: an interrupted incoming migration was cleaned up", name)
        self.incoming.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(
            self._serve, sock=sock, ssl=tunnel.server_context(cert, key), limit=tunnel.HELLO_LIMIT
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.incoming.close()

    async def prepare(self, req: IncomingRequest) -> Ticket:
        return await self.incoming.prepare(req)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = (reader, writer)
        try:
            token, channel = await tunnel.read_hello(stream)
            incoming = self.incoming.find(token)
            why = (
                "unknown token" if incoming is None else self.incoming.channel_ok(incoming, channel)
            )
            if why is not None or incoming is None:
                peer = writer.get_extra_info("peername")
                log.warning("migration port: %s refused: %s", peer, why)
                await tunnel.send_message(stream, {"ok": False, "error": why})
                return
            await tunnel.send_message(stream, {"ok": True})
            await self.incoming.channel(incoming, channel, stream)
        except (ThinvisorError, OSError, ssl.SSLError) as exc:
            log.info("migration port: a channel ended: %s", exc)
        finally:
            writer.close()

    async def migrate(
        self, name: str, req: MigrateRequest, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Move the running VM ``name`` to the destination ``req`` names (a task's work)."""
        async with self.service.inventory.lock(name):
            entry, spec = self.service.inventory.get_valid(name)
            check_template(name, spec.template, Action.MIGRATE)
            state, _, _ = await self.service.state_of(entry)
            check_allowed(name, state, Action.MIGRATE)
            move = _Move(self.service, entry, spec, req, progress)
            if state is PowerState.STOPPED:
                return await move.run_cold()
            if req.mode == "mirror" and load_tree(entry.paths.vm_dir).snapshots:
                raise InvalidArgument(
                    "mode", f"vm {name!r} has snapshots: only shared storage keeps them"
                )
            return await move.run()


@dataclass
class _Step:
    started: float
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    downtime_limit_ms: int = 0
    memory_copy: MemoryCopy | None = None  # a stopped VM's move copies none
    paused_at: float | None = None


class _Move:
    """One outgoing live migration, from the check to the confirmation or rollback."""

    def __init__(
        self,
        service: HostService,
        entry: VmEntry,
        spec: VmSpec,
        req: MigrateRequest,
        progress: Progress | None,
    ) -> None:
        self.service = service
        self.entry = entry
        self.spec = spec
        self.req = req
        self.progress = progress
        self.counter = Counter()
        self.control: Stream | None = None
        self.mon = Monitor(spec.name, entry.paths.qmp_socket)
        self.jobs: list[str] = []
        self.nbd_nodes: list[str] = []
        self.listeners: list[asyncio.Server] = []
        self.pumps: list[asyncio.Task[None]] = []
        self.finish_sent = False
        self.step = _Step(time.monotonic())

    def _update(self, percent: int, message: str) -> None:
        if self.progress is not None:
            self.progress.update(percent, message)

    @property
    def destination(self) -> str:
        return f"{self.req.address}:{self.req.port}"

    async def channel(self, name: str) -> Stream:
        r = self.req
        return await tunnel.open_channel(r.address, r.port, r.fingerprint, r.token, name)

    async def run(self) -> dict[str, Any]:
        name = self.spec.name
        self._update(1, f"connecting to {self.destination}")
        self.control = await self.channel("control")
        try:
            await self.mon.__aenter__()
            try:
                await self._prepare()
                if self.req.mode == "mirror":
                    await self._mirror()
                await self._migrate_memory()
                await self._finish()
            except BaseException as exc:
                if not (self.finish_sent and self._moved()):
                    await self._roll_back(exc)
                    raise
                # The destination took the VM and only its answer was lost.
                log.warning("vm %s: moved, though the destination did not say so: %s", name, exc)
            await self._confirm()
        finally:
            await self._close()
        self.service.emit(
            "vm.migrated",
            name,
            f"moved to {self.req.address} by live migration",
            destination=self.req.address,
            mode=self.req.mode,
        )
        return self._result()

    async def run_cold(self) -> dict[str, Any]:
        """A stopped VM: its files sent (mirror) or handed over (shared), then dropped here."""
        self._update(1, f"connecting to {self.destination}")
        self.control = await self.channel("control")
        try:
            if self.req.mode == "mirror":
                for name, path in self._own_small_files():
                    await self._send_file(name, path)
                for disk in self.spec.disks:
                    await self._send_disk(disk)
            self.finish_sent = True
            await self._ask({"op": "commit"})
        except BaseException as exc:
            if not (self.finish_sent and self._moved()):
                raise
            log.warning(
                "vm %s: moved, though the destination did not say so: %s", self.spec.name, exc
            )
        finally:
            self.control[1].close()
        paths = self.entry.paths
        if self.req.mode == "mirror":
            await self._drop_copy()
        shutil.rmtree(paths.run_dir, ignore_errors=True)
        self.service.emit(
            "vm.migrated", self.spec.name, f"moved to {self.req.address} (cold migration)",
            destination=self.req.address, mode=self.req.mode,
        )  # fmt: skip
        return self._result()

    async def _send_disk(self, disk: DiskSpec) -> None:
        """A disk as one image (a chain flattened first) named ``<disk>.<format>``."""
        path = self.entry.paths.resolve(disk.path)
        flat = None
        if len(await self.service.images.chain(path)) > 1:
            flat = self.entry.paths.vm_dir / f".{disk.name}.migrating"
            await self.service.images.convert(path, flat, disk.format)
        try:
            self._update(10, f"sending disk {disk.name}")
            await self._send_file(f"{disk.name}.{disk.format}", flat or path, channel="disk")
        finally:
            if flat is not None:
                flat.unlink(missing_ok=True)

    async def _drop_copy(self) -> None:
        paths = self.entry.paths
        doomed = paths.vm_dir.with_name(f".{self.entry.name}{DELETING}{secrets.token_hex(4)}")
        paths.vm_dir.rename(doomed)
        fsync_dir(doomed.parent)
        await asyncio.to_thread(shutil.rmtree, doomed, True)

    # --- the phases ----------------------------------------------------------------

    async def _prepare(self) -> None:
        assert self.control is not None
        self._update(2, "preparing the destination")
        sizes: dict[str, int] = {}
        if self.req.mode == "mirror":
            for name, path in self._own_small_files():
                await self._send_file(name, path)
            for disk in self.spec.disks:
                info = await self.service.images.info(self.entry.paths.resolve(disk.path))
                sizes[disk.name] = info.virtual_size
        await self._ask({"op": "start", "disks": sizes})

    def _own_small_files(self) -> list[tuple[str, Path]]:
        """The files in the VM's directory that QEMU reads besides its disks."""
        names: list[str] = []
        if isinstance(self.spec.boot, KernelBoot):
            names += [self.spec.boot.kernel, *filter(None, [self.spec.boot.initrd])]
        if self.spec.cdrom is not None and self.spec.cdrom.path:
            names.append(self.spec.cdrom.path)
        found = []
        for name in names:
            path = self.entry.paths.resolve(name)
            if not Path(name).is_absolute() and "/" not in name:
                found.append((name, path))
        return found

    async def _send_file(self, name: str, path: Path, channel: str = "files") -> None:
        assert self.control is not None
        size = path.stat().st_size
        await tunnel.send_message(self.control, {"op": "file", "name": name, "size": size})
        writer = self.control[1]
        with path.open("rb") as f:
            while data := await asyncio.to_thread(f.read, tunnel.CHUNK):
                writer.write(data)
                self.counter.add(channel, len(data))
                await writer.drain()
        reply = await tunnel.read_message(self.control, timeout=FINISH_TIMEOUT_S)
        _check_reply(reply, f"sending {name}")

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.control is not None
        await tunnel.send_message(self.control, message)
        reply = await tunnel.read_message(self.control, timeout=FINISH_TIMEOUT_S)
        return _check_reply(reply, str(message.get("op")))

    async def _mirror(self) -> None:
        """Every disk mirrored to the destination until the copies are whole (ready)."""
        for disk in self.spec.disks:
            sock = self.entry.paths.run_dir / f"mig-{disk.name}.sock"
            sock.unlink(missing_ok=True)
            server = await asyncio.start_unix_server(self._disk_handler(disk.name), path=str(sock))
            self.listeners.append(server)
            await self._let_qemu_connect(sock)
            node = f"mig-{disk.name}"
            await self.mon.blockdev_add(
                {
                    "driver": "nbd",
                    "node-name": node,
                    "server": {"type": "unix", "path": str(sock)},
                    "export": disk.name,
                }
            )
            self.nbd_nodes.append(node)
            job = f"mig-{disk.name}-{secrets.token_hex(3)}"
            await self.mon.execute(
                "blockdev-mirror",
                {
                    "job-id": job,
                    "device": await blocks.top_node(self.mon, disk.name),
                    "target": node,
                    "sync": "full",
                    "copy-mode": "write-blocking",
                    "auto-dismiss": False,
                },
            )
            self.jobs.append(job)
        await self._wait_mirrors_ready()

    async def _let_qemu_connect(self, sock: Path) -> None:
        if self.service.isolation.enabled:
            who = await asyncio.to_thread(self.service.isolation.identity, self.spec)
            os.chown(sock, who.uid, who.gid)

    def _disk_handler(
        self, disk: str
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Ended by ``_close`` with the move; asyncio's server would log a cancellation.
            with contextlib.suppress(asyncio.CancelledError):
                await self._carry_disk(disk, (reader, writer))

        return handle

    async def _carry_disk(self, disk: str, local: Stream) -> None:
        try:
            remote = await self.channel(f"disk:{disk}")
        except ThinvisorError as exc:
            log.warning("vm %s: disk %s: %s", self.spec.name, disk, exc)
            local[1].close()
            return
        task = asyncio.current_task()
        if task is not None:
            self.pumps.append(task)
        await tunnel.splice(local, remote, self.counter, f"disk:{disk}")

    async def _wait_mirrors_ready(self) -> None:
        while True:
            jobs = {j["id"]: j for j in await self.mon.command("query-jobs")}
            done = total = 0
            ready = True
            for job_id in self.jobs:
                job = jobs.get(job_id)
                if job is None or job["status"] in ("concluded", "aborting", "null"):
                    error = (job or {}).get("error", "it ended")
                    raise QemuError(f"vm {self.spec.name!r}: mirroring to the destination: {error}")
                done += int(job.get("current-progress", 0))
                total += int(job.get("total-progress", 0))
                ready = ready and job["status"] == "ready"
            percent = 5 + 35 * done // total if total else 5
            self._update(percent, "mirroring the disks")
            if ready:
                return
            await asyncio.sleep(0.1)

    async def _migrate_memory(self) -> None:
        mon, req = self.mon, self.req
        steps = downtime_steps(req.downtime_ms)
        await mon.command(
            "migrate-set-capabilities",
            capabilities=[{"capability": "auto-converge", "state": req.auto_converge}],
        )
        bandwidth = req.bandwidth_mib_s << 20 if req.bandwidth_mib_s else UNLIMITED_BYTES_S
        await mon.command(
            "migrate-set-parameters", downtime_limit=steps[0], max_bandwidth=bandwidth
        )
        self.step.downtime_limit_ms = steps[0]
        self.step.memory_copy = await self._memory_copy()
        remote = await self.channel("memory")
        ours, qemus = socket.socketpair()
        try:
            await mon.getfd("migration-out", qemus.fileno())
        finally:
            qemus.close()
        local = await asyncio.open_connection(sock=ours)
        self.pumps.append(asyncio.create_task(tunnel.splice(local, remote, self.counter, "memory")))
        if self.step.memory_copy == "paused":
            await mon.command("stop")
            self.step.paused_at = time.monotonic()
        self._update(40, "migrating memory")
        await mon.command("migrate", uri="fd:migration-out")
        await self._watch_memory(steps)

    async def _memory_copy(self) -> MemoryCopy:
        kvm = await self.mon.command("query-kvm")
        version = (await self.mon.command("query-version"))["qemu"]
        qemu = (int(version["major"]), int(version["minor"]))
        copy = memory_copy_of(self.req.memory_copy, bool(kvm.get("enabled")), qemu)
        if copy == "paused" and self.req.memory_copy == "auto":
            log.warning(
                "vm %s: paused while its memory is copied: QEMU %d.%d emulating the CPU (TCG) "
                "can lose the guest's writes in a live copy (fixed in QEMU %d.%d)",
                self.spec.name, *qemu, *TCG_LIVE_COPY_SINCE,
            )  # fmt: skip
        return copy

    async def _watch_memory(self, steps: list[int]) -> None:
        mon, index, passes_at = self.mon, 0, 0
        while True:
            info = await mon.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                self._completed_at = time.monotonic()
                paused = self.step.paused_at
                # Paused for the copy: the guest stood still from our stop on.
                self.step.downtime_ms = (
                    float(info.get("downtime", 0))
                    if paused is None
                    else (self._completed_at - paused) * 1000
                )
                return
            if status in ("failed", "cancelled"):
                why = info.get("error-desc", status)
                raise QemuError(f"vm {self.spec.name!r}: the migration failed: {why}")
            ram = info.get("ram") or {}
            passes = int(ram.get("dirty-sync-count", 0))
            if passes - passes_at >= PASSES_PER_STEP and index + 1 < len(steps):
                index, passes_at = index + 1, passes
                await mon.command("migrate-set-parameters", downtime_limit=steps[index])
                self.step.downtime_limit_ms = steps[index]
                log.info("vm %s: downtime allowed raised to %d ms", self.spec.name, steps[index])
            elif index + 1 == len(steps) and passes - passes_at > PASSES_AT_LIMIT:
                raise QemuError(
                    f"vm {self.spec.name!r}: the guest changes memory faster than it can be "
                    f"sent within {steps[-1]} ms of downtime; not moved"
                )
            total = int(ram.get("total", 0)) or 1
            sent = total - int(ram.get("remaining", total))
            self._update(40 + 55 * sent // total, f"migrating memory (pass {passes})")
            await asyncio.sleep(POLL_S)

    async def _finish(self) -> None:
        """The guest is stopped here: end the mirrors without switching, then let the
        destination take the VM and run it."""
        for job in self.jobs:
            await self.mon.command("block-job-cancel", device=job)
        await self._wait_jobs_gone()
        # The destination's exports end before its VM runs: our NBD connections go first.
        for node in self.nbd_nodes:
            await self.mon.blockdev_del(node)
        self.nbd_nodes.clear()
        self._update(97, "switching over")
        self.finish_sent = True
        await self._ask({"op": "finish"})
        self.step.downtime_ms += (time.monotonic() - self._completed_at) * 1000

    async def _wait_jobs_gone(self) -> None:
        pending = set(self.jobs)
        while pending:
            jobs = {j["id"]: j for j in await self.mon.command("query-jobs")}
            for job_id in list(pending):
                job = jobs.get(job_id)
                if job is None:
                    pending.discard(job_id)
                elif job["status"] == "concluded":
                    await self.mon.command("job-dismiss", id=job_id)
                    if job.get("error"):
                        raise QemuError(f"vm {self.spec.name!r}: disk mirror: {job['error']}")
                    pending.discard(job_id)
            if pending:
                await asyncio.sleep(POLL_S)
        self.jobs.clear()

    async def _confirm(self) -> None:
        """The VM runs at the destination: end ours, and drop our copy (mirror)."""
        self._update(99, "cleaning up the source")
        paths = self.entry.paths
        pid = process.running_pid(paths)
        process.record_stop(paths, "migrate", f"moved to {self.req.address}")
        await self.mon.quit()
        if pid is not None and not await process.wait_gone(paths, pid, 10):
            process.kill(pid)
            await process.wait_gone(paths, pid, 10)
        await self.service.vm_gone(self.spec)
        if self.req.mode == "mirror":
            await self._drop_copy()
        shutil.rmtree(paths.run_dir, ignore_errors=True)

    # --- rollback ------------------------------------------------------------------

    async def _roll_back(self, exc: BaseException) -> None:
        name = self.spec.name
        log.warning("vm %s: live migration to %s failed: %s", name, self.destination, exc)
        if self.finish_sent and not self._stayed():
            # The destination may have taken the VM: running it here too could corrupt
            # its disks. It stays paused for the center (or an operator) to settle.
            raise BackendError(
                f"vm {name!r}: the destination did not confirm the switch-over ({exc}); the VM "
                "is left paused here and may run at the destination: check there first"
            ) from exc
        with contextlib.suppress(ThinvisorError, OSError):
            await self.mon.command("migrate_cancel")
        for job in self.jobs:
            with contextlib.suppress(ThinvisorError):
                await self.mon.command("block-job-cancel", device=job, force=True)
        with contextlib.suppress(ThinvisorError):
            await self._wait_jobs_gone()
        for node in self.nbd_nodes:
            with contextlib.suppress(ThinvisorError):
                await self.mon.blockdev_del(node)
        await self._resume()

    def _moved(self) -> bool:
        """Whether the destination has certainly taken the VM (shared storage: its
        ``owner`` file names another host)."""
        if self.req.mode != "shared":
            return False
        return owner_of(self.entry.paths.vm_dir) not in (None, self.service.inventory.host_id)

    def _stayed(self) -> bool:
        """Whether the VM certainly did not move: with shared storage its ``owner`` file
        says; a mirror's destination cannot be looked at from here."""
        if self.req.mode != "shared":
            return False
        return owner_of(self.entry.paths.vm_dir) in (None, self.service.inventory.host_id)

    async def _resume(self) -> None:
        """Let the guest run here again, whatever state the failed migration left."""
        for _ in range(50):
            try:
                status = await self.mon.status()
            except QemuError as exc:
                log.error(
                    "vm %s: cannot resume after the failed migration: %s", self.spec.name, exc
                )
                return
            if status in ("running",):
                return
            if status in ("paused", "postmigrate", "finish-migrate"):
                with contextlib.suppress(QemuError):
                    await self.mon.cont()
                    return
            await asyncio.sleep(0.1)

    async def _close(self) -> None:
        for server in self.listeners:
            server.close()
        for task in self.pumps:
            task.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        for listener in self.listeners:
            for sock in listener.sockets:
                with contextlib.suppress(OSError):
                    Path(str(sock.getsockname())).unlink(missing_ok=True)
        if self.control is not None:
            self.control[1].close()
        await self.mon.close()

    def _result(self) -> dict[str, Any]:
        channels = self.counter.by_channel
        return {
            "vm": self.spec.name,
            "mode": self.req.mode,
            "destination": self.req.address,
            "downtime_ms": round(self.step.downtime_ms, 1),
            "downtime_limit_ms": self.step.downtime_limit_ms,
            "memory_copy": self.step.memory_copy,
            "total_ms": round((time.monotonic() - self.step.started) * 1000, 1),
            "transferred_bytes": self.counter.bytes,
            "memory_bytes": channels.get("memory", 0),
            "disk_bytes": sum(n for c, n in channels.items() if c.startswith("disk")),
        }

    _completed_at: float = 0.0


def _check_reply(reply: dict[str, Any], what: str) -> dict[str, Any]:
    if not reply.get("ok"):
        raise TunnelError(f"the destination refused {what}: {reply.get('error')}")
    return reply
