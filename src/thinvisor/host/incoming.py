"""The destination's side of a live migration: a VM arriving from another host.

``prepare`` checks what can be checked before anything moves (the name is free, the
host has the memory, CPUs, networks and, with shared storage, sees the VM's files) and
returns a ticket. The source then opens the ticket's control channel and drives the
rest (see ``thinvisor.host.migration``): with ``mirror`` storage it sends the VM's
small files (kernel, initrd), then asks for the start: the disks are made empty, QEMU
starts paused in incoming mode (block devices inactive until it runs) and, for mirror,
serves the disks over NBD on a unix socket for the source's mirror jobs. Memory arrives
on the ``memory`` channel; on ``finish`` the VM becomes this host's in one atomic step
(shared: its ``owner`` file names this host; mirror: its ``vm.toml`` is written) and
only then runs.

Until that step nothing here is visible as a VM, and whatever ends the control channel
early (the source failing, the source agent dying, a cut network) throws it all away.
A record in ``<state_dir>/migrations/`` lets an agent that died mid-way do the same
when it starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from thinvisor.config import DatastoreConfig
from thinvisor.errors import AlreadyExists, InvalidArgument, QemuError, ThinvisorError
from thinvisor.fs import atomic_write, fsync_dir
from thinvisor.host.engine import process, tunnel
from thinvisor.host.engine.paths import CONFIG_NAME, VmPaths
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.engine.tunnel import Stream, TunnelError
from thinvisor.host.inventory import VmEntry, load_spec, owner_of, save_spec, set_owner
from thinvisor.host.maintenance import check_not_in_maintenance
from thinvisor.model.base import StrictModel
from thinvisor.model.vm import KernelBoot, VmSpec, validate

if TYPE_CHECKING:
    from thinvisor.host.service import HostService

log = logging.getLogger(__name__)

#: How long a ticket waits for the source's control channel.
TICKET_TTL_S = 120.0
#: How long ``finish`` waits for QEMU to have loaded the last of the state.
LOAD_TIMEOUT_S = 60.0
MAX_FILE_BYTES = 1 << 44  # a disk's image, for a stopped VM's move
RECORDS = "migrations"
NBD_SOCKET = "nbd.sock"
DISK_FORMATS = ("qcow2", "raw")

Mode = Literal["shared", "mirror"]


class IncomingRequest(StrictModel):
    vm: dict[str, Any] = Field(description="the VM's spec, as GET /vms/{name} shows it")
    mode: Literal["auto", "shared", "mirror"] = Field(
        default="auto",
        description="shared: this host sees the VM's files where the source does; mirror: "
        "its disks are copied here; auto: shared when possible",
    )
    datastore: str | None = Field(
        default=None, description="mirror: where the disks go (default: the default datastore)"
    )
    live: bool = Field(
        default=True,
        description="a running VM (live migration); false: a stopped VM, its files moved",
    )


@dataclass
class Ticket:
    id: str
    token: str
    port: int
    fingerprint: str
    mode: Mode

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "token": self.token,
            "port": self.port,
            "fingerprint": self.fingerprint,
            "mode": self.mode,
        }


@dataclass
class Incoming:
    """One VM on its way here."""

    id: str
    token: str
    spec: VmSpec
    mode: Mode
    paths: VmPaths
    datastore: str
    record: Path
    live: bool = True
    state: str = "prepared"  # prepared, started, committed, aborted
    monitor: Monitor | None = None
    made_dir: bool = False
    controlled: bool = False  # its one control channel is open
    exports: list[str] = field(default_factory=list)
    expiry: asyncio.TimerHandle | None = None

    @property
    def entry(self) -> VmEntry:
        return VmEntry(self.spec.name, self.datastore, self.paths, self.spec, None)


class IncomingMigrations:
    """Every VM on its way to this host, by token."""

    def __init__(self, service: HostService, port: int, fingerprint: str) -> None:
        self.service = service
        self.port = port
        self.fingerprint = fingerprint
        self._by_token: dict[str, Incoming] = {}
        self.records = service.config.state_dir / RECORDS

    # --- prepare -------------------------------------------------------------------

    async def prepare(self, req: IncomingRequest) -> Ticket:
        """Check that ``req``'s VM can come here; its ticket (nothing made yet but a record)."""
        spec = validate(VmSpec, req.vm)
        self._check_not_coming(spec)
        # Reading the datastores and writing the record: a worker thread.
        incoming = await asyncio.to_thread(self._checked, req, spec)
        try:
            self._check_not_coming(spec)  # another request for it may have come meanwhile
        except AlreadyExists:
            incoming.record.unlink(missing_ok=True)
            raise
        self._by_token[incoming.token] = incoming
        loop = asyncio.get_running_loop()
        incoming.expiry = loop.call_later(TICKET_TTL_S, self._expire, incoming)
        mode = incoming.mode
        log.info("vm %s: incoming migration %s prepared (%s)", spec.name, incoming.id, mode)
        return Ticket(incoming.id, incoming.token, self.port, self.fingerprint, mode)

    def _check_not_coming(self, spec: VmSpec) -> None:
        if any(i.spec.name == spec.name for i in self._by_token.values()):
            raise AlreadyExists(f"vm {spec.name!r} is already on its way here")

    def _checked(self, req: IncomingRequest, spec: VmSpec) -> Incoming:
        """The checks of ``prepare`` that read the host's files, and the record written."""
        service = self.service
        check_not_in_maintenance(service.config.state_dir, f"vm {spec.name!r}: cannot migrate here")
        if service.inventory.find(spec.name) is not None:
            raise AlreadyExists(f"vm {spec.name!r} already exists on this host")
        shared = self._shared_dir(spec)
        if req.mode == "shared" and shared is None:
            raise InvalidArgument(
                "mode", f"this host does not see vm {spec.name!r}'s files in its datastores"
            )
        mode: Mode = "shared" if shared is not None and req.mode != "mirror" else "mirror"
        if mode == "shared":
            assert shared is not None
            datastore, paths = shared
        else:
            datastore = service.config.datastore(req.datastore)
            paths = service.inventory.paths(datastore, spec.name)
            if paths.vm_dir.exists():
                raise AlreadyExists(
                    f"vm {spec.name!r}: datastore {datastore.name} already holds a directory"
                    " of that name"
                )
            _check_mirrorable(spec)
        if req.live:  # it will run here at once: it must fit now
            service._check_resources(spec)
            service._admit(spec)
        service._with_macs(spec)
        service.network.check_networks(spec)
        incoming = Incoming(
            id=secrets.token_hex(8),
            token=secrets.token_urlsafe(32),
            spec=spec,
            mode=mode,
            paths=paths,
            datastore=datastore.name,
            record=self.records / "pending.json",
            live=req.live,
        )
        incoming.record = self.records / f"{incoming.id}.json"
        self._save_record(incoming)
        return incoming

    def _shared_dir(self, spec: VmSpec) -> tuple[DatastoreConfig, VmPaths] | None:
        """Where this host sees the VM's directory (another host's, same VM), if it does."""
        inventory = self.service.inventory
        for ds in self.service.config.all_datastores():
            vm_dir = ds.path / spec.name
            if not (vm_dir / CONFIG_NAME).is_file() or owner_of(vm_dir) == inventory.host_id:
                continue
            try:
                if load_spec(vm_dir / CONFIG_NAME).uuid != spec.uuid:
                    continue
            except ThinvisorError:
                continue
            paths = inventory.paths(ds, spec.name)
            if all(_visible(paths, p) for p in _files_of(spec)):
                return ds, paths
        return None

    def _expire(self, incoming: Incoming) -> None:
        if incoming.state == "prepared":
            log.warning("vm %s: incoming migration %s expired", incoming.spec.name, incoming.id)
            asyncio.get_running_loop().create_task(self.abort(incoming))

    def _save_record(self, incoming: Incoming) -> None:
        self.records.mkdir(parents=True, exist_ok=True, mode=0o700)
        pid = process.running_pid(incoming.paths) if incoming.state != "prepared" else None
        record = {
            "id": incoming.id,
            "vm": incoming.spec.name,
            "mode": incoming.mode,
            "vm_dir": str(incoming.paths.vm_dir),
            "run_dir": str(incoming.paths.run_dir),
            "made_dir": incoming.made_dir,
            "pid": pid,
        }
        atomic_write(incoming.record, json.dumps(record), mode=0o600)

    # --- channels ------------------------------------------------------------------

    def find(self, token: str) -> Incoming | None:
        for known, incoming in self._by_token.items():
            if secrets.compare_digest(known, token):
                return incoming
        return None

    async def channel(self, incoming: Incoming, channel: str, stream: Stream) -> None:
        """Serve one channel of ``incoming`` (already acknowledged)."""
        if channel == "control":
            await self._control(incoming, stream)
        elif channel == "memory":
            await self._memory(incoming, stream)
        elif channel.startswith("disk:"):
            await self._disk(incoming, channel.removeprefix("disk:"), stream)

    @staticmethod
    def channel_ok(incoming: Incoming, channel: str) -> str | None:
        """Why ``channel`` may not open now (None: it may)."""
        if channel == "control":
            ok = incoming.state == "prepared" and not incoming.controlled
            return None if ok else "the control channel is open"
        if incoming.state != "started":
            return "the migration has not started"
        if channel == "memory" or channel.startswith("disk:"):
            return None
        return f"no channel {channel!r}"

    async def _control(self, incoming: Incoming, stream: Stream) -> None:
        incoming.controlled = True
        if incoming.expiry is not None:
            incoming.expiry.cancel()
        try:
            while incoming.state != "committed":
                message = await tunnel.read_message(stream)
                reply = await self._command(incoming, message, stream)
                await tunnel.send_message(stream, reply)
        except (ThinvisorError, OSError) as exc:
            log.warning("vm %s: incoming migration ends: %s", incoming.spec.name, exc)
            with contextlib.suppress(ThinvisorError, OSError):
                await tunnel.send_message(stream, {"ok": False, "error": str(exc)})
        finally:
            if incoming.state != "committed":
                await self.abort(incoming)
            else:
                self._forget(incoming)

    async def _command(
        self, incoming: Incoming, message: dict[str, Any], stream: Stream
    ) -> dict[str, Any]:
        op = message.get("op")
        if op == "file" and incoming.mode == "mirror" and incoming.state == "prepared":
            await self._receive_file(incoming, message, stream)
            return {"ok": True}
        if op == "start" and incoming.state == "prepared":
            await self._start(incoming, message.get("disks") or {})
            return {"ok": True}
        if op == "finish" and incoming.state == "started":
            await self._finish(incoming)
            return {"ok": True, "resumed_at": time.time()}
        if op == "commit" and incoming.state == "prepared" and not incoming.live:
            await self._commit_cold(incoming)
            return {"ok": True}
        raise InvalidArgument("op", f"{op!r} is not expected now ({incoming.state})")

    async def _receive_file(
        self, incoming: Incoming, message: dict[str, Any], stream: Stream
    ) -> None:
        name, size = message.get("name"), message.get("size")
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not name:
            raise InvalidArgument("name", "a file of the VM's directory, by its plain name")
        if not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
            raise InvalidArgument("size", f"must be 0 to {MAX_FILE_BYTES} bytes")
        self._make_dir(incoming)
        target = incoming.paths.vm_dir / name
        partial = target.with_name(f".{name}.partial")
        with partial.open("wb") as f:
            left = size
            while left:
                data = await stream[0].read(min(left, tunnel.CHUNK))
                if not data:
                    raise TunnelError(f"the source stopped sending {name}")
                # Disk images are large: their writes and fsync stay off the loop.
                await asyncio.to_thread(f.write, data)
                left -= len(data)
            f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        partial.rename(target)

    def _make_dir(self, incoming: Incoming) -> None:
        if incoming.made_dir:
            return
        incoming.paths.vm_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            incoming.paths.vm_dir.mkdir()
        except FileExistsError:
            raise AlreadyExists(f"{incoming.paths.vm_dir} exists already") from None
        incoming.made_dir = True
        self._save_record(incoming)
        (incoming.paths.vm_dir / "logs").mkdir()

    async def _start(self, incoming: Incoming, disks: dict[str, Any]) -> None:
        service = self.service
        if incoming.mode == "mirror":
            self._make_dir(incoming)
            incoming.spec = await self._new_disks(incoming, disks)
        service._check_paths(incoming.spec, incoming.paths)
        incoming.state = "started"
        await service._launch(incoming.entry, incoming.spec, incoming=True, paused=True)
        self._save_record(incoming)
        mon = Monitor(incoming.spec.name, incoming.paths.qmp_socket)
        await mon.__aenter__()
        incoming.monitor = mon
        # The images stay inactive (unlocked) until the VM runs here: the source can
        # take them back if the migration fails at the last moment.
        await mon.command(
            "migrate-set-capabilities",
            capabilities=[{"capability": "late-block-activate", "state": True}],
        )
        if incoming.mode == "mirror":
            sock = incoming.paths.run_dir / NBD_SOCKET
            await mon.command(
                "nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}
            )
            for disk in incoming.spec.disks:
                export = {
                    "type": "nbd",
                    "id": f"export-{disk.name}",
                    "node-name": f"{disk.name}-fmt",
                    "name": disk.name,
                    "writable": True,
                }
                await mon.execute("block-export-add", export)
                incoming.exports.append(f"export-{disk.name}")

    async def _new_disks(self, incoming: Incoming, sizes: dict[str, Any]) -> VmSpec:
        """Empty disks of the source's sizes, one image each in the VM's directory."""
        spec, disks = incoming.spec, []
        for disk in spec.disks:
            size = sizes.get(disk.name)
            if not isinstance(size, int) or size <= 0:
                raise InvalidArgument("disks", f"the size of disk {disk.name} is missing")
            filename = f"{disk.name}.{disk.format}"
            await self.service.images.create(incoming.paths.vm_dir / filename, disk.format, size)
            disks.append(disk.model_copy(update={"path": filename}))
        return spec.model_copy(update={"disks": disks})

    async def _memory(self, incoming: Incoming, stream: Stream) -> None:
        mon = incoming.monitor
        assert mon is not None
        ours, qemus = socket.socketpair()
        try:
            await mon.getfd("migration-in", qemus.fileno())
        finally:
            qemus.close()
        await mon.command("migrate-incoming", uri="fd:migration-in")
        local = await asyncio.open_connection(sock=ours)
        await tunnel.splice(stream, local, None, "memory")

    async def _disk(self, incoming: Incoming, disk: str, stream: Stream) -> None:
        if incoming.mode != "mirror" or incoming.spec.disk(disk) is None:
            stream[1].close()
            return
        local = await asyncio.open_unix_connection(str(incoming.paths.run_dir / NBD_SOCKET))
        await tunnel.splice(stream, local, None, f"disk:{disk}")

    # --- finish --------------------------------------------------------------------

    async def _finish(self, incoming: Incoming) -> None:
        """The source has sent everything and stopped: make the VM this host's, run it."""
        mon = incoming.monitor
        assert mon is not None
        await _wait_loaded(mon)
        for export in incoming.exports:
            await mon.command("block-export-del", id=export, mode="hard")
        if incoming.exports:
            await mon.command("nbd-server-stop")
        # The one step that moves the VM (a crash before it: still the source's).
        paths = incoming.paths
        if incoming.mode == "mirror":
            save_spec(paths, incoming.spec)
        set_owner(paths.vm_dir, self.service.inventory.host_id)
        fsync_dir(paths.vm_dir)
        incoming.state = "committed"
        try:
            await mon.cont()
        except QemuError as exc:
            # It is this host's now, paused: an operator can resume it.
            log.error("vm %s: arrived but does not run: %s", incoming.spec.name, exc)
        self.service.emit(
            "vm.migrated", incoming.spec.name, "arrived by live migration", mode=incoming.mode
        )

    async def _commit_cold(self, incoming: Incoming) -> None:
        """A stopped VM's move: its files are here (mirror) or seen here (shared)."""
        paths = incoming.paths
        if incoming.mode == "mirror":
            if not incoming.made_dir:
                raise InvalidArgument("op", "no files arrived")
            disks = [
                d.model_copy(update={"path": f"{d.name}.{d.format}"}) for d in incoming.spec.disks
            ]
            incoming.spec = incoming.spec.model_copy(update={"disks": disks})
            self.service._check_paths(incoming.spec, paths)
            save_spec(paths, incoming.spec)
        set_owner(paths.vm_dir, self.service.inventory.host_id)
        fsync_dir(paths.vm_dir)
        incoming.state = "committed"
        self.service.emit("vm.migrated", incoming.spec.name, "arrived (cold migration)")

    # --- abort ---------------------------------------------------------------------

    async def abort(self, incoming: Incoming) -> None:
        """Throw away everything ``incoming`` made; the VM stays the source's."""
        if incoming.state in ("committed", "aborted"):
            return
        incoming.state = "aborted"
        self._forget(incoming)
        if incoming.monitor is not None:
            await incoming.monitor.close()
        service = self.service
        pid = process.running_pid(incoming.paths)
        if pid is not None:
            process.record_stop(incoming.paths, "migrate", "incoming migration abandoned")
            process.kill(pid, signal.SIGKILL)
            await process.wait_gone(incoming.paths, pid, 10)
            await service.vm_gone(incoming.spec)
        if incoming.made_dir:
            await asyncio.to_thread(shutil.rmtree, incoming.paths.vm_dir, True)
        shutil.rmtree(incoming.paths.run_dir, ignore_errors=True)
        incoming.record.unlink(missing_ok=True)
        log.info("vm %s: incoming migration %s abandoned", incoming.spec.name, incoming.id)

    def _forget(self, incoming: Incoming) -> None:
        if incoming.expiry is not None:
            incoming.expiry.cancel()
        self._by_token.pop(incoming.token, None)
        if incoming.state == "committed":
            incoming.record.unlink(missing_ok=True)
            if incoming.monitor is not None:
                asyncio.get_running_loop().create_task(incoming.monitor.close())

    async def close(self) -> None:
        for incoming in list(self._by_token.values()):
            await self.abort(incoming)

    def sweep(self) -> list[str]:
        """At start: end what a previous agent left half-way (blocking)."""
        swept = []
        for record_file in sorted(self.records.glob("*.json")):
            try:
                record = json.loads(record_file.read_text())
                paths = VmPaths(Path(record["vm_dir"]), Path(record["run_dir"]))
            except (OSError, ValueError, KeyError, TypeError):
                record_file.unlink(missing_ok=True)
                continue
            committed = owner_of(paths.vm_dir) == self.service.inventory.host_id
            if not committed:
                pid = process.running_pid(paths)
                if pid is not None:
                    process.kill(pid, signal.SIGKILL)
                if record.get("made_dir"):
                    shutil.rmtree(paths.vm_dir, ignore_errors=True)
                shutil.rmtree(paths.run_dir, ignore_errors=True)
                swept.append(str(record.get("vm")))
            record_file.unlink(missing_ok=True)
        return swept


async def _wait_loaded(mon: Monitor) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        info = await mon.command("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QemuError(f"loading the VM's state failed: {info.get('error-desc', status)}")
        await asyncio.sleep(0.01)
    raise QemuError(f"the VM's state did not arrive within {LOAD_TIMEOUT_S:.0f} s")


def _files_of(spec: VmSpec) -> list[str]:
    files = [d.path for d in spec.disks]
    if isinstance(spec.boot, KernelBoot):
        files += [spec.boot.kernel, *([spec.boot.initrd] if spec.boot.initrd else [])]
    if spec.cdrom is not None and spec.cdrom.path:
        files.append(spec.cdrom.path)
    return files


def _visible(paths: VmPaths, path: str) -> bool:
    return paths.resolve(path).is_file()


def _check_mirrorable(spec: VmSpec) -> None:
    for disk in spec.disks:
        if disk.format not in DISK_FORMATS:
            raise InvalidArgument(f"disks.{disk.name}.format", f"{disk.format} cannot be mirrored")
