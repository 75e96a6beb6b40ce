"""The CLI's client of a center: its login, its REST API through pinned TLS, and the
plumbing the ``thinvisor center`` commands share.

``thinvisor center login`` stores the center's URL, an API token and the SHA-256
fingerprint of the center's certificate in ``center-login.json`` beside the host login
(``thinvisor login``), so that one can be logged in to a host and a center at once. Every
connection checks the certificate against that fingerprint right after the TLS handshake,
before the request (or the token) is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from thinvisor.cli import common
from thinvisor.cli.remote import (
    API,
    Login,
    RemoteError,
    error_from,
    error_of_response,
    load_login,
    login_path,
    pinned_context,
)
from thinvisor.errors import InvalidArgument, InvalidConfig, NotFound, ThinvisorError

T = TypeVar("T")

DEFAULT_CENTER_PORT = 9443
_FINISHED = ("success", "error")

TaskWatch = Callable[[dict[str, Any]], None]


def center_login_path() -> Path:
    """``$XDG_CONFIG_HOME/thinvisor/center-login.json`` (``~/.config`` by default)."""
    return login_path().with_name("center-login.json")


def load_center_login() -> Login:
    """The stored center login; ``InvalidConfig`` saying how to log in if there is none."""
    path = center_login_path()
    try:
        login = load_login(path)
    except InvalidConfig:
        raise InvalidConfig(
            f"login: {path} is not a center login; run 'thinvisor center login' again"
        ) from None
    if login is None:
        raise InvalidConfig("not logged in to a center: run 'thinvisor center login URL' first")
    return login


def center_url(text: str) -> str:
    """A center's base URL from what a user types: ``https://host:port``, ``host:port`` or
    ``host`` (https and port 9443 assumed); a trailing ``/api/v1`` is dropped."""
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
        raise InvalidArgument("url", f"{text!r}: give the center's address without a path")
    port = url.port or (DEFAULT_CENTER_PORT if "://" not in text else None)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}" + (f":{port}" if port else "")


def on_center(
    work: Callable[[CenterClient], Awaitable[T]],
    explain: Callable[[ThinvisorError], None] | None = None,
) -> T:
    """Run ``work`` on the logged-in center; thinvisor errors become one line (``explain``
    may say more about one, and exit)."""
    login: Login = common.guard(load_center_login)

    async def go() -> T:
        async with CenterClient(login, show_progress=sys.stderr.isatty()) as center:
            return await work(center)

    try:
        return asyncio.run(go())
    except ThinvisorError as exc:
        if explain is not None:
            explain(exc)
        common.fail(str(exc))


def print_table(columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else escape(str(cell)) for cell in row))
    common.console().print(table)


class CenterCertificateChanged(ThinvisorError):
    """The center answered with another certificate than the one pinned at login."""

    http_status = 502

    def __init__(self, url: str, seen: str | None, pinned: str | None) -> None:
        super().__init__(
            f"{url}: the center's certificate has changed (fingerprint {seen}, pinned "
            f"{pinned}); if that is expected, run 'thinvisor center login {url}' again"
        )


class CenterClient:
    """A center's REST API. Use it as an async context manager.

    Operations answer with a task: ``result`` follows it to its end, with a progress bar
    on stderr when ``show_progress``.
    """

    def __init__(self, login: Login, *, show_progress: bool = False, timeout: float = 120.0):
        self.login = login
        self.show_progress = show_progress
        self._tls = pinned_context(login.fingerprint) if login.url.startswith("https:") else None
        headers = {"Authorization": f"Bearer {login.token}"} if login.token else {}
        self.client = httpx.AsyncClient(
            base_url=login.url + API,
            headers=headers,
            verify=self._tls or True,
            timeout=httpx.Timeout(timeout, connect=10.0),
            trust_env=False,
        )

    async def __aenter__(self) -> CenterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.aclose()

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
            response = await self.client.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        if response.status_code >= 400:
            error = error_of_response(response)
            if response.status_code == 401 and self.login.token:
                message = f"{error}; log in again: thinvisor center login {self.login.url}"
                error = RemoteError("unauthorized", message, 401)
            raise error
        return response

    async def get(self, route: str, /, **params: Any) -> Any:
        """The JSON answer of a GET; parameters that are None are left out."""
        given = {k: v for k, v in params.items() if v is not None}
        return (await self.call("GET", route, params=given)).json()

    def _transport_error(self, exc: httpx.TransportError) -> ThinvisorError:
        url = self.login.url
        if self._tls is not None and self._tls.mismatch:
            return CenterCertificateChanged(url, self._tls.seen, self._tls.pinned)
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
        delay = 0.05
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

    # What commands name by path, id or name

    async def node(self, ref: str) -> dict[str, Any]:
        """The inventory object at a path (``/dc1/prod``), with an id, or the host or VM
        of a name (unique among hosts and VMs)."""
        if ref.startswith("/"):
            at_path: dict[str, Any] = await self.get("/nodes", path=ref)
            return at_path
        node_id = ref if ref.isdecimal() else (await self._named(ref))["id"]
        found: dict[str, Any] = await self.get(f"/nodes/{node_id}")
        return found

    async def _named(self, ref: str) -> dict[str, Any]:
        """The one host or VM named ``ref``."""
        if "*" in ref or "?" in ref:
            raise InvalidArgument("path", f"{ref!r}: name one object, not a pattern")
        hosts: list[dict[str, Any]] = await self.get("/hosts")
        vms: list[dict[str, Any]] = await self.get("/vms", name=ref)
        found = [h for h in hosts if h["name"] == ref] + vms
        if not found:
            raise NotFound(f"no host or VM named {ref!r}; give a path such as /dc1/folder")
        return _one("object", ref, found)

    async def host(self, ref: str) -> dict[str, Any]:
        """A host by path, id or name (a name must be unique)."""
        if ref.isdecimal():
            by_id: dict[str, Any] = await self.get(f"/hosts/{ref}")
            return by_id
        hosts: list[dict[str, Any]] = await self.get("/hosts")
        key = "path" if ref.startswith("/") else "name"
        return _one("host", ref, [h for h in hosts if h[key] == ref])

    async def vm(self, ref: str) -> dict[str, Any]:
        """A VM or template by path, id or name (a name must be unique across hosts)."""
        if ref.isdecimal():
            by_id: dict[str, Any] = await self.get(f"/vms/{ref}")
            return by_id
        if ref.startswith("/"):
            node = await self.node(ref)
            if node["kind"] != "vm":
                raise InvalidArgument("vm", f"{node['kind']} {ref} is not a VM")
            at_path: dict[str, Any] = await self.get(f"/vms/{node['id']}")
            return at_path
        if "*" in ref or "?" in ref:
            raise InvalidArgument("vm", f"{ref!r}: name one VM, not a pattern")
        return _one("vm", ref, await self.get("/vms", name=ref))


def _one(kind: str, ref: str, found: list[dict[str, Any]]) -> dict[str, Any]:
    if not found:
        raise NotFound(f"no {kind} named {ref!r}")
    if len(found) > 1:
        paths = ", ".join(f["path"] for f in found)
        raise InvalidArgument(
            kind, f"{len(found)} {kind}s are named {ref!r} ({paths}): give a path"
        )
    return found[0]
