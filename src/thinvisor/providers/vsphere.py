"""The vsphere provider: one vCenter or ESXi endpoint through pyVmomi.

One provider is one endpoint, whatever it holds: the ``HostRecord`` is the endpoint (a
vCenter's instance name, or the ESXi host's name) with the CPUs and memory of all its
hosts summed, and the snapshot lists every VM and template it can see. ``VmRecord.id`` is
the VM's managed object id (``vm-42``), a snapshot's id its snapshot's (``snapshot-7``).

What it can do, and what it leaves out:

- POWER: start (which also resumes a suspended VM), stop, shutdown (a request to the
  guest's VMware Tools), reset. SUSPEND is left out: its core is pause, and vSphere has no
  pause, only suspend-to-disk.
- CREATE in the first datacenter's VM folder on the first compute resource's root pool
  and its first datastore; TEMPLATES and CLONE through ``CloneVM_Task``; DELETE;
  RECONFIGURE of a stopped VM; SNAPSHOT (of the disks, without the VM's memory).
- EVENTS: a property collector of its own waits for changes (``WaitForUpdatesEx``) to
  the VMs, hosts, datastores and networks, in a thread of the stream's own. The collector
  is made at ``connect()``: the endpoint holds every change from then on until a stream
  asks for it, so the first ``events()`` streams what happened since ``connect()`` and
  each later one continues where the one before stopped. The endpoint merges what waits
  into one update per object, so nothing grows unbounded on either side; should it have
  forgotten the collector's version, the stream says ``RESYNC`` and starts afresh.
- CONSOLE is left out: vSphere's way in is a WebMKS ticket (``AcquireTicket``), which
  the center does not broker. MAINTENANCE is left out: an endpoint may hold many hosts,
  and the capability is the endpoint's.

Certificates are pinned, never checked against a CA: every TLS connection compares the
server certificate's SHA-256 fingerprint with ``Connection.fingerprint`` before a byte
of the request (or the password) is sent. pyVmomi blocks, so every call runs in a worker
thread; its faults are translated here, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pyVim.connect
import pyVmomi

from thinvisor.errors import (
    AlreadyExists,
    CertificateMismatch,
    CredentialsRefused,
    InvalidArgument,
    InvalidState,
    NotFound,
    ProviderError,
    ThinvisorError,
    Unreachable,
)
from thinvisor.providers.base import (
    SUSPEND_ACTIONS,
    Capability,
    ChangeEvent,
    ChangeKind,
    Connection,
    CreateVm,
    DatastoreRecord,
    HostRecord,
    InventorySnapshot,
    NetworkRecord,
    PowerAction,
    PowerState,
    Provider,
    Reconfigure,
    SnapshotRecord,
    VmRecord,
)
from thinvisor.tls import fingerprint_der

T = TypeVar("T")

# pyVmomi's stubs leave its data object constructors untyped; its objects are handled
# as Any here, and their values checked where they become records.
vim: Any = pyVmomi.vim
vmodl: Any = pyVmomi.vmodl
_smart_stub: Callable[..., Any] = pyVim.connect.SmartStubAdapter

DEFAULT_PORT = 443
CONNECT_TIMEOUT_S = 10.0
WAIT_UPDATES_S = 10
"""How long one ``WaitForUpdatesEx`` waits for a change before it asks again."""
MAX_OBJECT_UPDATES = 1000
"""The most object updates one ``WaitForUpdatesEx`` answer holds (the rest come next)."""
CANCEL_RETRY_S = 0.5
"""How often a stream that ends asks again to cancel a wait that has not ended yet."""
HTTP_TIMEOUT_S = 30.0
"""Longer than one update wait: a call answered later than this finds the host gone."""
TASK_POLL_MAX_S = 1.0
MIB = 1024 * 1024

PC = vmodl.query.PropertyCollector

_POWER_STATES = {
    "poweredOn": PowerState.RUNNING,
    "poweredOff": PowerState.STOPPED,
    "suspended": PowerState.SUSPENDED,
}
_STATE_WORDS = {
    "poweredOn": "running",
    "poweredOff": "stopped",
    "suspended": "suspended",
    "template": "a template",
}

#: The power states (vSphere's words) in which each action may be asked.
_ALLOWED = {
    PowerAction.START: {"poweredOff", "suspended"},
    PowerAction.STOP: {"poweredOn", "suspended"},
    PowerAction.SHUTDOWN: {"poweredOn"},
    PowerAction.RESET: {"poweredOn"},
}

#: The properties read of each kind of object, for snapshots and events alike.
_VM_PATHS = [
    "name",
    "runtime.powerState",
    "config.template",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.uuid",
    "config.cpuAllocation.reservation",
    "config.memoryAllocation.reservation",
    "datastore",
    "network",
]
_HOST_PATHS = [
    "name",
    "summary.hardware.numCpuThreads",
    "summary.hardware.memorySize",
    "summary.hardware.cpuMhz",
    "runtime.inMaintenanceMode",
]
_DATASTORE_PATHS = ["name", "summary.capacity", "summary.freeSpace"]
_NETWORK_PATHS = ["name"]


# --- Reaching the endpoint ------------------------------------------------------------


def _endpoint(address: str) -> tuple[str, int]:
    """Host and port of ``https://host[:port][/sdk]`` or ``host[:port]``."""
    parts = urlsplit(address if "://" in address else f"https://{address}")
    if parts.scheme != "https":
        raise InvalidArgument("address", f"{address!r}: vSphere is reached over https")
    if parts.path not in ("", "/", "/sdk") or parts.query or not parts.hostname:
        raise InvalidArgument("address", f"{address!r} is not https://host[:port]")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InvalidArgument("address", f"{address!r} has no valid port") from None
    return parts.hostname, port


class _PinMismatch(Exception):
    def __init__(self, seen: str) -> None:
        super().__init__(seen)
        self.seen = seen


class _PinnedContext(ssl.SSLContext):
    """A client context that trusts exactly one certificate: the one with ``pinned``'s
    SHA-256 fingerprint. It checks on every connection pyVmomi opens, after the handshake
    and before anything is sent."""

    pinned: str | None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        seen = fingerprint_der(sock.getpeercert(binary_form=True) or b"")
        if self.pinned is None or seen != self.pinned.upper():
            sock.close()
            raise _PinMismatch(seen)
        return sock


def _pinned_context(pinned: str | None) -> _PinnedContext:
    context = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    # The fingerprint is the trust anchor: vCenters and ESXi hosts mostly present
    # self-signed certificates, for names the center may not use.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.pinned = pinned
    return context


def _probe(host: str, port: int, context: _PinnedContext) -> None:
    """Fail fast, with a bounded wait, where nothing answers or the certificate is wrong."""
    with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as raw:
        context.wrap_socket(raw, server_hostname=host).close()


# --- Faults -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Doing:
    """What a call was doing, for its error message."""

    action: str
    vm: str | None = None


def _translate(exc: BaseException, address: str, pinned: str | None, doing: _Doing) -> Exception:
    """thinvisor's error for a pyVmomi fault or a connection failure to ``address``."""
    if isinstance(exc, ThinvisorError):
        return exc
    if isinstance(exc, _PinMismatch):
        return CertificateMismatch(address, exc.seen, pinned)
    if isinstance(exc, vim.fault.InvalidLogin):
        return CredentialsRefused(f"{address}: the host refused the user name or password")
    if isinstance(exc, vim.fault.NotAuthenticated):
        return Unreachable(f"{address}: the session has ended (log in again)")
    if isinstance(exc, vmodl.fault.RequestCanceled):
        return Unreachable(f"{address}: {doing.action}: the connection was closed")
    if isinstance(exc, vmodl.fault.ManagedObjectNotFound):
        return NotFound(f"{address}: no {_kind_of(exc.obj)} {_moid(exc.obj)!r}")
    if isinstance(exc, vim.fault.InvalidState):  # InvalidPowerState among them
        state = _STATE_WORDS.get(getattr(exc, "existingState", ""), "in its current state")
        return InvalidState(doing.vm or address, state, doing.action)
    if isinstance(exc, vim.fault.DuplicateName):
        return AlreadyExists(f"{address}: {doing.action}: the name {exc.name!r} is taken")
    if isinstance(exc, vmodl.MethodFault):
        return ProviderError(f"{address}: {doing.action}: {_fault_text(exc)}")
    if isinstance(exc, OSError | HTTPException):
        return Unreachable(f"{address}: {_os_text(exc)}")
    return exc if isinstance(exc, Exception) else RuntimeError(repr(exc))


def _fault_text(fault: Any) -> str:
    text = getattr(fault, "msg", None) or ""
    messages = [m.message for m in getattr(fault, "faultMessage", None) or [] if m.message]
    return " ".join([text, *messages]).strip() or type(fault).__name__.rsplit(".", 1)[-1]


def _os_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _moid(obj: Any) -> str:
    return str(getattr(obj, "_moId", obj))


def _kind_of(obj: Any) -> str:
    name = str(getattr(obj, "_wsdlName", "object"))
    return {"VirtualMachine": "vm", "VirtualMachineSnapshot": "snapshot"}.get(name, name)


# --- The inventory, as property values --------------------------------------------------


@dataclass(frozen=True)
class _About:
    name: str | None
    """The endpoint's own name; None: the name of its one host (ESXi)."""
    version: str
    fallback_name: str


def _group(obj: Any) -> str | None:
    """Which table of ``_Inventory`` an object belongs in."""
    for kind, group in (
        (vim.VirtualMachine, "vm"),
        (vim.HostSystem, "host"),
        (vim.Datastore, "datastore"),
        (vim.Network, "network"),
    ):
        if isinstance(obj, kind):
            return group
    return None


@dataclass
class _Inventory:
    """Property values of every object of the endpoint, kept as vSphere reports them
    (``{"runtime.powerState": "poweredOn", ...}``); records are built from them."""

    about: _About
    tables: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {"vm": {}, "host": {}, "datastore": {}, "network": {}}
    )

    def load(self, contents: Iterable[Any]) -> None:
        """Take in ``ObjectContent``s from a property retrieval."""
        for content in contents:
            group = _group(content.obj)
            if group is not None:
                values = {prop.name: prop.val for prop in content.propSet}
                self.tables[group][_moid(content.obj)] = values

    def apply(self, update: Any) -> ChangeEvent | None:
        """Apply one ``ObjectUpdate``; the change event it makes, if any."""
        group, moid = _group(update.obj), _moid(update.obj)
        if group is None:
            return None
        table = self.tables[group]
        before = dict(table.get(moid, {}))
        if update.kind == "leave":
            table.pop(moid, None)
        else:
            values = table.setdefault(moid, {})
            for change in update.changeSet:
                if change.op in ("remove", "indirectRemove"):
                    values.pop(change.name, None)
                else:
                    values[change.name] = change.val
        return self._event(group, moid, update.kind, before)

    def _event(self, group: str, moid: str, kind: str, before: dict[str, Any]) -> ChangeEvent:
        if group == "host":
            host = self.host()
            return ChangeEvent(ChangeKind.HOST_CHANGED, f"{host.name}: hosts changed", host=host)
        if group != "vm":
            return ChangeEvent(ChangeKind.RESYNC, f"{self.about.fallback_name}: {group}s changed")
        name = _name(before, moid)
        if kind == "leave":
            return ChangeEvent(
                ChangeKind.VM_REMOVED, f"{name}: removed", vm_id=moid, peer_kind=kind
            )
        vm = self.vm(moid)
        message = f"{vm.name}: {_vm_change(before, self.tables['vm'][moid], kind)}"
        return ChangeEvent(ChangeKind.VM_CHANGED, message, vm_id=moid, vm=vm, peer_kind=kind)

    def vm(self, moid: str) -> VmRecord:
        """The VM ``moid`` as a record."""
        values = self.tables["vm"][moid]
        return VmRecord(
            id=moid,
            name=_name(values, moid),
            power_state=_POWER_STATES.get(values.get("runtime.powerState", ""), PowerState.UNKNOWN),
            cpus=values.get("config.hardware.numCPU") or 0,
            memory_mib=values.get("config.hardware.memoryMB") or 0,
            template=bool(values.get("config.template")),
            datastores=self._names("datastore", values.get("datastore")),
            networks=self._names("network", values.get("network")),
            uuid=values.get("config.uuid"),
            reserved_cpu_mhz=max(0, values.get("config.cpuAllocation.reservation") or 0),
            reserved_memory_mib=max(0, values.get("config.memoryAllocation.reservation") or 0),
        )

    def _names(self, group: str, refs: Iterable[Any] | None) -> tuple[str, ...]:
        table = self.tables[group]
        return tuple(_name(table.get(_moid(ref), {}), _moid(ref)) for ref in refs or ())

    def host(self) -> HostRecord:
        """The endpoint as one host: its hosts' CPUs and memory summed."""
        hosts = list(self.tables["host"].values())
        only = _name(hosts[0], "") if len(hosts) == 1 else None
        return HostRecord(
            name=self.about.name or only or self.about.fallback_name,
            vendor="vsphere",
            version=self.about.version,
            cpus=sum(h.get("summary.hardware.numCpuThreads") or 0 for h in hosts),
            memory_mib=sum(h.get("summary.hardware.memorySize") or 0 for h in hosts) // MIB,
            maintenance=bool(hosts) and all(h.get("runtime.inMaintenanceMode") for h in hosts),
            # Several hosts behind one endpoint: the slowest core is the safe unit.
            core_mhz=min((h.get("summary.hardware.cpuMhz") or 0 for h in hosts), default=0),
        )

    def snapshot(self) -> InventorySnapshot:
        datastores = tuple(
            DatastoreRecord(
                id=moid,
                name=_name(values, moid),
                capacity_bytes=values.get("summary.capacity"),
                free_bytes=values.get("summary.freeSpace"),
            )
            for moid, values in self.tables["datastore"].items()
        )
        networks = tuple(
            NetworkRecord(id=moid, name=_name(values, moid))
            for moid, values in self.tables["network"].items()
        )
        vms = tuple(self.vm(moid) for moid in self.tables["vm"])
        return InventorySnapshot(self.host(), vms, datastores, networks)


def _name(values: dict[str, Any], moid: str) -> str:
    """An object's name as people wrote it: vSphere keeps ``%``, ``/`` and ``\\`` in
    inventory names escaped (``%25``, ``%2f``, ``%5c``)."""
    return unquote(str(values.get("name") or moid))


def _vm_change(before: dict[str, Any], after: dict[str, Any], kind: str) -> str:
    """A few words for what happened to a VM."""
    if kind == "enter":
        return "created"
    state = str(after.get("runtime.powerState"))
    if state != str(before.get("runtime.powerState")):
        return {"poweredOn": "powered on", "poweredOff": "powered off"}.get(state, str(state))
    if after.get("name") != before.get("name"):
        return f"renamed from {_name(before, '?')}"
    return "changed"


def _property_specs() -> list[Any]:
    return [
        PC.PropertySpec(type=vim.VirtualMachine, pathSet=_VM_PATHS),
        PC.PropertySpec(type=vim.HostSystem, pathSet=_HOST_PATHS),
        PC.PropertySpec(type=vim.Datastore, pathSet=_DATASTORE_PATHS),
        PC.PropertySpec(type=vim.Network, pathSet=_NETWORK_PATHS),
    ]


def _view_filter(view: Any) -> Any:
    """Everything in ``view`` (a container view of the whole endpoint)."""
    into = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
    start = PC.ObjectSpec(obj=view, skip=True, selectSet=[into])
    return PC.FilterSpec(objectSet=[start], propSet=_property_specs())


def _vm_filter(vm: Any) -> Any:
    """One VM with its datastores and networks (for their names)."""
    hops = [
        PC.TraversalSpec(name="datastores", path="datastore", skip=False, type=vim.VirtualMachine),
        PC.TraversalSpec(name="networks", path="network", skip=False, type=vim.VirtualMachine),
    ]
    start = PC.ObjectSpec(obj=vm, skip=False, selectSet=hops)
    return PC.FilterSpec(objectSet=[start], propSet=_property_specs())


# --- The session: blocking calls, run in worker threads ---------------------------------


class _Session:
    """A logged-in session on one endpoint; every method blocks."""

    def __init__(self, connection_address: str, si: Any, stub: Any) -> None:
        self.address = connection_address
        self.si = si
        self.stub = stub
        self.content = si.RetrieveContent()
        self.about = _read_about(self.content, connection_address)
        # One view of the whole endpoint, kept for the session: a snapshot is then
        # one round trip (plus pages), however many VMs there are.
        self.view = self.content.viewManager.CreateContainerView(
            self.content.rootFolder,
            [vim.VirtualMachine, vim.HostSystem, vim.Datastore, vim.Network],
            True,
        )
        self.watches: set[_Watch] = set()
        self.closed = False
        # The watch no stream holds: made at login, then handed from stream to stream.
        self._kept: _Watch | None = None
        self._keeping = threading.Lock()

    @classmethod
    def open(cls, address: str, username: str, password: str, pinned: str | None) -> _Session:
        """Check the certificate, negotiate the API version and log in."""
        host, port = _endpoint(address)
        context = _pinned_context(pinned)
        _probe(host, port, context)
        stub = _smart_stub(
            host=host,
            port=port,
            sslContext=context,
            httpConnectionTimeout=HTTP_TIMEOUT_S,
        )
        try:
            si = vim.ServiceInstance("ServiceInstance", stub)
            si.RetrieveContent().sessionManager.Login(username, password, None)
            session = cls(address, si, stub)
        except BaseException:
            stub.DropConnections()
            raise
        try:
            # Changes from now on wait at the endpoint for the first events() stream.
            session.keep(_Watch(session))
        except BaseException:
            session.close()
            raise
        return session

    def take_watch(self) -> _Watch | None:
        """The watch kept since login or the end of the last stream; None if a stream
        holds it now."""
        with self._keeping:
            watch, self._kept = self._kept, None
        return watch

    def keep(self, watch: _Watch) -> None:
        """Keep ``watch`` (not waiting) for the next stream, which continues where it
        stopped; close it instead if another is kept or the session is closed."""
        with self._keeping:
            kept = self._kept is None and not self.closed
            if kept:
                self._kept = watch
        if not kept:
            watch.close()

    def close(self) -> None:
        """End event streams' waits, log out (where the endpoint still answers) and close
        every connection."""
        self.closed = True
        for watch in list(self.watches):
            watch.cancel()
        try:
            self.content.sessionManager.Logout()
        except (vmodl.MethodFault, OSError, HTTPException):
            pass  # the session ends with its connections anyway
        finally:
            self.stub.DropConnections()

    # Reading

    def retrieve(self, spec: Any) -> list[Any]:
        """Every ``ObjectContent`` a filter selects, page after page."""
        collector = self.content.propertyCollector
        result = collector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
        contents: list[Any] = []
        while result is not None:
            contents.extend(result.objects)
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return contents

    def read(self, obj: Any, *paths: str) -> dict[str, Any]:
        """Properties of one object, unset ones left out; ``NotFound`` if it is gone."""
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=obj, skip=False)],
            propSet=[PC.PropertySpec(type=type(obj), pathSet=list(paths))],
        )
        found = self.retrieve(spec)
        if not found:
            raise NotFound(f"{self.address}: no {_kind_of(obj)} {_moid(obj)!r}")
        return {prop.name: prop.val for prop in found[0].propSet}

    def snapshot(self) -> InventorySnapshot:
        inventory = _Inventory(self.about)
        inventory.load(self.retrieve(_view_filter(self.view)))
        return inventory.snapshot()

    def host(self) -> HostRecord:
        spec = _view_filter(self.view)
        spec.propSet = [p for p in spec.propSet if p.type is vim.HostSystem]
        inventory = _Inventory(self.about)
        inventory.load(self.retrieve(spec))
        return inventory.host()

    def vm(self, vm_id: str) -> VmRecord:
        """The VM ``vm_id`` now; ``NotFound`` if there is none."""
        inventory = _Inventory(self.about)
        inventory.load(self.retrieve(_vm_filter(self._vm(vm_id))))
        if vm_id not in inventory.tables["vm"]:
            raise NotFound(f"{self.address}: no vm {vm_id!r}")
        return inventory.vm(vm_id)

    def _vm(self, vm_id: str) -> Any:
        return vim.VirtualMachine(vm_id, self.stub)

    def wait(self, task: Any) -> Any:
        """The result of a vSphere task once it ends; its fault if it failed."""
        delay = 0.02
        while True:
            # The parts needed, not the whole TaskInfo: less to decode, every poll.
            info = self.read(task, "info.state", "info.result", "info.error")
            if info["info.state"] == "success":
                return info.get("info.result")
            if info["info.state"] == "error":
                raise info["info.error"]
            time.sleep(delay)
            delay = min(delay * 2, TASK_POLL_MAX_S)

    # Power

    def power(self, vm_id: str, action: PowerAction) -> VmRecord:
        vm = self.vm(vm_id)
        state = "template" if vm.template else _vsphere_state(vm.power_state)
        if state not in _ALLOWED[action]:
            raise InvalidState(vm_id, _STATE_WORDS.get(state, "in an unknown state"), action.value)
        target = self._vm(vm_id)
        if action == PowerAction.START:
            self.wait(target.PowerOnVM_Task())
        elif action == PowerAction.STOP:
            self.wait(target.PowerOffVM_Task())
        elif action == PowerAction.RESET:
            self.wait(target.ResetVM_Task())
        else:
            target.ShutdownGuest()  # asks VMware Tools; the VM stops later
        return self.vm(vm_id)

    # Creating, cloning, changing, deleting

    def create(self, spec: CreateVm) -> VmRecord:
        _check_size(spec.cpus, spec.memory_mib)
        place = self._placement()
        config = vim.vm.ConfigSpec(
            name=spec.name,
            numCPUs=spec.cpus,
            memoryMB=spec.memory_mib,
            guestId="otherGuest64",
            files=vim.vm.FileInfo(vmPathName=f"[{place.datastore}]"),
            deviceChange=[],
        )
        if spec.disk_mib is not None:
            config.deviceChange.extend(_disk_specs(spec.disk_mib))
        if spec.network is not None:
            config.deviceChange.append(_nic_add(self._network(place.datacenter, spec.network)))
        task = place.folder.CreateVM_Task(config=config, pool=place.pool)
        return self.vm(_moid(self.wait(task)))

    def create_from_template(self, spec: CreateVm) -> VmRecord:
        assert spec.template is not None
        _check_size(spec.cpus, spec.memory_mib)
        if spec.disk_mib is not None:
            raise InvalidArgument("disk_mib", "a VM made from a template has the template's disks")
        if not self.vm(spec.template).template:
            raise InvalidArgument("template", f"{spec.template!r} is a VM, not a template")
        place = self._placement()
        network = None if spec.network is None else self._network(place.datacenter, spec.network)
        made = self._clone(spec.template, spec.name, place.pool)
        try:
            self._fit(made, spec, network)
        except BaseException:
            # Not half done: a clone that cannot be fitted is removed again.
            with contextlib.suppress(Exception):
                self.wait(made.Destroy_Task())
            raise
        return self.vm(_moid(made))

    def _fit(self, made: Any, spec: CreateVm, network: Any) -> None:
        """Give a template's clone the CPUs, memory and network asked for. Done after the
        clone rather than in its spec: not every endpoint applies a clone spec's hardware."""
        change = vim.vm.ConfigSpec(numCPUs=spec.cpus, memoryMB=spec.memory_mib, deviceChange=[])
        if network is not None:
            devices = self.read(made, "config.hardware.device").get("config.hardware.device")
            change.deviceChange.append(_nic_change(devices or [], network))
        self.wait(made.ReconfigVM_Task(spec=change))

    def clone(self, vm_id: str, name: str) -> VmRecord:
        source = self.vm(vm_id)
        if source.power_state != PowerState.STOPPED:
            raise InvalidState(vm_id, source.power_state.value, "clone")
        # A template has no pool of its own: its clones go where new VMs go.
        pool = self._placement().pool if source.template else None
        return self.vm(_moid(self._clone(vm_id, name, pool)))

    def _clone(self, source_id: str, name: str, pool: Any) -> Any:
        """A stopped clone of ``source_id`` beside it (in ``pool`` if given); the new VM."""
        source = self._vm(source_id)
        location = vim.vm.RelocateSpec(pool=pool)
        spec = vim.vm.CloneSpec(location=location, powerOn=False, template=False)
        folder = self.read(source, "parent")["parent"]
        return self.wait(source.CloneVM_Task(folder=folder, name=name, spec=spec))

    def reconfigure(self, vm_id: str, change: Reconfigure) -> VmRecord:
        vm = self.vm(vm_id)
        if vm.template or vm.power_state != PowerState.STOPPED:
            state = "a template" if vm.template else vm.power_state.value
            raise InvalidState(vm_id, state, "reconfigure")
        _check_size(change.cpus, change.memory_mib)
        spec = vim.vm.ConfigSpec(numCPUs=change.cpus, memoryMB=change.memory_mib)
        self.wait(self._vm(vm_id).ReconfigVM_Task(spec=spec))
        return self.vm(vm_id)

    def delete(self, vm_id: str) -> None:
        vm = self.vm(vm_id)
        if vm.power_state not in (PowerState.STOPPED, PowerState.SUSPENDED):
            raise InvalidState(vm_id, vm.power_state.value, "delete")
        self.wait(self._vm(vm_id).Destroy_Task())

    def _placement(self) -> _Placement:
        datacenter = self._first(self.content.rootFolder, vim.Datacenter, "datacenter")
        folders = self.read(datacenter, "hostFolder", "vmFolder")
        compute = self._first(folders["hostFolder"], vim.ComputeResource, "compute resource")
        found = self.read(compute, "name", "datastore", "resourcePool")
        if not found.get("datastore"):
            raise ProviderError(f"{self.address}: {found['name']} has no datastore for new VMs")
        datastore = self.read(found["datastore"][0], "name")["name"]
        return _Placement(datacenter, folders["vmFolder"], found["resourcePool"], datastore)

    def _first(self, container: Any, kind: Any, what: str) -> Any:
        view = self.content.viewManager.CreateContainerView(container, [kind], True)
        try:
            found = self.read(view, "view").get("view")
        finally:
            view.DestroyView()
        if not found:
            raise ProviderError(f"{self.address}: no {what} to place new VMs in")
        return found[0]

    def _network(self, datacenter: Any, name: str) -> Any:
        for network in self.read(datacenter, "network").get("network") or ():
            if self.read(network, "name")["name"] == name:
                return network
        raise InvalidArgument("network", f"{self.address} has no network {name!r}")

    # Snapshots

    def snapshots(self, vm_id: str) -> list[SnapshotRecord]:
        info = self.read(self._vm(vm_id), "snapshot").get("snapshot")
        if info is None:
            return []
        current = _moid(info.currentSnapshot) if info.currentSnapshot else None
        return list(_walk_snapshots(info.rootSnapshotList, None, current))

    def create_snapshot(self, vm_id: str, name: str) -> SnapshotRecord:
        task = self._vm(vm_id).CreateSnapshot_Task(
            name=name, description="", memory=False, quiesce=False
        )
        return self._snapshot(vm_id, _moid(self.wait(task)))

    def revert_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord:
        self._snapshot(vm_id, snapshot_id)
        snapshot = vim.vm.Snapshot(snapshot_id, self.stub)
        self.wait(snapshot.RevertToSnapshot_Task())
        return self._snapshot(vm_id, snapshot_id)

    def delete_snapshot(self, vm_id: str, snapshot_id: str) -> None:
        self._snapshot(vm_id, snapshot_id)
        snapshot = vim.vm.Snapshot(snapshot_id, self.stub)
        self.wait(snapshot.RemoveSnapshot_Task(removeChildren=False))

    def _snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord:
        """The VM's snapshot ``snapshot_id``; ``NotFound`` if the VM has no such snapshot."""
        for record in self.snapshots(vm_id):
            if record.id == snapshot_id:
                return record
        raise NotFound(f"{self.address}: vm {vm_id!r} has no snapshot {snapshot_id!r}")


@dataclass(frozen=True)
class _Placement:
    """Where new VMs go."""

    datacenter: Any
    folder: Any
    pool: Any
    datastore: str
    """The datastore's name."""


def _read_about(content: Any, address: str) -> _About:
    about = content.about
    name = None
    if about.apiType == "VirtualCenter":
        try:
            options = content.setting.QueryOptions("VirtualCenter.InstanceName")
            name = str(options[0].value) if options and options[0].value else None
        except vmodl.MethodFault:
            name = None  # a user without the privilege: the address names it
    fallback = urlsplit(address if "://" in address else f"https://{address}").hostname
    return _About(name, str(about.version), fallback or address)


def _vsphere_state(state: PowerState) -> str:
    return {v: k for k, v in _POWER_STATES.items()}.get(state, "unknown")


def _check_size(cpus: int | None, memory_mib: int | None) -> None:
    if cpus is not None and cpus < 1:
        raise InvalidArgument("cpus", f"must be at least 1, not {cpus}")
    if memory_mib is not None and memory_mib < 4:
        raise InvalidArgument("memory_mib", f"must be at least 4, not {memory_mib}")


def _disk_specs(disk_mib: int) -> list[Any]:
    """A paravirtual SCSI controller with one new thin disk of ``disk_mib``."""
    if disk_mib < 1:
        raise InvalidArgument("disk_mib", f"must be at least 1, not {disk_mib}")
    device = vim.vm.device
    controller = device.ParaVirtualSCSIController(key=-100, busNumber=0, sharedBus="noSharing")
    disk = device.VirtualDisk(
        key=-101,
        controllerKey=-100,
        unitNumber=0,
        capacityInKB=disk_mib * 1024,
        backing=device.VirtualDisk.FlatVer2BackingInfo(
            diskMode="persistent", thinProvisioned=True, fileName=""
        ),
    )
    return [
        device.VirtualDeviceSpec(operation="add", device=controller),
        device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk),
    ]


def _nic_backing(network: Any) -> Any:
    card = vim.vm.device.VirtualEthernetCard
    if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
        port = vim.dvs.PortConnection(
            portgroupKey=network.key, switchUuid=network.config.distributedVirtualSwitch.uuid
        )
        return card.DistributedVirtualPortBackingInfo(port=port)
    return card.NetworkBackingInfo(deviceName=network.name, network=network)


def _nic_add(network: Any) -> Any:
    device = vim.vm.device
    nic = device.VirtualVmxnet3(
        key=-102,
        backing=_nic_backing(network),
        connectable=device.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True),
    )
    return device.VirtualDeviceSpec(operation="add", device=nic)


def _nic_change(devices: Iterable[Any], network: Any) -> Any:
    """The template's first NIC moved onto ``network``; a new NIC there if it has none."""
    for nic in devices:
        if isinstance(nic, vim.vm.device.VirtualEthernetCard):
            nic.backing = _nic_backing(network)
            return vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)
    return _nic_add(network)


def _walk_snapshots(
    nodes: Iterable[Any], parent: str | None, current: str | None
) -> Iterable[SnapshotRecord]:
    for node in nodes or ():
        moid = _moid(node.snapshot)
        yield SnapshotRecord(
            id=moid,
            name=node.name,
            parent=parent,
            current=moid == current,
            memory=node.state == "poweredOn",
            created=node.createTime.isoformat() if node.createTime else None,
        )
        yield from _walk_snapshots(node.childSnapshotList, moid, current)


# --- Events -----------------------------------------------------------------------------


class _Watch:
    """A property collector of its own, following the endpoint's objects (blocking).

    ``next()`` runs in one thread at a time; what it finds waits in ``pending`` until a
    stream yields it, so that a stream ending mid-answer loses nothing."""

    def __init__(self, session: _Session) -> None:
        self.inventory = _Inventory(session.about)
        self.collector = session.content.propertyCollector.CreatePropertyCollector()
        self.version = ""
        self.pending: deque[ChangeEvent] = deque()
        self.session = session
        session.watches.add(self)
        try:
            self.collector.CreateFilter(_view_filter(session.view), partialUpdates=False)
            self._baseline()
        except BaseException:
            self.close()
            raise

    def _baseline(self) -> None:
        """Take in the current state (the first answer, maybe in pages); no events."""
        while True:
            result = self.collector.WaitForUpdatesEx(self.version, PC.WaitOptions())
            if result is None:
                return
            self.version = result.version
            self._apply(result)
            if not result.truncated:
                return

    def next(self) -> None:
        """Add to ``pending`` the changes within ``WAIT_UPDATES_S`` (maybe none)."""
        options = PC.WaitOptions(maxWaitSeconds=WAIT_UPDATES_S, maxObjectUpdates=MAX_OBJECT_UPDATES)
        try:
            result = self.collector.WaitForUpdatesEx(self.version, options)
        except vmodl.query.InvalidCollectorVersion:
            self._restart()
            return
        if result is not None:
            self.version = result.version
            self.pending.extend(self._apply(result))

    def _restart(self) -> None:
        """Start afresh from the current state: the endpoint forgot the version, and what
        changed since is not known."""
        self.inventory = _Inventory(self.session.about)
        self.version = ""
        self.pending.clear()  # the RESYNC stands for these too
        self._baseline()
        message = f"{self.session.address}: the endpoint lost track of changes"
        self.pending.append(ChangeEvent(ChangeKind.RESYNC, message))

    def _apply(self, result: Any) -> list[ChangeEvent]:
        events = []
        for filter_update in result.filterSet or ():
            for update in filter_update.objectSet or ():
                event = self.inventory.apply(update)
                if event is not None:
                    events.append(event)
        return events

    def cancel(self) -> None:
        """End a wait in progress (from another thread)."""
        # Nothing to cancel, or the session is gone already: either way it is not waiting.
        with contextlib.suppress(vmodl.MethodFault, OSError, HTTPException):
            self.collector.CancelWaitForUpdates()

    def close(self) -> None:
        self.session.watches.discard(self)
        # A session that is gone took its collectors with it.
        with contextlib.suppress(vmodl.MethodFault, OSError, HTTPException):
            self.collector.DestroyPropertyCollector()
        if self.session.closed:
            # The connection of the wait went back to the pool after the session closed it.
            self.session.stub.DropConnections()


async def _stop_waiting(executor: ThreadPoolExecutor, watch: _Watch) -> None:
    """Return once ``watch`` no longer waits in ``executor``'s thread, cancelling its wait
    (again, should the cancel come before the wait began)."""
    idle = asyncio.get_running_loop().run_in_executor(executor, _nothing)
    while True:
        await asyncio.to_thread(watch.cancel)
        done, _ = await asyncio.wait({idle}, timeout=CANCEL_RETRY_S)
        if done:
            return


def _nothing() -> None:
    pass


# --- The provider -----------------------------------------------------------------------


class VsphereProvider(Provider):
    """A vCenter or an ESXi host (see the module's docstring for what it can do)."""

    kind = "vsphere"
    capabilities = frozenset(
        {
            Capability.EVENTS,
            Capability.POWER,
            Capability.CREATE,
            Capability.TEMPLATES,
            Capability.DELETE,
            Capability.RECONFIGURE,
            Capability.CLONE,
            Capability.SNAPSHOT,
        }
    )

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._session: _Session | None = None

    async def _run(self, doing: _Doing, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, its failures translated."""
        return await self._in(None, doing, fn, *args)

    async def _in(
        self, executor: ThreadPoolExecutor | None, doing: _Doing, fn: Callable[..., T], *args: Any
    ) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, fn, *args)
        except Exception as exc:
            c = self.connection
            raise _translate(exc, c.address, c.fingerprint, doing) from exc

    def _live(self) -> _Session:
        if self._session is None:
            raise Unreachable(f"{self.connection.address}: not connected")
        return self._session

    async def connect(self) -> HostRecord:
        if self._session is None:
            c = self.connection
            if not c.username or c.password is None:
                raise InvalidArgument("username", "vSphere needs a user name and a password")
            opened = _Session.open
            self._session = await self._run(
                _Doing("connect"), opened, c.address, c.username, c.password, c.fingerprint
            )
        return await self._run(_Doing("connect"), self._live().host)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await asyncio.to_thread(session.close)

    async def snapshot(self) -> InventorySnapshot:
        return await self._run(_Doing("list the inventory"), self._live().snapshot)

    async def ping(self) -> None:
        await self._run(_Doing("ping"), self._live().si.CurrentTime)

    async def events(self) -> AsyncIterator[ChangeEvent]:
        """Changes to the endpoint's VMs and hosts since ``connect()`` or the end of the
        previous stream, until the session ends (``Unreachable``). A stream started while
        another runs follows the changes from its own start."""
        session = self._live()
        # A thread of the stream's own: it spends its life waiting for the endpoint.
        executor = ThreadPoolExecutor(1, thread_name_prefix="vsphere-events")
        doing = _Doing("follow changes")
        watch = session.take_watch()
        try:
            if watch is None:  # another stream holds the one kept since connect()
                watch = await self._in(executor, doing, _Watch, session)
            while True:
                while watch.pending:
                    yield watch.pending.popleft()
                await self._in(executor, doing, watch.next)
        finally:
            if watch is not None:
                await _stop_waiting(executor, watch)
                await asyncio.to_thread(session.keep, watch)
            executor.shutdown(wait=False)

    async def power(self, vm_id: str, action: PowerAction) -> VmRecord:
        if action in SUSPEND_ACTIONS:
            self.require(Capability.SUSPEND, action.value)
        return await self._run(_Doing(action.value, vm_id), self._live().power, vm_id, action)

    async def create(self, spec: CreateVm) -> VmRecord:
        session = self._live()
        if spec.template is not None:
            doing = _Doing("create from a template", spec.template)
            return await self._run(doing, session.create_from_template, spec)
        return await self._run(_Doing("create"), session.create, spec)

    async def delete(self, vm_id: str) -> None:
        await self._run(_Doing("delete", vm_id), self._live().delete, vm_id)

    async def reconfigure(self, vm_id: str, change: Reconfigure) -> VmRecord:
        doing = _Doing("reconfigure", vm_id)
        return await self._run(doing, self._live().reconfigure, vm_id, change)

    async def clone(self, vm_id: str, name: str) -> VmRecord:
        return await self._run(_Doing("clone", vm_id), self._live().clone, vm_id, name)

    async def snapshots(self, vm_id: str) -> list[SnapshotRecord]:
        return await self._run(_Doing("list snapshots", vm_id), self._live().snapshots, vm_id)

    async def create_snapshot(self, vm_id: str, name: str) -> SnapshotRecord:
        doing = _Doing("snapshot", vm_id)
        return await self._run(doing, self._live().create_snapshot, vm_id, name)

    async def revert_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord:
        doing = _Doing("revert to a snapshot", vm_id)
        return await self._run(doing, self._live().revert_snapshot, vm_id, snapshot_id)

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> None:
        doing = _Doing("delete a snapshot", vm_id)
        await self._run(doing, self._live().delete_snapshot, vm_id, snapshot_id)


PROVIDER = VsphereProvider
