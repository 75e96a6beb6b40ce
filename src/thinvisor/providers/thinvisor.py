"""The thinvisor provider: a thinvisor host agent over its REST API and event stream.

Every request carries the connection's credentials (HTTP Basic with the user name and
password, or a bearer token when the password is an API token, ``tv_...``); the agent
caches successful checks, so that costs a lookup, not a password hash. Every TLS
handshake checks the host's certificate against ``Connection.fingerprint`` before a byte
of a request is sent; with no fingerprint given, ``connect`` fails with
``CertificateMismatch`` carrying the fingerprint seen, for the operator to accept.

A VM's id is its name (names are unique on a host and never change). Long operations
answer 202 with a task, which is followed to its end; its error is raised.

Events come from the agent's WebSocket ``/events/stream``. The provider keeps the id of
the last event it saw (from ``connect`` on), so that a new stream after a reconnect
resumes with ``since`` and nothing in between is lost; where the agent dropped or
forgot events, the stream says ``RESYNC``.

High availability goes through the agent's ``/ha`` routes: the center's heartbeat, the
datastore heartbeats, and taking a dead host's VM over; ``HostRecord.host_id`` is the
agent's own id (``GET /host``), which its heartbeat files are named by.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from thinvisor.auth import TOKEN_PREFIX
from thinvisor.cli.remote import (
    API,
    PinnedContext,
    RemoteError,
    agent_url,
    error_from,
    error_of_response,
    pinned_context,
)
from thinvisor.errors import (
    CertificateMismatch,
    CredentialsRefused,
    InvalidArgument,
    InvalidState,
    NotFound,
    ProviderError,
    ThinvisorError,
    Unreachable,
    Unsupported,
)
from thinvisor.providers.base import (
    Capability,
    ChangeEvent,
    ChangeKind,
    Connection,
    ConsoleEndpoint,
    ConsoleKind,
    CreateVm,
    DatastoreRecord,
    ExportedDisk,
    ExportedVm,
    HeartbeatRecord,
    HostRecord,
    InventorySnapshot,
    MigrationOptions,
    MigrationProgress,
    MigrationTicket,
    NetworkRecord,
    PowerAction,
    PowerState,
    Provider,
    Reconfigure,
    SnapshotRecord,
    VmRecord,
)
from thinvisor.storage.disk import Images

VENDOR = "thinvisor"
USER_NETWORK = "user"  # QEMU's user networking: every host has it, no port group
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
PING_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 5.0  # the center's HA heartbeat: a host that takes longer is not heard
TASK_POLL_MAX_S = 0.25
SHUTDOWN_ASKED_S = 1.0  # how long a shutdown task is watched for an immediate refusal
MIGRATION_CANCEL_S = 30.0  # how long a cancelled migration is given to stop on its host
SERIAL_PORT = "serial0"
COPY_CHUNK = 1 << 20  # bytes per read of a file downloaded or uploaded
#: Where an imported VM's disk images wait in a datastore until the VM is made from
#: them (the datastore API keeps names starting with '.' for itself).
STAGING_DIR = "thinvisor-import"
#: Where an imported VM's kernel and initrd are kept in its datastore (a VM's own
#: directory takes no uploads; kernel boot reads them from here).
BOOT_FILES_DIR = "boot-files"
_FINISHED = ("success", "error")
_CLOSE_DROPPED = 1013  # the agent dropped the stream's subscriber: it fell behind

#: The agent's VM states; anything else (``invalid``) is unknown to the center.
POWER_STATES = {s.value: s for s in (PowerState.RUNNING, PowerState.STOPPED,
                                     PowerState.PAUSED, PowerState.SUSPENDED)}  # fmt: skip
#: The agent's route for each action; the task-answering ones are marked.
ACTION_ROUTES: dict[PowerAction, tuple[str, bool]] = {
    PowerAction.START: ("start", False),
    PowerAction.STOP: ("stop", False),
    PowerAction.RESET: ("reset", False),
    PowerAction.PAUSE: ("pause", False),
    PowerAction.SHUTDOWN: ("shutdown", True),
    PowerAction.RESUME: ("resume", True),
    PowerAction.SUSPEND: ("suspend", True),
}
#: Event kinds (prefixes) that change what a snapshot lists besides VMs.
RESYNC_KINDS = ("agent.started", "datastore.", "network.portgroup_")

Json = dict[str, Any]


def vm_path(name: str, *parts: str) -> str:
    """The API path of a VM, or of something under it."""
    return "/".join(["/vms", *(quote(p, safe="") for p in (name, *parts))])


def task_path(task_id: str, *parts: str) -> str:
    """The API path of a task, or of an action on it."""
    return "/".join(["/tasks", quote(task_id, safe=""), *parts])


def auth_header(username: str | None, password: str | None) -> dict[str, str]:
    """The Authorization header for these credentials (none without a password)."""
    if not password:
        return {}
    if password.startswith(TOKEN_PREFIX):
        return {"Authorization": f"Bearer {password}"}
    basic = base64.b64encode(f"{username or ''}:{password}".encode()).decode()
    return {"Authorization": f"Basic {basic}"}


# --- From the API's answers to records ------------------------------------------------


def host_record(host: Json) -> HostRecord:
    """A ``HostRecord`` from ``GET /host``."""
    kept: Json = host.get("host_reservation") or {}
    return HostRecord(
        name=host["hostname"],
        vendor=VENDOR,
        version=host["thinvisor_version"],
        cpus=host["cpus"],
        memory_mib=host["memory_total_mib"],
        maintenance=bool(host.get("maintenance", False)),
        host_id=host.get("host_id"),
        core_mhz=host.get("core_mhz", 0),
        cpu_load=host.get("cpu_load"),
        reserved_cpu_mhz=kept.get("cpu_mhz", 0),
        reserved_memory_mib=kept.get("memory_mib", 0),
    )


def disk_datastore(path: str, own: str, datastores: dict[str, str]) -> str:
    """The datastore holding a disk: its VM's (``own``) for a path relative to the VM's
    directory, else the one whose directory holds it (``datastores``: name -> path)."""
    disk = PurePosixPath(path)
    if not disk.is_absolute():
        return own
    holding = [n for n, p in datastores.items() if disk.is_relative_to(PurePosixPath(p))]
    return max(holding, key=lambda n: len(datastores[n]), default=own)


def vm_record(vm: Json, datastores: dict[str, str]) -> VmRecord:
    """A ``VmRecord`` from the API's ``VmOut`` (an invalid VM has no spec: unknown)."""
    spec: Json = vm.get("spec") or {}
    resources: Json = spec.get("resources") or {}
    own = vm["datastore"]
    stores = [own, *(disk_datastore(d["path"], own, datastores) for d in spec.get("disks", []))]
    return VmRecord(
        id=vm["name"],
        name=vm["name"],
        power_state=POWER_STATES.get(vm["state"], PowerState.UNKNOWN),
        cpus=spec.get("vcpus", 0),
        memory_mib=spec.get("memory_mib", 0),
        template=bool(spec.get("template", False)),
        datastores=tuple(dict.fromkeys(stores)),
        networks=tuple(dict.fromkeys(n["network"] for n in spec.get("nics", []))),
        uuid=vm.get("uuid"),
        reserved_cpu_mhz=resources.get("cpu_reservation_mhz", 0),
        reserved_memory_mib=resources.get("memory_reservation_mib", 0),
    )


def heartbeat_record(beat: Json) -> HeartbeatRecord:
    """A ``HeartbeatRecord`` from the API's ``HeartbeatOut``."""
    return HeartbeatRecord(host_id=str(beat["host"]), seq=int(beat["seq"]), age_s=beat["age_s"])


def snapshot_record(snap: Json) -> SnapshotRecord:
    """A ``SnapshotRecord`` from the API's ``SnapshotOut``."""
    parent = snap.get("parent")
    return SnapshotRecord(
        id=str(snap["id"]),
        name=snap["name"],
        parent=None if parent is None else str(parent),
        current=bool(snap.get("current")),
        memory=bool(snap.get("memory")),
        created=snap.get("created"),
    )


def datastore_record(ds: Json) -> DatastoreRecord:
    return DatastoreRecord(
        id=ds["name"],
        name=ds["name"],
        capacity_bytes=ds.get("capacity_bytes"),
        free_bytes=ds.get("free_bytes"),
    )


def file_path(datastore: str, relpath: str) -> str:
    """The route of a file in a datastore."""
    return f"/datastores/{quote(datastore, safe='')}/files/{quote(relpath)}"


def datastore_file(path: str, vm: str, own: str, datastores: dict[str, str]) -> tuple[str, str]:
    """``(datastore, path inside it)`` of a file a VM's spec names: relative to the VM's
    directory in its own datastore ``own``, or absolute inside one of ``datastores``."""
    if not PurePosixPath(path).is_absolute():
        return own, f"{vm}/{path}"
    name = disk_datastore(path, own, datastores)
    root = datastores.get(name)
    if root is None or not PurePosixPath(path).is_relative_to(PurePosixPath(root)):
        raise Unsupported(f"vm {vm!r}: {path} is in none of the host's datastores")
    return name, str(PurePosixPath(path).relative_to(PurePosixPath(root)))


def create_body(spec: CreateVm) -> Json:
    """The ``POST /vms`` body of a VM made from scratch."""
    body: Json = {"name": spec.name, "vcpus": spec.cpus, "memory_mib": spec.memory_mib}
    if spec.disk_mib is not None:
        body["disks"] = [{"size": spec.disk_mib << 20}]
    if spec.network is not None:
        body["nics"] = [{"network": spec.network}]
    return body


# --- The REST client --------------------------------------------------------------------


class AgentApi:
    """Requests to one agent, with its errors translated into thinvisor's."""

    def __init__(
        self,
        address: str,
        base: str,
        headers: dict[str, str],
        fingerprint: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.address = address
        self.base = base
        self.headers = headers
        self.tls: PinnedContext | None = (
            pinned_context(fingerprint) if base.startswith("https:") else None
        )
        self._transport = transport  # None: the network (tests pass their own)
        self._client: httpx.AsyncClient | None = None

    @property
    def host(self) -> str:
        """The agent's host name or IP address, as the center reaches it."""
        return httpx.URL(self.base).host

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client, made on first use (in the event loop that uses it)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base + API,
                verify=self.tls or True,
                timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                trust_env=False,
                transport=self._transport,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        auth: bool = True,
    ) -> httpx.Response:
        """One request; transport failures and error answers raise thinvisor errors.
        Credentials go only to a host whose certificate is pinned (``auth``)."""
        if auth:
            await self.refuse_unpinned()
        wait = self.client.timeout if timeout is None else httpx.Timeout(timeout)
        headers = self.headers if auth else None
        try:
            response = await self.client.request(
                method, path, json=body, params=params, headers=headers, timeout=wait
            )
        except httpx.TransportError as exc:
            raise self.transport_error(exc) from exc
        if response.status_code >= 400:
            raise self.answer_error(response)
        return response

    async def refuse_unpinned(self) -> None:
        """``CertificateMismatch`` naming the host's fingerprint, unless one is pinned
        (or the agent is reached over plain HTTP)."""
        if self.tls is None or self.tls.pinned is not None:
            return
        if self.tls.seen is None:
            await self.call("GET", "/health", auth=False)  # learn the fingerprint
        raise CertificateMismatch(self.address, self.tls.seen or "(none)", None)

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer's body; for a 202, the result of its task, followed to the end."""
        response = await self.call(method, path, **kwargs)
        if response.status_code == 202:
            return await self.wait_task(response.json())
        return response.json() if response.content else None

    async def wait_task(
        self,
        task: Json,
        *,
        limit: float | None = None,
        progress: MigrationProgress | None = None,
    ) -> Any:
        """A task's result once it succeeded; its error raised once it failed. With
        ``limit``, give up waiting after that many seconds (the task goes on): None."""
        done = await self.finished_task(task, limit=limit, progress=progress)
        if done is None:
            return None
        if done["state"] == "error":
            error = done.get("error") or {}
            message = str(error.get("message", f"task {done['kind']} failed"))
            raise self._translated(error_from(str(error.get("error")), message))
        return done.get("result")

    async def finished_task(
        self,
        task: Json,
        *,
        limit: float | None = None,
        progress: MigrationProgress | None = None,
    ) -> Json | None:
        """The task once it finished, asked about again and again (``progress`` told
        how far it is each time); None once ``limit`` seconds passed, where given."""
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        delay = 0.02
        while True:
            if progress is not None:
                progress(int(task.get("progress") or 0), str(task.get("message") or ""))
            if task["state"] in _FINISHED:
                return task
            if deadline is not None and loop.time() >= deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, TASK_POLL_MAX_S)
            task = (await self.call("GET", task_path(task["id"]))).json()

    async def download(self, path: str, target: Path) -> None:
        """Stream the file the agent serves at ``path`` into the new file ``target``."""
        await self.refuse_unpinned()
        try:
            async with self.client.stream("GET", path, headers=self.headers) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self.answer_error(response)
                with target.open("xb") as out:
                    async for chunk in response.aiter_bytes(COPY_CHUNK):
                        await asyncio.to_thread(out.write, chunk)
        except httpx.TransportError as exc:
            raise self.transport_error(exc) from exc

    async def upload(self, path: str, source: Path) -> None:
        """Stream the local file ``source`` to the agent's ``PUT path`` (a datastore file)."""
        await self.refuse_unpinned()

        async def chunks() -> AsyncIterator[bytes]:
            with source.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, COPY_CHUNK):
                    yield chunk

        headers = {**self.headers, "content-length": str(source.stat().st_size)}
        try:
            response = await self.client.request(
                "PUT", path, content=chunks(), headers=headers, timeout=httpx.Timeout(None)
            )
        except httpx.TransportError as exc:
            raise self.transport_error(exc) from exc
        if response.status_code >= 400:
            raise self.answer_error(response)

    def transport_error(
        self, exc: httpx.TransportError | OSError | InvalidHandshake
    ) -> ThinvisorError:
        """No answer: a certificate that is not the pinned one, or no connection."""
        if self.tls is not None and self.tls.mismatch and self.tls.seen is not None:
            return CertificateMismatch(self.address, self.tls.seen, self.tls.pinned)
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return Unreachable(f"{self.address}: no answer in time ({type(exc).__name__})")
        return Unreachable(f"{self.address}: cannot connect: {exc or type(exc).__name__}")

    def answer_error(self, response: httpx.Response) -> ThinvisorError:
        """The error an error answer stands for."""
        error = error_of_response(response)
        if response.status_code in (401, 429):  # 429: refused so often it is slowed down
            return CredentialsRefused(f"{self.address}: the host refused the credentials: {error}")
        return self._translated(error)

    def _translated(self, error: ThinvisorError) -> ThinvisorError:
        if isinstance(error, RemoteError):  # no counterpart: 403, an unknown code
            return ProviderError(f"{self.address}: {error}")
        return error


# --- The event stream ---------------------------------------------------------------------


class EventStream:
    """The agent's events as ``ChangeEvent``, resuming after ``last_id``."""

    def __init__(self, provider: ThinvisorProvider) -> None:
        self.provider = provider
        self.api = provider.api

    def url(self) -> str:
        since = self.provider.last_event_id
        query = f"?since={since}" if since is not None else ""
        return "ws" + self.api.base.removeprefix("http") + f"{API}/events/stream{query}"

    async def open(self) -> ClientConnection:
        await self.api.refuse_unpinned()
        try:
            return await ws_connect(
                self.url(),
                ssl=self.api.tls,
                additional_headers=self.api.headers,
                proxy=None,
                open_timeout=CONNECT_TIMEOUT_S + 5,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 429):
                raise CredentialsRefused(
                    f"{self.api.address}: the event stream was refused"
                ) from exc
            raise ProviderError(
                f"{self.api.address}: the event stream was refused (HTTP {status})"
            ) from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise self.api.transport_error(exc) from exc

    async def __aiter__(self) -> AsyncIterator[ChangeEvent]:
        while True:
            async with await self.open() as ws:
                try:
                    async for message in ws:
                        for change in await self.changes(json.loads(message)):
                            yield change
                except ConnectionClosed as exc:
                    if exc.rcvd is None or exc.rcvd.code != _CLOSE_DROPPED:
                        raise Unreachable(f"{self.api.address}: the event stream broke") from exc
                    yield ChangeEvent(ChangeKind.RESYNC, f"{self.api.address}: events were dropped")
                    continue  # resume after the last event seen
            raise Unreachable(f"{self.api.address}: the agent closed the event stream")

    async def changes(self, event: Json) -> list[ChangeEvent]:
        """What one agent event means to the center (often nothing). Events already
        seen are skipped (a resumed stream may repeat some); a gap in the ids means the
        agent forgot events (its log rotated): ``RESYNC`` first."""
        last = self.provider.last_event_id
        if last is not None and event["id"] <= last:
            return []
        self.provider.last_event_id = event["id"]
        found: list[ChangeEvent] = []
        if last is not None and event["id"] > last + 1:
            found.append(ChangeEvent(ChangeKind.RESYNC, f"{self.api.address}: events were lost"))
        change = await self.change(event)
        return found + ([change] if change is not None else [])

    async def change(self, event: Json) -> ChangeEvent | None:
        kind, obj, user = event["kind"], event.get("object") or "", event.get("user")
        if obj.startswith("vm/"):
            return await self.vm_change(obj.removeprefix("vm/"), event)
        if kind.startswith(RESYNC_KINDS):
            return ChangeEvent(ChangeKind.RESYNC, event["message"], peer_kind=kind, user=user)
        if kind.startswith("host.maintenance"):
            host = host_record(await self.api.json("GET", "/host"))
            message = f"{host.name}: {event['message']}"
            return ChangeEvent(
                ChangeKind.HOST_CHANGED, message, host=host, peer_kind=kind, user=user
            )
        return None

    async def vm_change(self, name: str, event: Json) -> ChangeEvent:
        """A VM's event, with the VM as it is now (removed if it is gone)."""
        message = f"{name}: {event['message']}"
        kind, user = event["kind"], event.get("user")
        if kind != "vm.deleted":
            try:
                vm = await self.provider.get_vm(name)
            except NotFound:
                pass
            else:
                return ChangeEvent(ChangeKind.VM_CHANGED, message, name, vm, None, kind, user)
        return ChangeEvent(ChangeKind.VM_REMOVED, message, name, None, None, kind, user)


# --- The provider -----------------------------------------------------------------------------


class ThinvisorProvider(Provider):
    """A thinvisor host agent at ``connection.address`` (``https://host:8443``)."""

    kind: ClassVar[str] = "thinvisor"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(Capability)

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        headers = auth_header(connection.username, connection.password)
        base = agent_url(connection.address)
        self.api = AgentApi(connection.address, base, headers, connection.fingerprint)
        self.last_event_id: int | None = None
        self._datastores: dict[str, str] = {}  # name -> directory, for VMs' disks

    # --- Connecting ---

    async def connect(self) -> HostRecord:
        host = host_record(await self.api.json("GET", "/host"))
        newest = await self.api.json("GET", "/events", params={"limit": 1})
        newest_id = newest[-1]["id"] if newest else 0
        # Resume where the last stream stopped, unless the agent's log started over.
        if self.last_event_id is None or newest_id < self.last_event_id:
            self.last_event_id = newest_id
        return host

    async def close(self) -> None:
        await self.api.close()

    async def ping(self) -> None:
        await self.api.call("GET", "/health", auth=False, timeout=PING_TIMEOUT_S)

    async def set_maintenance(self, on: bool) -> HostRecord:
        """Enter (refused while VMs run: the center evacuates first) or leave it."""
        await self.api.json("POST", "/host/maintenance", body={"maintenance": on})
        return host_record(await self.api.json("GET", "/host"))

    async def snapshot(self) -> InventorySnapshot:
        host, vms, stores, groups = await asyncio.gather(
            self.api.json("GET", "/host"),
            self.api.json("GET", "/vms"),
            self.api.json("GET", "/datastores"),
            self.api.json("GET", "/networks/portgroups"),
        )
        self._datastores = {d["name"]: d["path"] for d in stores}
        networks = [USER_NETWORK, *(g["name"] for g in groups)]
        return InventorySnapshot(
            host=host_record(host),
            vms=tuple(vm_record(v, self._datastores) for v in vms),
            datastores=tuple(datastore_record(d) for d in stores),
            networks=tuple(NetworkRecord(n, n) for n in networks),
        )

    def events(self) -> AsyncIterator[ChangeEvent]:
        return aiter(EventStream(self))

    # --- VMs ---

    async def get_vm(self, vm_id: str) -> VmRecord:
        """One VM as it is now."""
        return await self._record(await self.api.json("GET", vm_path(vm_id)))

    async def _record(self, vm: Json) -> VmRecord:
        if not self._datastores:
            stores = await self.api.json("GET", "/datastores")
            self._datastores = {d["name"]: d["path"] for d in stores}
        return vm_record(vm, self._datastores)

    async def power(self, vm_id: str, action: PowerAction) -> VmRecord:
        route, is_task = ACTION_ROUTES[action]
        response = await self.api.call("POST", vm_path(vm_id, route))
        if not is_task:
            return await self._record(response.json())
        # A shutdown's task lasts until the guest is off; it is asked once the task runs.
        limit = SHUTDOWN_ASKED_S if action == PowerAction.SHUTDOWN else None
        result = await self.api.wait_task(response.json(), limit=limit)
        return await self._record(result) if result else await self.get_vm(vm_id)

    async def create(self, spec: CreateVm) -> VmRecord:
        if spec.template is None:
            return await self._record(await self.api.json("POST", "/vms", body=create_body(spec)))
        body = {"name": spec.name}
        deployed = await self.api.json("POST", vm_path(spec.template, "deploy"), body=body)
        made = await self._record(deployed)
        try:
            return await self._fit(made, spec)
        except ThinvisorError:
            with contextlib.suppress(ThinvisorError):  # the first error is the one to tell
                await self.delete(made.id)  # not half made
            raise

    async def _fit(self, vm: VmRecord, spec: CreateVm) -> VmRecord:
        """A VM deployed from a template, given the CPUs, memory and network asked for."""
        if spec.network is not None and spec.network not in vm.networks:
            nics = await self.api.json("GET", vm_path(vm.id, "nics"))
            if not nics:
                raise InvalidArgument(
                    "network", f"template {spec.template!r} has no NIC to connect"
                )
            body = {"network": spec.network}
            await self.api.call("PATCH", vm_path(vm.id, "nics", nics[0]["name"]), body=body)
        if (vm.cpus, vm.memory_mib) == (spec.cpus, spec.memory_mib):
            return await self.get_vm(vm.id)
        return await self.reconfigure(vm.id, Reconfigure(spec.cpus, spec.memory_mib))

    async def delete(self, vm_id: str) -> None:
        vm: Json = await self.api.json("GET", vm_path(vm_id))
        await self.api.call("DELETE", vm_path(vm_id))
        await self._remove_boot_files(vm)

    async def _remove_boot_files(self, vm: Json) -> None:
        """Delete the kernel and initrd that ``import_vm`` put in ``boot-files/`` for a VM
        now deleted, and their folder, unless another VM (a clone) boots from them; as far
        as the agent lets us: best effort."""
        boot: Json = (vm.get("spec") or {}).get("boot") or {}
        # Imports name theirs by absolute paths; a VM's own files are relative to its folder.
        imported = [
            path
            for key in ("kernel", "initrd")
            if isinstance(path := boot.get(key), str)
            and PurePosixPath(path).is_absolute()
            and BOOT_FILES_DIR in PurePosixPath(path).parts
        ]
        if not imported:
            return
        others: list[Json] = await self.api.json("GET", "/vms")
        used = {
            other["spec"]["boot"].get(key)
            for other in others
            if (other.get("spec") or {}).get("boot")
            for key in ("kernel", "initrd")
        }
        roots = await self._datastore_roots()
        folders: set[tuple[str, str]] = set()
        for path in imported:
            if path in used:
                continue
            try:
                store, relpath = datastore_file(path, vm["name"], vm["datastore"], roots)
            except ThinvisorError:
                continue
            parts = PurePosixPath(relpath).parts
            if len(parts) == 3 and parts[0] == BOOT_FILES_DIR:
                with contextlib.suppress(ThinvisorError):
                    await self.api.call("DELETE", file_path(store, relpath))
                folders.add((store, f"{parts[0]}/{parts[1]}"))
        # The folder, then boot-files/ itself unless other imports use it.
        for store, folder in [*sorted(folders), *sorted({(s, BOOT_FILES_DIR) for s, _ in folders})]:
            with contextlib.suppress(ThinvisorError):
                await self.api.call("DELETE", file_path(store, folder))

    async def reconfigure(self, vm_id: str, change: Reconfigure) -> VmRecord:
        body: Json = {}
        if change.cpus is not None:
            body["vcpus"] = change.cpus
        if change.memory_mib is not None:
            body["memory_mib"] = change.memory_mib
        return await self._record(await self.api.json("PATCH", vm_path(vm_id), body=body))

    async def clone(self, vm_id: str, name: str) -> VmRecord:
        body = {"name": name}
        return await self._record(await self.api.json("POST", vm_path(vm_id, "clone"), body=body))

    # --- Snapshots ---

    async def snapshots(self, vm_id: str) -> list[SnapshotRecord]:
        tree = await self.api.json("GET", vm_path(vm_id, "snapshots"))
        return [snapshot_record(s) for s in tree["snapshots"]]

    async def create_snapshot(self, vm_id: str, name: str) -> SnapshotRecord:
        body = {"name": name}
        return snapshot_record(await self.api.json("POST", vm_path(vm_id, "snapshots"), body=body))

    async def revert_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord:
        await self.api.json("POST", vm_path(vm_id, "snapshots", snapshot_id, "revert"))
        return snapshot_record(await self.api.json("GET", vm_path(vm_id, "snapshots", snapshot_id)))

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> None:
        await self.api.json("DELETE", vm_path(vm_id, "snapshots", snapshot_id))

    # --- Consoles ---

    async def console(self, vm_id: str, kind: ConsoleKind) -> ConsoleEndpoint:
        vm: Json = await self.api.json("GET", vm_path(vm_id))
        spec: Json = vm.get("spec") or {}
        path = vm_path(vm["name"], "console", kind.value)
        if kind == ConsoleKind.SERIAL:
            _require_device(
                vm["name"], "serial port", [s["name"] for s in spec.get("serials", [])], SERIAL_PORT
            )
            path += f"?port={SERIAL_PORT}"
        elif spec.get("graphics", {}).get("kind") != "vnc":
            raise InvalidArgument("kind", f"vm {vm['name']!r} has no graphical console")
        return ConsoleEndpoint(
            kind=kind,
            url="ws" + self.api.base.removeprefix("http") + API + path,
            headers=dict(self.api.headers),
            fingerprint=self.api.tls.pinned if self.api.tls is not None else None,
        )

    # --- High availability ---

    async def ha_heartbeat(self, timeout_s: float) -> bool:
        body = {"timeout_s": timeout_s}
        answer: Json = await self.api.json(
            "POST", "/ha/heartbeat", body=body, timeout=HEARTBEAT_TIMEOUT_S
        )
        return bool(answer["fenced"])

    async def datastore_heartbeats(self, datastore: str) -> list[HeartbeatRecord]:
        beats = await self.api.json("GET", "/ha/heartbeats", params={"datastore": datastore})
        return [heartbeat_record(b) for b in beats]

    async def recover(self, vm_name: str, datastore: str) -> VmRecord:
        body = {"vm": vm_name, "datastore": datastore, "start": True}
        return await self._record(await self.api.json("POST", "/ha/recover", body=body))

    # --- Live migration ---

    # --- Moving a stopped VM to another kind of host ---

    async def export_vm(self, vm_id: str, directory: Path) -> ExportedVm:
        """The stopped VM's disks downloaded from its datastores and converted to qcow2
        there (a disk with a backing file is refused), its kernel and initrd downloaded.
        Its NICs, CD-ROM and snapshots do not move (one with snapshots is refused)."""
        vm = await self.api.json("GET", vm_path(vm_id))
        if vm["state"] != PowerState.STOPPED.value:
            raise InvalidState(vm_id, vm["state"], "export")
        if (await self.api.json("GET", vm_path(vm_id, "snapshots")))["snapshots"]:
            raise Unsupported(f"vm {vm_id!r} has snapshots: delete them before it moves")
        await self._record(vm)  # learns the datastores' directories
        spec: Json = vm["spec"]
        disks = []
        for disk in spec.get("disks", []):
            fetched = await self._fetch(vm, disk["path"], directory / f"{disk['name']}.orig")
            disks.append(await _flattened(vm_id, disk["name"], fetched))
        boot: Json = spec.get("boot") or {}
        kernel = initrd = None
        if boot.get("kind") == "kernel":
            kernel = await self._fetch(vm, boot["kernel"], directory / "vmlinuz")
            if boot.get("initrd"):
                initrd = await self._fetch(vm, boot["initrd"], directory / "initrd.img")
        return ExportedVm(
            name=vm["name"],
            cpus=spec["vcpus"],
            memory_mib=spec["memory_mib"],
            disks=tuple(disks),
            kernel=kernel,
            initrd=initrd,
            cmdline=boot.get("cmdline") if kernel is not None else None,
        )

    async def _fetch(self, vm: Json, path: str, target: Path) -> Path:
        """Download a file the VM's spec names into ``target``."""
        where = datastore_file(path, vm["name"], vm["datastore"], self._datastores)
        await self.api.download(file_path(*where), target)
        return target

    async def import_vm(self, exported: ExportedVm, datastore: str | None) -> VmRecord:
        """Upload the disks into a staging directory of the datastore, create the VM
        importing them, then point its kernel boot at the kernel and initrd uploaded to
        ``boot-files/<vm>-<id>/``; the staging files are deleted whether it worked or not."""
        store = datastore or await self._default_datastore()
        staging = f"{STAGING_DIR}/{exported.name}-{uuid.uuid4().hex[:8]}"
        uploaded: list[str] = []
        try:
            body = await self._import_body(exported, store, staging, uploaded)
            made = await self.api.json("POST", "/vms", body=body)
            if exported.kernel is not None:
                try:
                    boot = await self._boot_files(exported, store, staging.split("/")[1])
                    made = await self.api.json("PATCH", vm_path(made["name"]), body=boot)
                except BaseException:
                    with contextlib.suppress(ThinvisorError):  # the first error is the one
                        await self.delete(made["name"])
                    raise
            return await self._record(made)
        finally:
            await self._remove_staged(store, staging, uploaded)

    async def _default_datastore(self) -> str:
        """Where an imported VM goes when no datastore is asked for."""
        stores = await self.api.json("GET", "/datastores")
        if not stores:
            raise InvalidArgument("datastore", f"{self.connection.address} has no datastore")
        return str(stores[0]["name"])  # the agent's first, as it lists them

    async def _import_body(
        self, exported: ExportedVm, store: str, staging: str, uploaded: list[str]
    ) -> Json:
        """The ``POST /vms`` body, each disk uploaded to ``staging`` first (and listed in
        ``uploaded``). The VM firmware-boots until its kernel is in place."""
        roots = await self._datastore_roots()
        if store not in roots:
            raise InvalidArgument(
                "datastore", f"{self.connection.address} has no datastore {store!r}"
            )
        disks = []
        for disk in exported.disks:
            relpath = f"{staging}/{disk.name}.{disk.format}"
            uploaded.append(relpath)
            await self.api.upload(file_path(store, relpath), disk.path)
            disks.append({"source": f"{roots[store]}/{relpath}", "format": "qcow2"})
        return {
            "name": exported.name,
            "vcpus": exported.cpus,
            "memory_mib": exported.memory_mib,
            "datastore": store,
            "disks": disks,
        }

    async def _boot_files(self, exported: ExportedVm, store: str, tag: str) -> Json:
        """Upload the kernel and initrd; the ``PATCH`` body that boots from them."""
        roots = await self._datastore_roots()
        folder = f"{BOOT_FILES_DIR}/{tag}"
        boot: Json = {"kind": "kernel", "cmdline": exported.cmdline or ""}
        for key, local, name in (
            ("kernel", exported.kernel, "vmlinuz"),
            ("initrd", exported.initrd, "initrd.img"),
        ):
            if local is not None:
                await self.api.upload(file_path(store, f"{folder}/{name}"), local)
                boot[key] = f"{roots[store]}/{folder}/{name}"
        return {"boot": boot}

    async def _datastore_roots(self) -> dict[str, str]:
        stores = await self.api.json("GET", "/datastores")
        self._datastores = {d["name"]: d["path"] for d in stores}
        return self._datastores

    async def _remove_staged(self, store: str, staging: str, uploaded: list[str]) -> None:
        """Delete the staged files and their directory, as far as the agent lets us."""
        for relpath in [*uploaded, staging, STAGING_DIR]:  # the last: unless others use it
            with contextlib.suppress(ThinvisorError):
                await self.api.call("DELETE", file_path(store, relpath))

    async def migration_spec(self, vm_id: str) -> dict[str, Any]:
        vm: Json = await self.api.json("GET", vm_path(vm_id))
        spec: Json | None = vm.get("spec")
        if spec is None:  # its vm.toml cannot be read: nothing to send
            raise InvalidState(vm["name"], vm["state"], "migrate")
        return spec

    async def prepare_incoming(
        self, spec: dict[str, Any], options: MigrationOptions
    ) -> MigrationTicket:
        body = {"vm": spec, "mode": "auto", "datastore": options.datastore, "live": options.live}
        answer: Json = await self.api.json("POST", "/migrations/incoming", body=body)
        return MigrationTicket(
            id=str(answer["id"]),
            token=str(answer["token"]),
            address=self.api.host,
            port=int(answer["port"]),
            fingerprint=str(answer["fingerprint"]),
            mode=str(answer["mode"]),
        )

    async def migrate(
        self,
        vm_id: str,
        ticket: MigrationTicket,
        options: MigrationOptions,
        progress: MigrationProgress | None = None,
    ) -> dict[str, Any]:
        # Shielded: a cancel while the request is on its way must still learn the
        # task it started, to cancel that.
        body = migrate_body(ticket, options)
        sent = asyncio.ensure_future(self.api.call("POST", vm_path(vm_id, "migrate"), body=body))
        task: Json | None = None
        try:
            task = (await asyncio.shield(sent)).json()
            result: dict[str, Any] = await self.api.wait_task(task, progress=progress)
        except asyncio.CancelledError:
            done = await self._abort(task if task is not None else sent)
            if done is None or done["state"] != "success":
                raise
            # It finished before the cancel reached it: the VM is there, so say that.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            result = done.get("result") or {}
        return result

    async def _abort(self, started: Json | asyncio.Future[httpx.Response]) -> Json | None:
        """Cancel a migration's task on the agent (``started``: the task, or the request
        that is starting it) and wait a while for it to end; the task once ended, None if
        there is none or the agent does not say."""
        try:
            async with asyncio.timeout(MIGRATION_CANCEL_S):
                task: Json = started if isinstance(started, dict) else (await started).json()
                with contextlib.suppress(ThinvisorError):  # it finished already, say
                    await self.api.call("POST", task_path(task["id"], "cancel"))
                task = (await self.api.call("GET", task_path(task["id"]))).json()
                return await self.api.finished_task(task)
        except (ThinvisorError, TimeoutError):
            return None


async def _flattened(vm: str, name: str, fetched: Path) -> ExportedDisk:
    """``fetched`` (a downloaded disk image) converted into one qcow2 image next to it."""
    images = Images()
    info = await images.info(fetched)
    if info.backing_file:
        raise Unsupported(
            f"vm {vm!r}: disk {name} is an overlay on {info.backing_file}:"
            " flatten it on the host before it moves"
        )
    target = fetched.with_name(f"{name}.qcow2")
    await images.convert(fetched, target, "qcow2", source_format=info.format)
    fetched.unlink()
    return ExportedDisk(name=name, path=target, format="qcow2")


def migrate_body(ticket: MigrationTicket, options: MigrationOptions) -> Json:
    """The ``POST /vms/{name}/migrate`` body that sends a VM where ``ticket`` says."""
    return {
        "address": ticket.address,
        "port": ticket.port,
        "fingerprint": ticket.fingerprint,
        "token": ticket.token,
        "mode": ticket.mode,
        "downtime_ms": options.downtime_ms,
        "auto_converge": options.auto_converge,
        "bandwidth_mib_s": options.bandwidth_mib_s,
        "memory_copy": options.memory_copy,
    }


def _require_device(vm: str, what: str, names: Sequence[str], name: str) -> None:
    if name not in names:
        raise InvalidArgument("kind", f"vm {vm!r} has no {what} {name!r}")


PROVIDER = ThinvisorProvider
