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
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from rich.markup import escape
from rich.table import Table

from thinvisor.cli import common
from thinvisor.cli.remote import ApiClient, Login, api_url, load_login, login_path
from thinvisor.errors import InvalidArgument, InvalidConfig, NotFound, ThinvisorError

T = TypeVar("T")

DEFAULT_CENTER_PORT = 9443


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
    return api_url(text, DEFAULT_CENTER_PORT, "center")


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


class CenterClient(ApiClient):
    """A center's REST API. Use it as an async context manager.

    Operations answer with a task: ``result`` follows it to its end, with a progress bar
    on stderr when ``show_progress``.
    """

    login_command = "thinvisor center login"
    first_poll_s = 0.05

    def certificate_changed(self, seen: str | None, pinned: str | None) -> ThinvisorError:
        return CenterCertificateChanged(self.login.url, seen, pinned)

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

    # Tasks

    async def task(self, ref: str) -> dict[str, Any]:
        """A task by its id, or by the start of it (as ``thinvisor center tasks`` shows
        it) where that names one of the recent tasks."""
        recent: list[dict[str, Any]] = await self.get("/tasks", limit=500)
        found = [t for t in recent if t["id"] == ref] or [
            t for t in recent if t["id"].startswith(ref)
        ]
        if len(found) > 1:
            raise InvalidArgument("task", f"{len(found)} tasks' ids begin {ref!r}: give more of it")
        if found:
            return found[0]
        by_id: dict[str, Any] = await self.get(f"/tasks/{quote(ref, safe='')}")
        return by_id

    async def cancel_task(self, ref: str, *, wait: bool = True) -> dict[str, Any]:
        """Cancel a task (a migration): the task once it has ended (without ``wait``: as
        the center took the cancel). ``Unsupported`` if it cannot be, ``Busy`` if it has
        finished."""
        found = await self.task(ref)
        path = f"/tasks/{quote(found['id'], safe='')}"
        task: dict[str, Any] = (await self.call("POST", f"{path}/cancel")).json()
        delay = self.first_poll_s
        while wait and task["state"] not in ("success", "error"):
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
            task = await self.get(path)
        return task


def _one(kind: str, ref: str, found: list[dict[str, Any]]) -> dict[str, Any]:
    if not found:
        raise NotFound(f"no {kind} named {ref!r}")
    if len(found) > 1:
        paths = ", ".join(f["path"] for f in found)
        raise InvalidArgument(
            kind, f"{len(found)} {kind}s are named {ref!r} ({paths}): give a path"
        )
    return found[0]
