"""The CLI's client of a remote host agent: the calls the CLI makes on ``HostService``,
made over the REST API instead.

``thinvisor login`` stores the agent's URL, an API token and the SHA-256 fingerprint of
the agent's certificate in ``login.json``. Every connection, HTTP or WebSocket, checks
the certificate against that fingerprint right after the TLS handshake, before a byte of
the request (or the token) is sent; CA checks are off, since hosts use self-signed
certificates. Error bodies become thinvisor's own errors, with the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import selectors
import socket
import ssl
import sys
import termios
import threading
import time
import tty
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol, Self
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from thinvisor.console.serial import DETACH_KEY
from thinvisor.errors import (
    AlreadyExists,
    ApplianceBuildError,
    BackendError,
    Busy,
    CertificateMismatch,
    CredentialsRefused,
    Disconnected,
    ImageError,
    InsufficientResources,
    InvalidArgument,
    InvalidConfig,
    InvalidState,
    NotFound,
    ProviderError,
    QemuError,
    ThinvisorError,
    TooManyAttempts,
    Unauthenticated,
    Unreachable,
    Unsupported,
)
from thinvisor.fs import atomic_write
from thinvisor.host.clones import CloneRequest
from thinvisor.host.datastores import download_target, file_chunks, local_source
from thinvisor.host.service import vm_info_dict
from thinvisor.host.storage_usage import VmStorage
from thinvisor.model.create import NewDiskSpec, NewNicSpec, NicUpdate, VmCreate
from thinvisor.model.resources import DiskLimits, ResourceUpdate
from thinvisor.model.vm import CdromSpec, DiskSpec, NicSpec, VmSpec, VmUpdate
from thinvisor.network.model import PortGroupSpec, SwitchSpec
from thinvisor.storage.datastore import Datastore, FileEntry, write_stream
from thinvisor.storage.snapshots import Snapshot, SnapshotCreate, SnapshotTree
from thinvisor.tls import fingerprint_der

API = "/api/v1"
DEFAULT_PORT = 8443
_FINISHED = ("success", "error")
_CLOSE_NORMAL = (1000, 1001)
_HISTORY_WAIT_S = 1.0  # the agent sends a console's history first, at once
_LINGER_MAX_S = 5.0

# --- The login file -------------------------------------------------------------------


class Login(BaseModel):
    """What ``thinvisor login`` stores: where the agent is and how to prove who we are."""

    url: str
    token: str
    fingerprint: str | None = None  # None for a plain-HTTP agent
    user: str


def login_path() -> Path:
    """``$XDG_CONFIG_HOME/thinvisor/login.json`` (``~/.config`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "thinvisor" / "login.json"


def load_login(path: Path | None = None) -> Login | None:
    """The stored login, or None when there is none."""
    path = path or login_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidConfig(f"login: cannot read {path}: {exc.strerror}") from exc
    try:
        return Login.model_validate_json(text)
    except ValidationError:
        raise InvalidConfig(
            f"login: {path} is not a thinvisor login; run 'thinvisor logout' or log in again"
        ) from None


def save_login(login: Login, path: Path | None = None) -> Path:
    """Store ``login`` readable by its owner only (it holds a token)."""
    path = path or login_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(login.model_dump(), indent=2) + "\n", mode=0o600)
    return path


def remove_login(path: Path | None = None) -> Login | None:
    """Forget the stored login; the one forgotten, if any."""
    path = path or login_path()
    try:
        login = load_login(path)
    except InvalidConfig:
        login = None
    path.unlink(missing_ok=True)
    return login


def agent_url(text: str) -> str:
    """An agent's base URL from what a user types: ``https://host:port``, ``host:port`` or
    ``host`` (https and port 8443 assumed); a trailing ``/api/v1`` is dropped."""
    return api_url(text, DEFAULT_PORT, "agent")


def api_url(text: str, default_port: int, what: str) -> str:
    """The base URL of the API of a ``what`` (an agent, a center) from what a user types:
    ``https://host:port``, ``host:port`` or ``host`` (https and ``default_port`` assumed);
    a trailing ``/api/v1`` is dropped."""
    raw = text.strip()
    if "://" not in raw:
        raw = f"https://{raw}"
    try:
        url = httpx.URL(raw)
    except httpx.InvalidURL as exc:
        raise InvalidArgument("url", f"{text!r} is not a URL: {exc}") from None
    if url.scheme not in ("https", "http") or not url.host:
        raise InvalidArgument("url", f"{text!r} is not an https://HOST:PORT URL")
    if url.path.rstrip("/") not in ("", API):
        raise InvalidArgument("url", f"{text!r}: give the {what}'s address without a path")
    port = url.port or (default_port if "://" not in text else None)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}" + (f":{port}" if port else "")


# --- Certificate pinning --------------------------------------------------------------


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_peer(self.context, self.getpeercert(binary_form=True))


class _PinnedObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _check_peer(self.context, self.getpeercert(binary_form=True))


class PinnedContext(ssl.SSLContext):
    """A client TLS context without CA checks whose handshakes fail unless the peer's
    certificate has the ``pinned`` fingerprint; ``seen`` is the last one seen."""

    sslsocket_class = _PinnedSocket
    sslobject_class = _PinnedObject
    pinned: str | None = None
    seen: str | None = None

    @property
    def mismatch(self) -> bool:
        return self.pinned is not None and self.seen is not None and self.seen != self.pinned


def pinned_context(fingerprint: str | None) -> PinnedContext:
    """A context pinning ``fingerprint``; with None, any certificate (to learn its)."""
    context = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.pinned = fingerprint.upper() if fingerprint else None
    return context


def _check_peer(context: ssl.SSLContext, der: bytes | None) -> None:
    if not isinstance(context, PinnedContext):
        return
    context.seen = fingerprint_der(der) if der else None
    if context.pinned is not None and context.seen != context.pinned:
        raise ssl.SSLCertVerificationError("the certificate is not the pinned one")


class CertificateChanged(ThinvisorError):
    """The agent answered with another certificate than the one pinned at login."""

    http_status = 502

    def __init__(self, url: str, seen: str | None, pinned: str | None) -> None:
        super().__init__(
            f"{url}: the host's certificate has changed (fingerprint {seen}, pinned {pinned}); "
            f"if that is expected, run 'thinvisor login {url}' again"
        )


def server_fingerprint(url: str, timeout: float = 10.0) -> str:
    """The SHA-256 fingerprint of the certificate an https agent presents."""
    parsed = httpx.URL(url)
    context = pinned_context(None)
    try:
        with (
            socket.create_connection((parsed.host, parsed.port or 443), timeout) as sock,
            context.wrap_socket(sock, server_hostname=parsed.host),
        ):
            pass
    except (OSError, ssl.SSLError) as exc:
        raise ThinvisorError(f"cannot reach {url}: {exc}") from exc
    if context.seen is None:
        raise ThinvisorError(f"{url}: the host presented no certificate")
    return context.seen


# --- Errors ---------------------------------------------------------------------------


class RemoteError(ThinvisorError):
    """An error of the agent without a counterpart in ``thinvisor.errors`` (401, 403, ...)."""

    def __init__(self, code: str, message: str, http_status: int = 500) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


# The API's error codes (``thinvisor.host.tasks.error_code`` of each class).
ERRORS: dict[str, type[ThinvisorError]] = {
    "thinvisor_error": ThinvisorError,
    "invalid_argument": InvalidArgument,
    "not_found": NotFound,
    "already_exists": AlreadyExists,
    "invalid_state": InvalidState,
    "busy": Busy,
    "insufficient_resources": InsufficientResources,
    "invalid_config": InvalidConfig,
    "backend_error": BackendError,
    "qemu_error": QemuError,
    "image_error": ImageError,
    "appliance_build_error": ApplianceBuildError,
    "unsupported": Unsupported,
    "disconnected": Disconnected,
    "provider_error": ProviderError,
    "unreachable": Unreachable,
    "credentials_refused": CredentialsRefused,
    "certificate_mismatch": CertificateMismatch,
    "unauthenticated": Unauthenticated,
    "too_many_attempts": TooManyAttempts,
}
_INVALID_STATE = re.compile(r"vm '(.*)': cannot (.+) while (\S+)")


def error_from(code: str, message: str, http_status: int = 500) -> ThinvisorError:
    """The thinvisor error an API error body stands for, carrying the server's message."""
    cls = ERRORS.get(code)
    if cls is None:
        return RemoteError(code, message, http_status)
    exc = cls.__new__(cls)
    ThinvisorError.__init__(exc, message)  # the subclasses' arguments are in the message
    if isinstance(exc, InvalidArgument):
        exc.field, _, exc.reason = message.partition(": ")
    if isinstance(exc, InvalidState):
        m = _INVALID_STATE.fullmatch(message)
        exc.vm, exc.action, exc.state = m.groups() if m else ("", "", "")
    return exc


def error_of_response(response: httpx.Response) -> ThinvisorError:
    try:
        body = response.json()
        return error_from(str(body["error"]), str(body["message"]), response.status_code)
    except (ValueError, KeyError, TypeError):
        reason = response.reason_phrase or "error"
        return RemoteError("http_error", f"HTTP {response.status_code} {reason}")


# --- VMs as the agent shows them ------------------------------------------------------


class PathsView(Protocol):
    @property
    def vm_dir(self) -> Path: ...

    def serial_log(self, name: str) -> Path: ...


class VmView(Protocol):
    """What the CLI prints of a VM: ``HostService``'s ``VmInfo`` and ``RemoteVmInfo``."""

    @property
    def name(self) -> str: ...
    @property
    def datastore(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def spec(self) -> VmSpec | None: ...
    @property
    def paths(self) -> PathsView: ...
    @property
    def error(self) -> str | None: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def stop_reason(self) -> str | None: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RemotePaths:
    """A remote VM's directory, as a path on its host."""

    vm_dir: Path

    def serial_log(self, name: str) -> Path:
        return self.vm_dir / "logs" / f"{name}.log"  # as VmPaths lays them out


@dataclass(frozen=True)
class RemoteVmInfo:
    """A VM of a remote host: the same attributes and ``to_dict()`` as ``VmInfo``."""

    name: str
    datastore: str
    state: str
    spec: VmSpec | None
    paths: RemotePaths
    error: str | None = None
    pid: int | None = None
    qemu_status: str | None = None
    stop_reason: str | None = None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> RemoteVmInfo:
        """From the API's ``VmOut``."""
        spec = VmSpec.model_validate(data["spec"]) if data.get("spec") else None
        return cls(
            name=data["name"],
            datastore=data["datastore"],
            state=data["state"],
            spec=spec,
            paths=RemotePaths(Path(data["vm_dir"])),
            error=data.get("error"),
            pid=data.get("pid"),
            qemu_status=data.get("qemu_status"),
            stop_reason=data.get("stop_reason"),
        )

    def to_dict(self) -> dict[str, Any]:
        return vm_info_dict(self)


# --- The client -----------------------------------------------------------------------

TaskWatch = Callable[[dict[str, Any]], None]


class ApiClient:
    """A thinvisor REST API (a host agent's or a center's) through the pinned TLS of a
    login. Use it as an async context manager.

    Operations may answer with a task: ``result`` follows it to its end, with a progress
    bar on stderr when ``show_progress``.
    """

    login_command = "thinvisor login"
    """The command that logs in again, as error messages name it."""
    first_poll_s = 0.1
    """How long to wait before asking again about a task that has not finished."""

    def __init__(self, login: Login, *, show_progress: bool = False, timeout: float = 120.0):
        self.login = login
        self.show_progress = show_progress
        self._tls = pinned_context(login.fingerprint) if login.url.startswith("https:") else None
        headers = {"Authorization": f"Bearer {login.token}"} if login.token else {}
        self._client = httpx.AsyncClient(
            base_url=login.url + API,
            headers=headers,
            verify=self._tls or True,
            timeout=httpx.Timeout(timeout, connect=10.0),
            trust_env=False,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """One request; transport failures and error answers become thinvisor errors."""
        try:
            response = await self._client.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        if response.status_code >= 400:
            raise self.answer_error(response)
        return response

    async def get(self, route: str, /, **params: Any) -> Any:
        """The JSON answer of a GET; parameters that are None are left out."""
        given = {k: v for k, v in params.items() if v is not None}
        return (await self.call("GET", route, params=given)).json()

    def answer_error(self, response: httpx.Response) -> ThinvisorError:
        """The thinvisor error an error answer stands for; a refused token says how to
        log in again."""
        error = error_of_response(response)
        if response.status_code == 401 and self.login.token:
            message = f"{error}; log in again: {self.login_command} {self.login.url}"
            return RemoteError("unauthorized", message, 401)
        return error

    def certificate_changed(self, seen: str | None, pinned: str | None) -> ThinvisorError:
        """The error for a certificate that is not the one pinned at login."""
        return CertificateChanged(self.login.url, seen, pinned)

    def _transport_error(self, exc: httpx.TransportError) -> ThinvisorError:
        url = self.login.url
        if self._tls is not None and self._tls.mismatch:
            return self.certificate_changed(self._tls.seen, self._tls.pinned)
        if isinstance(exc, httpx.TimeoutException):
            return ThinvisorError(f"{url}: no answer in time ({type(exc).__name__})")
        return ThinvisorError(f"cannot reach {url}: {exc or type(exc).__name__}")

    async def result(self, response: httpx.Response, what: str, *, wait: bool = True) -> Any:
        """The answer's body; for a 202, its task followed to the end and its result
        (without ``wait``: the task as it was accepted)."""
        if response.status_code != 202:
            return response.json() if response.content else None
        task: dict[str, Any] = response.json()
        if not wait:
            return task
        delay = self.first_poll_s
        with self._watch(what) as watch:
            while task["state"] not in _FINISHED:
                watch(task)
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
                task = await self.get(f"/tasks/{quote(task['id'], safe='')}")
        if task["state"] == "error":
            err = task.get("error") or {}
            code = str(err.get("error", "thinvisor_error"))
            raise error_from(code, str(err.get("message", f"{what} failed")))
        return task.get("result")

    @contextlib.contextmanager
    def _watch(self, what: str) -> Iterator[TaskWatch]:
        if not self.show_progress:
            yield lambda task: None
            return
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            bar_id = bar.add_task(what, total=100)

            def watch(task: dict[str, Any]) -> None:
                message = task.get("message")
                description = f"{what}: {message}" if message else what
                bar.update(bar_id, completed=task.get("progress") or 0, description=description)

            yield watch

    async def log_in(self, user: str, password: str, label: str) -> dict[str, Any]:
        """Trade a password for a token: ``{token, user, role}``."""
        body = {"user": user, "password": password, "label": label}
        answer: dict[str, Any] = (await self.call("POST", "/auth/login", body=body)).json()
        return answer


class RemoteHost(ApiClient):
    """A host agent over REST, with the methods of ``HostService`` that the CLI calls.

    Long operations are tasks: they are followed to their end, with a progress bar on
    stderr when ``show_progress``.
    """

    def __init__(self, login: Login, *, show_progress: bool = False, timeout: float = 120.0):
        super().__init__(login, show_progress=show_progress, timeout=timeout)
        self.network = RemoteNetwork(self)
        self.datastores = RemoteDatastores(self)

    async def _vm(self, method: str, path: str, what: str, **kwargs: Any) -> RemoteVmInfo:
        response = await self.call(method, path, **kwargs)
        return RemoteVmInfo.from_api(await self.result(response, what))

    # The calls of HostService

    async def list_vms(self) -> list[RemoteVmInfo]:
        response = await self.call("GET", "/vms")
        return [RemoteVmInfo.from_api(v) for v in response.json()]

    async def get_vm(self, name: str) -> RemoteVmInfo:
        return await self._vm("GET", _vm_path(name), name)

    async def create_from(self, req: VmCreate) -> RemoteVmInfo:
        # Only the fields given: the agent fills in the rest as it would for a local call.
        body = req.model_dump(mode="json", exclude_unset=True)
        return await self._vm("POST", "/vms", f"{req.name}: create", body=body)

    async def update_vm(self, name: str, update: VmUpdate) -> RemoteVmInfo:
        body = update.model_dump(mode="json", include=update.model_fields_set)
        return await self._vm("PATCH", _vm_path(name), name, body=body)

    async def set_resources(self, name: str, update: ResourceUpdate) -> RemoteVmInfo:
        body = update.model_dump(mode="json", include=update.model_fields_set)
        return await self._vm("PATCH", _vm_path(name, "resources"), name, body=body)

    async def set_limits(
        self,
        name: str,
        *,
        disks: Mapping[str, DiskLimits | None] | None = None,
        balloon_mib: int | None = None,
    ) -> RemoteVmInfo:
        info = None
        for disk, limits in (disks or {}).items():
            body = (limits or DiskLimits()).model_dump(mode="json", exclude_none=True)
            path = _vm_path(name, "disks", disk, "limits")
            info = await self._vm("PUT", path, name, body=body)
        if balloon_mib is not None:
            body = {"target_mib": balloon_mib}
            info = await self._vm("PUT", _vm_path(name, "balloon"), name, body=body)
        return info if info is not None else await self.get_vm(name)

    async def delete_vm(self, name: str) -> None:
        await self.call("DELETE", _vm_path(name))

    async def start(self, name: str) -> RemoteVmInfo:
        return await self._vm("POST", _vm_path(name, "start"), f"{name}: start")

    async def stop(self, name: str) -> RemoteVmInfo:
        return await self._vm("POST", _vm_path(name, "stop"), f"{name}: stop")

    async def reset(self, name: str) -> RemoteVmInfo:
        return await self._vm("POST", _vm_path(name, "reset"), f"{name}: reset")

    async def pause(self, name: str) -> RemoteVmInfo:
        return await self._vm("POST", _vm_path(name, "pause"), f"{name}: pause")

    async def resume(self, name: str) -> RemoteVmInfo:
        return await self._vm("POST", _vm_path(name, "resume"), f"{name}: resume")

    async def suspend(self, name: str) -> RemoteVmInfo:
        return await self._vm("POST", _vm_path(name, "suspend"), f"{name}: suspend")

    async def shutdown(self, name: str, timeout: float | None = None) -> RemoteVmInfo:
        params = {"timeout": timeout} if timeout is not None else None
        path = _vm_path(name, "shutdown")
        return await self._vm("POST", path, f"{name}: shut down", params=params)

    async def add_disk(self, name: str, new: NewDiskSpec) -> DiskSpec:
        body = new.model_dump(mode="json", exclude_none=True)
        response = await self.call("POST", _vm_path(name, "disks"), body=body)
        return DiskSpec.model_validate(await self.result(response, f"{name}: add a disk"))

    async def remove_disk(self, name: str, disk_name: str, *, keep_file: bool = False) -> None:
        path = _vm_path(name, "disks", disk_name)
        await self.call("DELETE", path, params={"keep_file": keep_file})

    async def resize_disk(self, name: str, disk_name: str, size: int) -> DiskSpec:
        path = _vm_path(name, "disks", disk_name, "resize")
        response = await self.call("POST", path, body={"size": size})
        return DiskSpec.model_validate(await self.result(response, f"{name}: grow {disk_name}"))

    async def insert_cdrom(self, name: str, iso: Path) -> CdromSpec:
        response = await self.call("PUT", _vm_path(name, "cdrom"), body={"path": str(iso)})
        return CdromSpec.model_validate(response.json())

    async def eject_cdrom(self, name: str) -> CdromSpec:
        response = await self.call("DELETE", _vm_path(name, "cdrom"))
        return CdromSpec.model_validate(response.json())

    async def list_nics(self, name: str) -> list[dict[str, Any]]:
        nics: list[dict[str, Any]] = (await self.call("GET", _vm_path(name, "nics"))).json()
        return nics

    async def add_nic(self, name: str, new: NewNicSpec) -> NicSpec:
        body = new.model_dump(mode="json", exclude_unset=True)
        response = await self.call("POST", _vm_path(name, "nics"), body=body)
        return NicSpec.model_validate(response.json())

    async def remove_nic(self, name: str, nic_name: str) -> None:
        await self.call("DELETE", _vm_path(name, "nics", nic_name))

    async def update_nic(self, name: str, nic_name: str, change: NicUpdate) -> NicSpec:
        # Only the fields given: a null shaping removes the shaping, an absent one keeps it.
        body = change.model_dump(mode="json", include=change.model_fields_set)
        response = await self.call("PATCH", _vm_path(name, "nics", nic_name), body=body)
        return NicSpec.model_validate(response.json())

    # Snapshots, clones, templates, OVA, disk moves (``/vms/...``, see api/snapshots.py)

    async def list_snapshots(self, name: str) -> SnapshotTree:
        return snapshot_tree((await self.call("GET", _vm_path(name, "snapshots"))).json())

    async def take_snapshot(self, name: str, req: SnapshotCreate) -> Snapshot:
        body = req.model_dump(mode="json")
        response = await self.call("POST", _vm_path(name, "snapshots"), body=body)
        return _snapshot(await self.result(response, f"{name}: snapshot {req.name}"))

    async def revert_snapshot(self, name: str, ref: str) -> Snapshot:
        tree = await self.list_snapshots(name)
        snap = tree.find(name, ref)
        path = _vm_path(name, "snapshots", str(snap.id), "revert")
        await self.result(await self.call("POST", path), f"{name}: revert to {snap.name}")
        return snap

    async def delete_snapshot(self, name: str, ref: str) -> Snapshot:
        path = _vm_path(name, "snapshots", ref)
        response = await self.call("DELETE", path)
        return _snapshot(await self.result(response, f"{name}: delete snapshot {ref}"))

    async def clone_vm(self, source: str, req: CloneRequest) -> RemoteVmInfo:
        body = req.model_dump(mode="json", exclude_none=True)
        return await self._vm("POST", _vm_path(source, "clone"), f"clone {source}", body=body)

    async def deploy(self, template: str, req: CloneRequest) -> RemoteVmInfo:
        body = req.model_dump(mode="json", exclude_none=True)
        return await self._vm("POST", _vm_path(template, "deploy"), f"deploy {template}", body=body)

    async def set_template(self, name: str, template: bool) -> RemoteVmInfo:
        response = await self.call("PUT", _vm_path(name, "template"), body={"template": template})
        return RemoteVmInfo.from_api(response.json())

    async def move_disk(self, name: str, disk: str, datastore: str) -> DiskSpec:
        path = _vm_path(name, "disks", disk, "move")
        response = await self.call("POST", path, body={"datastore": datastore})
        return DiskSpec.model_validate(await self.result(response, f"{name}: move {disk}"))

    async def set_provisioning(self, name: str, disk: str, provisioning: str) -> DiskSpec:
        path = _vm_path(name, "disks", disk, "provisioning")
        response = await self.call("POST", path, body={"provisioning": provisioning})
        what = f"{name}: {disk} {provisioning}"
        return DiskSpec.model_validate(await self.result(response, what))

    async def export_ova(self, name: str, datastore: str, path: str) -> dict[str, Any]:
        body = {"datastore": datastore, "path": path}
        response = await self.call("POST", _vm_path(name, "export"), body=body)
        result: dict[str, Any] = await self.result(response, f"{name}: export")
        return result

    async def import_ovf(
        self,
        datastore: str,
        path: str,
        *,
        name: str | None = None,
        target: str | None = None,
        network: str = "user",
    ) -> RemoteVmInfo:
        body: dict[str, Any] = {"datastore": datastore, "path": path, "network": network}
        if name is not None:
            body["name"] = name
        if target is not None:
            body["target_datastore"] = target
        return await self._vm("POST", "/vms/import", f"import {path}", body=body)


def _snapshot(data: dict[str, Any]) -> Snapshot:
    """A snapshot from the API's answer (which adds its place in the tree)."""
    return Snapshot.model_validate({k: v for k, v in data.items() if k in Snapshot.model_fields})


def snapshot_tree(data: dict[str, Any]) -> SnapshotTree:
    snapshots = [_snapshot(s) for s in data["snapshots"]]
    return SnapshotTree(current=data.get("current"), snapshots=snapshots)


def _vm_path(name: str, *parts: str) -> str:
    return "/".join(["/vms", *(quote(p, safe="") for p in (name, *parts))])


class RemoteNetwork:
    """A host agent's switches and port groups over REST: the methods of
    ``NetworkService`` that the CLI calls (``RemoteHost.network``)."""

    def __init__(self, host: RemoteHost) -> None:
        self._host = host

    async def _get(self, path: str) -> Any:
        return (await self._host.call("GET", path)).json()

    async def list_switches(self) -> list[dict[str, Any]]:
        switches: list[dict[str, Any]] = await self._get("/networks/switches")
        return switches

    async def get_switch(self, name: str) -> dict[str, Any]:
        switch: dict[str, Any] = await self._get(_network_path("switches", name))
        return switch

    async def create_switch(self, spec: SwitchSpec) -> dict[str, Any]:
        # Only the fields given: the agent derives the rest (the bridge name) as it would.
        body = spec.model_dump(mode="json", exclude_unset=True)
        response = await self._host.call("POST", "/networks/switches", body=body)
        switch: dict[str, Any] = response.json()
        return switch

    async def delete_switch(self, name: str) -> None:
        await self._host.call("DELETE", _network_path("switches", name))

    async def list_port_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = await self._get("/networks/portgroups")
        return groups

    async def get_port_group(self, name: str) -> dict[str, Any]:
        group: dict[str, Any] = await self._get(_network_path("portgroups", name))
        return group

    async def create_port_group(self, switch: str, group: PortGroupSpec) -> dict[str, Any]:
        body = {**group.model_dump(mode="json"), "switch": switch}
        response = await self._host.call("POST", "/networks/portgroups", body=body)
        created: dict[str, Any] = response.json()
        return created

    async def update_port_group(self, name: str, vlan: int) -> dict[str, Any]:
        path = _network_path("portgroups", name)
        group: dict[str, Any] = (await self._host.call("PATCH", path, body={"vlan": vlan})).json()
        return group

    async def delete_port_group(self, name: str) -> None:
        await self._host.call("DELETE", _network_path("portgroups", name))


def _network_path(kind: str, name: str) -> str:
    return f"/networks/{kind}/{quote(name, safe='')}"


# --- The serial console ---------------------------------------------------------------


def attach_serial(
    login: Login,
    vm: str,
    port: str,
    stdin: BinaryIO,
    stdout: BinaryIO,
    *,
    history: int = 0,
    linger: float = 1.0,
) -> None:
    """Connect a terminal (or pipes) to a remote VM's serial console, as
    ``thinvisor.console.serial.attach`` does to a local one: Ctrl-] detaches; with piped
    input the session ends once the guest has been quiet ``linger`` seconds after it.
    ``history`` lines of what the port printed before come first."""
    conn = open_serial(login, vm, port)
    attach_console(conn, stdin, stdout, history=history, linger=linger)


@dataclass(frozen=True)
class ConsoleTarget:
    """A console WebSocket: where it is, what to send with it, and the certificate it
    must present."""

    url: str
    """``wss://...`` (or ``ws://`` for a plain-HTTP server)."""
    headers: Mapping[str, str]
    fingerprint: str | None
    """The pinned SHA-256 fingerprint of the server's certificate (None: plain HTTP)."""
    server: str
    """The server's base URL, as errors name it."""
    changed: Callable[[str, str | None, str | None], ThinvisorError] = CertificateChanged
    """The error for a certificate that is not the pinned one (server, seen, pinned)."""


def console_target(login: Login, path: str) -> ConsoleTarget:
    """The console at ``path`` (``/vms/web/console/serial?port=serial0``) of the API
    ``login`` is logged in to, with its token."""
    secure = login.url.startswith("https:")
    url = ("wss" if secure else "ws") + login.url[login.url.index(":") :] + API + path
    headers = {"Authorization": f"Bearer {login.token}"}
    return ConsoleTarget(url, headers, login.fingerprint if secure else None, login.url)


def attach_console(
    conn: ClientConnection,
    stdin: BinaryIO,
    stdout: BinaryIO,
    *,
    history: int = 0,
    linger: float = 1.0,
) -> None:
    """Connect a terminal (or pipes) to the open serial console ``conn`` (as
    ``attach_serial`` does); it is closed at the end."""
    in_fd, out_fd = stdin.fileno(), stdout.fileno()
    saved: list[Any] | None = None
    try:
        earlier = _history_frame(conn)
        if history and earlier:
            os.write(out_fd, b"\n".join(earlier.split(b"\n")[-history - 1 :]))
        if os.isatty(in_fd):
            saved = termios.tcgetattr(in_fd)
            tty.setraw(in_fd)
        _pump(conn, in_fd, out_fd, linger=linger, detach=saved is not None)
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        conn.close()


def open_serial(login: Login, vm: str, port: str) -> ClientConnection:
    """A WebSocket on a VM's serial port, through the pinned TLS of ``login``."""
    path = f"{_vm_path(vm, 'console', 'serial')}?port={quote(port, safe='')}"
    return open_console(console_target(login, path))


def open_console(target: ConsoleTarget) -> ClientConnection:
    """A WebSocket on ``target``, its certificate checked against the pinned one before
    anything (the token included) is sent."""
    tls = pinned_context(target.fingerprint) if target.url.startswith("wss:") else None
    try:
        return connect(
            target.url,
            ssl=tls,
            additional_headers=dict(target.headers),
            proxy=None,
            open_timeout=15,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        message = f"{target.server}: the console was refused (HTTP {status})"
        raise RemoteError("http_error", message) from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        if tls is not None and tls.mismatch:
            raise target.changed(target.server, tls.seen, tls.pinned) from exc
        raise ThinvisorError(f"cannot reach {target.server}: {exc}") from exc


def _history_frame(conn: ClientConnection) -> bytes:
    """The agent's first frame, the port's history, if it comes before the guest says
    anything (it is sent at once; nothing has been sent to the guest yet)."""
    try:
        message = conn.recv(timeout=_HISTORY_WAIT_S)
    except TimeoutError:
        return b""
    except ConnectionClosed as exc:
        raise _closed_error(exc) or ThinvisorError("the console closed") from exc
    return message if isinstance(message, bytes) else message.encode()


def _closed_error(exc: ConnectionClosed) -> ThinvisorError | None:
    """The agent's reason for closing, unless it closed normally."""
    if exc.rcvd is None or exc.rcvd.code in _CLOSE_NORMAL:
        return None
    return ThinvisorError(exc.rcvd.reason or f"the console closed (code {exc.rcvd.code})")


def _pump(conn: ClientConnection, in_fd: int, out_fd: int, *, linger: float, detach: bool) -> None:
    closed: list[ConnectionClosed] = []
    last_output = [time.monotonic()]

    def receive() -> None:
        try:
            for message in conn:
                os.write(out_fd, message if isinstance(message, bytes) else message.encode())
                last_output[0] = time.monotonic()
        except ConnectionClosed as exc:
            closed.append(exc)

    reader = threading.Thread(target=receive, name="console-reader", daemon=True)
    reader.start()
    with contextlib.suppress(ConnectionClosed):  # the reader saw why
        _send_input(conn, in_fd, reader, last_output, linger=linger, detach=detach)
    conn.close()
    reader.join(5)
    error = _closed_error(closed[0]) if closed else None
    if error is not None:
        raise error


def _send_input(
    conn: ClientConnection,
    in_fd: int,
    reader: threading.Thread,
    last_output: list[float],
    *,
    linger: float,
    detach: bool,
) -> None:
    """Send what comes on ``in_fd`` until the detach key, the end of the connection, or
    the guest's silence for ``linger`` seconds after the input ended."""
    input_done_at: float | None = None
    with selectors.DefaultSelector() as sel:
        sel.register(in_fd, selectors.EVENT_READ)
        while reader.is_alive():
            if input_done_at is not None:
                now = time.monotonic()
                quiet = now - max(input_done_at, last_output[0])
                if quiet >= linger or now - input_done_at >= _LINGER_MAX_S:
                    return
            for _ in sel.select(0.1):
                data = os.read(in_fd, 4096)
                if not data:
                    sel.unregister(in_fd)
                    input_done_at = time.monotonic()
                    break
                if detach and DETACH_KEY in data:
                    if head := data.split(DETACH_KEY, 1)[0]:
                        conn.send(head)
                    return
                conn.send(data)


# --- Datastores -----------------------------------------------------------------------


class RemoteDatastores:
    """A host agent's datastores over REST: the methods of ``DatastoreService`` that the
    CLI calls (``RemoteHost.datastores``). Files stream both ways, never whole in memory."""

    def __init__(self, host: RemoteHost) -> None:
        self._host = host

    async def list_datastores(self) -> list[Datastore]:
        response = await self._host.call("GET", "/datastores")
        return [Datastore.model_validate(d) for d in response.json()]

    async def get_datastore(self, name: str) -> Datastore:
        response = await self._host.call("GET", _datastore_path(name))
        return Datastore.model_validate(response.json())

    async def add_datastore(self, name: str, path: str | Path) -> Datastore:
        body = {"name": name, "path": str(path)}
        response = await self._host.call("POST", "/datastores", body=body)
        return Datastore.model_validate(response.json())

    async def remove_datastore(self, name: str) -> None:
        await self._host.call("DELETE", _datastore_path(name))

    async def vm_storage(self, name: str) -> VmStorage:
        response = await self._host.call("GET", _vm_path(name, "storage"))
        return VmStorage.model_validate(response.json())

    @contextlib.asynccontextmanager
    async def _stream(self, path: str) -> AsyncIterator[httpx.Response]:
        """A GET whose body is read as it comes; error answers become thinvisor errors."""
        host = self._host
        try:
            async with host._client.stream("GET", path) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise host.answer_error(response)
                yield response
        except httpx.TransportError as exc:
            raise host._transport_error(exc) from exc

    async def list_dir(self, ds: str, path: str = "") -> list[FileEntry]:
        """A directory's entries; for a file, its own entry (its content is not fetched)."""
        async with self._stream(_files_path(ds, path)) as response:
            if _is_listing(response):
                await response.aread()
                return [FileEntry.model_validate(e) for e in response.json()["entries"]]
        parent, _, name = path.strip("/").rpartition("/")
        found = [e for e in await self.list_dir(ds, parent) if e.name == name]
        if not found:
            raise NotFound(f"{path} does not exist")
        return found

    async def make_dir(self, ds: str, path: str) -> FileEntry:
        response = await self._host.call("POST", _datastore_path(ds, "dirs", path))
        return FileEntry.model_validate(response.json())

    async def delete(self, ds: str, path: str) -> None:
        await self._host.call("DELETE", _files_path(ds, path))

    async def upload(
        self, ds: str, path: str, local: Path, *, overwrite: bool = False
    ) -> FileEntry:
        """Stream the local file ``local`` to ``path`` in the datastore."""
        size = await asyncio.to_thread(local_source, local)
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        host = self._host
        with host._watch(f"upload {local.name}") as watch:
            try:
                response = await host._client.put(
                    _files_path(ds, path),
                    content=_watched(file_chunks(local), size, watch),
                    headers=headers,
                    params={"overwrite": overwrite},
                )
            except httpx.TransportError as exc:
                raise host._transport_error(exc) from exc
        if response.status_code >= 400:
            raise host.answer_error(response)
        return FileEntry.model_validate(response.json())

    async def download(self, ds: str, path: str, local: Path, *, overwrite: bool = False) -> Path:
        """Stream a file of the datastore to ``local`` (a file, or a directory to put it
        in); the local file written."""
        async with self._stream(_files_path(ds, path)) as response:
            if _is_listing(response):
                raise InvalidArgument("path", f"{path or '/'} is a directory")
            name = PurePosixPath(path).name
            target = await asyncio.to_thread(download_target, local, name)
            await write_stream(
                target, response.aiter_bytes(), max_bytes=sys.maxsize, overwrite=overwrite
            )
        return target


def _datastore_path(name: str, *parts: str) -> str:
    tail = "".join(f"/{quote(p)}" for p in parts if p)
    return f"/datastores/{quote(name, safe='')}{tail}"


def _files_path(ds: str, path: str) -> str:
    return _datastore_path(ds, "files", path.strip("/"))


def _is_listing(response: httpx.Response) -> bool:
    """A browse answer: a directory's listing (JSON), not a file's content."""
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("application/json")


async def _watched(
    chunks: AsyncIterator[bytes], total: int, watch: TaskWatch
) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in chunks:
        sent += len(chunk)
        percent = sent * 100 // total if total else 100
        watch({"progress": percent, "message": f"{sent} of {total} bytes"})
        yield chunk
