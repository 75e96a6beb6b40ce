"""``thinvisor center``: run a center, and manage every host and VM through it.

``serve``, ``init`` and ``user`` work on the local center's files (its configuration:
``--config``, ``THINVISOR_CENTER_CONFIG`` or ``/etc/thinvisor/center.toml``). Every other
command works on the center of ``thinvisor center login``, over its REST API; objects are
named by path (``/dc1/prod/host1``), by id, and hosts and VMs also by a unique name.
Operations wait for their task, with progress on a terminal, unless ``--no-wait``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.tree import Tree
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect

from thinvisor.auth import Role, UserStore
from thinvisor.center.config import CENTER_CONFIG_ENV, CenterConfig, load_center_config
from thinvisor.cli import center_ha, center_rules, center_vm, common
from thinvisor.cli.center_client import (
    CenterClient,
    center_login_path,
    center_url,
    load_center_login,
    on_center,
    print_table,
)
from thinvisor.cli.remote import (
    API,
    Login,
    pinned_context,
    remove_login,
    save_login,
    server_fingerprint,
)
from thinvisor.cli.users import PasswordFileOpt, check_new_user, read_password
from thinvisor.errors import AlreadyExists, InvalidArgument, ThinvisorError
from thinvisor.fs import private_dir
from thinvisor.providers import canonical_address

app = typer.Typer(
    help="The management center: hosts of every vendor, and their VMs, in one inventory.",
    no_args_is_help=True,
)
user_app = typer.Typer(help="Users of the local center.", no_args_is_help=True)
datacenter_app = typer.Typer(help="Datacenters: the roots of the inventory.", no_args_is_help=True)
folder_app = typer.Typer(help="Folders in datacenters and folders.", no_args_is_help=True)
cluster_app = typer.Typer(help="Clusters in datacenters and folders.", no_args_is_help=True)
host_app = typer.Typer(help="Managed hosts: thinvisor, libvirt, vSphere.", no_args_is_help=True)
tag_app = typer.Typer(help="Tags on inventory objects.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(datacenter_app, name="datacenter")
app.add_typer(folder_app, name="folder")
app.add_typer(cluster_app, name="cluster")
app.add_typer(host_app, name="host")
app.add_typer(center_vm.app, name="vm")
app.add_typer(tag_app, name="tag")
app.add_typer(center_rules.app, name="rule")
app.add_typer(center_ha.app, name="ha")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar=CENTER_CONFIG_ENV,
        help="Center configuration file (default: /etc/thinvisor/center.toml).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
PathArg = Annotated[
    str, typer.Argument(help="An inventory path (/dc1/folder), an id, or a host's or VM's name.")
]

out = common.console()
_FINGERPRINT = re.compile(r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}")


# --- helpers --------------------------------------------------------------------------


def show(data: Any, json_out: bool, text: Callable[[Any], None]) -> None:
    """``data`` as JSON, or as ``text`` prints it."""
    if json_out:
        common.print_json(data)
    else:
        text(data)


def normal_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as thinvisor shows it (``AB:CD:...``), from any spelling."""
    compact = text.strip().replace(":", "").upper()
    if not re.fullmatch(r"[0-9A-F]{64}", compact):
        raise InvalidArgument("fingerprint", f"{text!r} is not a SHA-256 fingerprint (AB:CD:...)")
    return ":".join(compact[i : i + 2] for i in range(0, 64, 2))


def _password(path: Path | None, prompt: str = "Password") -> str:
    if path is not None:
        password: str = common.guard(lambda: read_password(path))
        return password
    typed: str = typer.prompt(prompt, hide_input=True)
    return typed


# --- the local center -----------------------------------------------------------------


def _config(path: Path | None) -> CenterConfig:
    config: CenterConfig = common.guard(lambda: load_center_config(path))
    return config


@app.command()
def serve(
    listen: Annotated[
        str | None, typer.Option(help="Address to listen on (default: the configuration's).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: the configuration's, 9443).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the center: its REST API, and the sync of every host it manages."""
    from thinvisor.center.server import serve as run_server

    settings = _config(config)
    common.guard(lambda: private_dir(settings.state_dir))
    common.guard(lambda: run_server(settings, listen=listen, port=port))


def _users(config: Path | None, *, create: bool = False) -> UserStore:
    """The local center's users; its state directory made private first (and made, with
    ``create``)."""
    state_dir = _config(config).state_dir
    if create or state_dir.exists():
        common.guard(lambda: private_dir(state_dir))
    return UserStore(state_dir / "users.json")


@app.command()
def init(
    user: Annotated[str, typer.Option("--user", help="The admin's name.")] = "admin",
    password_file: PasswordFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create the first admin user of a new center."""
    users = _users(config, create=True)

    def go() -> str:
        if not users.is_empty():
            raise AlreadyExists(f"users already exist in {users.path}; see 'center user add'")
        check_new_user(users, user)
        created = users.add_first_user(user, read_password(password_file))
        return f"created admin user {created.name!r} in {users.path}"

    typer.echo(common.guard(go))


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="The user's name.")],
    role: Annotated[
        Role,
        typer.Option(
            "--role",
            help="Their role at the root of the tree (no-access: only what grants give them).",
        ),
    ],
    password_file: PasswordFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Add a user with a role (grants give them other roles on parts of the tree)."""
    users = _users(config, create=True)

    def go() -> str:
        check_new_user(users, name)
        created = users.add_user(name, read_password(password_file), role)
        return f"added user {created.name!r} with role {created.role}"

    typer.echo(common.guard(go))


@user_app.command("list")
def user_list(json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List the users and their roles."""
    users = common.guard(lambda: _users(config).users())
    rows = [[u.name, u.role, u.created.isoformat()] for u in users]
    show(
        [u.to_dict() for u in users],
        json_out,
        lambda _: print_table(["NAME", "ROLE", "CREATED"], rows),
    )


@user_app.command("remove")
def user_remove(
    name: Annotated[str, typer.Argument(help="The user's name.")], config: ConfigOpt = None
) -> None:
    """Remove a user, their tokens and the roles granted to them in the inventory."""
    from thinvisor.center.db import open_database
    from thinvisor.center.permissions import Permissions

    settings = _config(config)
    users = _users(config)

    def go() -> int:
        # The database first: a user whose grants cannot be revoked is not removed,
        # lest a new user of the same name inherit them.
        database = open_database(settings.database_url)
        try:
            users.remove_user(name)
            return Permissions(database).revoke_all(name)
        finally:
            database.close()

    revoked: int = common.guard(go)
    grants = f" and their roles on {revoked} object{'s' if revoked != 1 else ''}" if revoked else ""
    typer.echo(f"removed user {name!r}{grants}")


@user_app.command("passwd")
def user_passwd(
    name: Annotated[str, typer.Argument(help="The user's name.")],
    password_file: PasswordFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Set a user's password."""
    users = _users(config)

    def go() -> None:
        users.get(name)
        users.set_password(name, read_password(password_file))

    common.guard(go)
    typer.echo(f"changed the password of {name!r}")


@user_app.command("role")
def user_role(
    name: Annotated[str, typer.Argument(help="The user's name.")],
    role: Annotated[
        Role,
        typer.Argument(
            help="Their role at the root of the tree (no-access: only what grants give them)."
        ),
    ],
    config: ConfigOpt = None,
) -> None:
    """Change a user's own role."""
    changed = common.guard(lambda: _users(config).set_role(name, role))
    typer.echo(f"user {changed.name!r} now has role {changed.role}")


# --- logging in -----------------------------------------------------------------------


@app.command()
def login(
    url: Annotated[str, typer.Argument(help="The center, like https://HOST:9443.")],
    user: Annotated[str, typer.Option("--user", prompt="User", help="The user to log in as.")],
    password_file: PasswordFileOpt = None,
    fingerprint: Annotated[
        str | None,
        typer.Option(help="The SHA-256 fingerprint the center's certificate must have."),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Trust the center's certificate without asking.")
    ] = False,
) -> None:
    """Log in to a center; the other center commands then work on it."""
    base = common.guard(lambda: center_url(url))
    pinned = None
    if base.startswith("https:"):
        seen: str = common.guard(lambda: server_fingerprint(base))
        pinned = _trust(base, seen, fingerprint, yes)
    else:
        typer.echo(f"warning: {base} is plain HTTP: passwords and tokens travel in clear", err=True)
    password = _password(password_file)
    pending = Login(url=base, token="", fingerprint=pinned, user=user)
    label = f"thinvisor CLI on {socket.gethostname()}"

    async def go() -> dict[str, Any]:
        async with CenterClient(pending) as center:
            return await center.log_in(user, password, label)

    answer = common.guard(lambda: asyncio.run(go()))
    done = pending.model_copy(update={"token": answer["token"], "user": answer["user"]})
    path = common.guard(lambda: save_login(done, center_login_path()))
    typer.echo(f"logged in to {base} as {done.user} ({answer.get('role', '?')}); saved in {path}")


def _trust(url: str, seen: str, given: str | None, yes: bool) -> str:
    """The fingerprint to pin: the one given (it must be the one seen), or the one seen
    once confirmed."""
    if given is not None:
        expected = common.guard(lambda: normal_fingerprint(given))
        if expected != seen:
            common.fail(f"fingerprint: {url} presented a certificate with fingerprint {seen}")
        return seen
    typer.echo(f"The certificate of {url} has the SHA-256 fingerprint\n  {seen}", err=True)
    if not yes:
        typer.echo("Compare it with the one the center logged when it started.", err=True)
        if not typer.confirm("Trust this certificate?", default=False, err=True):
            common.fail("not logged in: the certificate was not trusted")
    return seen


@app.command()
def logout() -> None:
    """Forget the center login."""
    path = center_login_path()
    if not path.exists():
        typer.echo("not logged in to a center")
        return
    forgotten = common.guard(lambda: remove_login(path))
    typer.echo(f"logged out{f' of {forgotten.url}' if forgotten else ''}")


@app.command()
def info(json_out: JsonOpt = False) -> None:
    """The center: version, TLS fingerprint, database, hosts and VMs by state."""
    data = on_center(lambda c: c.get("/center"))

    def text(d: dict[str, Any]) -> None:
        # Plain lines, not a table: a table cuts what does not fit the terminal, and the
        # fingerprint must be shown whole to be compared.
        rows = [
            ("version", f"thinvisor {d['version']}"),
            ("TLS fingerprint", d["tls_fingerprint"] or "(plain HTTP)"),
            ("database", d["database"]),
            ("hosts", _counts(d["hosts"])),
            ("VMs", _counts(d["vms"])),
            ("templates", d["templates"]),
        ]
        for key, value in rows:
            typer.echo(f"{key:<17}{value}")

    show(data, json_out, text)


def _counts(by_state: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(by_state.items())) or "none"


# --- the tree -------------------------------------------------------------------------


@app.command()
def tree(json_out: JsonOpt = False) -> None:
    """The inventory: datacenters, folders, clusters, hosts and their VMs."""
    show(on_center(lambda c: c.get("/inventory")), json_out, _print_tree)


def _print_tree(roots: list[dict[str, Any]]) -> None:
    if not roots:
        typer.echo("the inventory is empty; start with 'thinvisor center datacenter create'")
        return
    top = Tree("/", guide_style="dim")
    _branches(top, roots)
    out.print(top)


def _branches(parent: Tree, entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        _branches(parent.add(_label(entry)), entry["children"])


def _label(entry: dict[str, Any]) -> str:
    state = entry.get("state") or entry.get("power_state")
    detail = f"{entry['kind']}, {state}" if state else entry["kind"]
    if entry.get("template"):
        detail = "template"
    return f"{escape(entry['name'])} [dim]({detail})[/dim]"


def _created(kind: str, parent: str | None, name: str) -> None:
    async def go(center: CenterClient) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if parent is not None:
            body["parent"] = (await center.node(parent))["id"]
        created: dict[str, Any] = (await center.call("POST", f"/{kind}s", body=body)).json()
        return created

    typer.echo(f"created {kind} {on_center(go)['path']}")


@datacenter_app.command("create")
def datacenter_create(name: Annotated[str, typer.Argument(help="Its name.")]) -> None:
    """Make a datacenter."""
    _created("datacenter", None, name)


@folder_app.command("create")
def folder_create(parent: PathArg, name: Annotated[str, typer.Argument(help="Its name.")]) -> None:
    """Make a folder in a datacenter or a folder."""
    _created("folder", parent, name)


@cluster_app.command("create")
def cluster_create(parent: PathArg, name: Annotated[str, typer.Argument(help="Its name.")]) -> None:
    """Make a cluster in a datacenter or a folder."""
    _created("cluster", parent, name)


@cluster_app.command("balance")
def cluster_balance(
    cluster: Annotated[str, typer.Argument(help="The cluster: its path or id.")],
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Print the task's id instead of waiting for it.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Even out a cluster's hosts once: live-migrate VMs that break an anti-affinity rule,
    then the few that even out memory use. A VM moved so is left alone for 10 minutes."""

    async def what(center: CenterClient) -> tuple[str, str, None]:
        node = await center.node(cluster)
        if node["kind"] != "cluster":
            raise InvalidArgument("cluster", f"{node['kind']} {node['path']} is not a cluster")
        return "POST", f"/clusters/{node['id']}/balance", None

    result = center_vm.operation(what, no_wait)
    if json_out:
        common.print_json(result)
    elif no_wait:
        typer.echo(f"task {result['id']} started: {result['kind']} {result['object']}")
    else:
        typer.echo(balanced(result))
    if not no_wait and any(move["error"] for move in result["moves"]):
        raise typer.Exit(1)


def balanced(result: dict[str, Any]) -> str:
    """What a pass of the balancer did, a line per move."""
    if not result["moves"]:
        return f"cluster {result['cluster']} is balanced: nothing to move"
    lines = []
    for m in result["moves"]:
        if m["error"] is None:
            lines.append(f"moved {m['vm']} from {m['from']} to {m['to']}: {m['reason']}")
        else:
            lines.append(f"did not move {m['vm']} to {m['to']}: {m['error']}")
    return "\n".join(lines)


def _change(path: str, change: Callable[[CenterClient], Awaitable[dict[str, Any]]]) -> None:
    async def go(center: CenterClient) -> tuple[str, str]:
        node = await center.node(path)
        body = await change(center)
        changed = (await center.call("PATCH", f"/nodes/{node['id']}", body=body)).json()
        return node["path"], changed["path"]

    before, after = on_center(go)
    typer.echo(f"{before} is now {after}")


@app.command()
def move(path: PathArg, parent: Annotated[str, typer.Argument(help="The new parent.")]) -> None:
    """Move a folder, cluster or host (with all it holds) into another parent."""

    async def body(center: CenterClient) -> dict[str, Any]:
        return {"parent": (await center.node(parent))["id"]}

    _change(path, body)


@app.command()
def rename(path: PathArg, name: Annotated[str, typer.Argument(help="The new name.")]) -> None:
    """Rename a datacenter, folder, cluster or host."""

    async def body(center: CenterClient) -> dict[str, Any]:
        return {"name": name}

    _change(path, body)


@app.command()
def remove(path: PathArg) -> None:
    """Delete an empty datacenter, folder or cluster (hosts: 'center host remove')."""

    async def go(center: CenterClient) -> str:
        node = await center.node(path)
        await center.call("DELETE", f"/nodes/{node['id']}")
        return f"removed {node['kind']} {node['path']}"

    typer.echo(on_center(go))


# --- hosts ----------------------------------------------------------------------------

HostArg = Annotated[str, typer.Argument(help="The host: its path, id or name.")]


#: What to compare a host's certificate with, by provider (others: ``_CHECK_IT``).
_WHERE_TO_CHECK = {
    "thinvisor": "check it on the host ('thinvisor host info' there)",
    "vsphere": "compare it with the fingerprint of the certificate the vCenter or ESXi "
    "shows (in its client, or with openssl)",
}
_CHECK_IT = "check it on the host"


@host_app.command("add")
def host_add(
    address: Annotated[
        str, typer.Argument(help="https://HOST:8443, a libvirt URI, https://VCENTER, ...")
    ],
    provider: Annotated[
        str, typer.Option(help="thinvisor, libvirt, vsphere or fake.", show_default=False)
    ],
    parent: Annotated[str, typer.Option(help="The datacenter, folder or cluster to put it in.")],
    user: Annotated[str | None, typer.Option("--user", help="The user on the host.")] = None,
    password_file: PasswordFileOpt = None,
    fingerprint: Annotated[
        str | None, typer.Option(help="The SHA-256 fingerprint of the host's certificate.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Its name (default: the one the host gives).")
    ] = None,
    yes: Annotated[
        bool,
        typer.Option("--yes", "-y", help="Trust the host's certificate without asking."),
    ] = False,
) -> None:
    """Connect to a host and manage it from now on.

    Without --fingerprint, the host's certificate is shown first, before any password is
    asked: trust it at the prompt (or with --yes), or run again with --fingerprint."""
    pinned = None if fingerprint is None else common.guard(lambda: normal_fingerprint(fingerprint))
    if pinned is None:
        pinned = _seen_fingerprint(provider, address, yes)
    password = None
    if user is not None or password_file is not None:
        password = _password(password_file, f"Password of {user or 'the host'}")
    body = {"provider": provider, "address": address, "username": user, "password": password}
    body |= {"fingerprint": pinned, "name": name}

    def explain(exc: ThinvisorError) -> None:
        if isinstance(exc, InvalidArgument) and exc.field == "fingerprint" and pinned is None:
            _unpinned(provider, address, exc)

    added = on_center(lambda center: _register(center, parent, body, yes), explain)
    state = added["state"] + (f": {added['error']}" if added.get("error") else "")
    typer.echo(f"added host {added['path']} ({added['provider']}, {state})")


async def _register(
    center: CenterClient, parent: str, body: dict[str, Any], yes: bool
) -> dict[str, Any]:
    """Register the host ``body`` describes under ``parent``; with ``yes`` and no
    fingerprint, the one the center saw is shown and trusted."""
    body = body | {"parent": (await center.node(parent))["id"]}
    try:
        added: dict[str, Any] = (await center.call("POST", "/hosts", body=body)).json()
    except InvalidArgument as exc:
        # Hosts this machine cannot reach, and providers whose certificate the center
        # checks itself: the center says which certificate it saw.
        seen = _FINGERPRINT.search(exc.reason) if exc.field == "fingerprint" else None
        if not (yes and body["fingerprint"] is None and seen):
            raise
        _show_fingerprint(body["address"], seen.group())
        body["fingerprint"] = seen.group()
        added = (await center.call("POST", "/hosts", body=body)).json()
    return added


def _seen_fingerprint(provider: str, address: str, yes: bool) -> str | None:
    """The fingerprint of the certificate the host presents, once trusted (shown, then
    confirmed at a prompt or by ``yes``; else the command stops saying how to go on).
    None where the host has no certificate, or cannot be reached from here (the center
    then says what it sees)."""
    if provider not in _WHERE_TO_CHECK:
        return None
    url: str = common.guard(lambda: canonical_address(provider, address))
    if not url.startswith("https:"):
        return None
    try:
        seen = server_fingerprint(url)
    except ThinvisorError:
        return None
    if not yes and not sys.stdin.isatty():
        common.fail(_rerun(provider, address, seen))
    _show_fingerprint(address, seen)
    if not yes:
        typer.echo(f"To trust it, {_WHERE_TO_CHECK[provider]} first.", err=True)
        if not typer.confirm("Trust this certificate?", default=False, err=True):
            common.fail(
                "host not added: the certificate was not trusted "
                f"(once it is checked, run again with --fingerprint {seen})"
            )
    return seen


def _show_fingerprint(address: str, seen: str) -> None:
    typer.echo(f"The certificate of {address} has the SHA-256 fingerprint\n  {seen}", err=True)


def _rerun(provider: str, address: str, seen: str) -> str:
    """One line: the fingerprint a host presented, and how to trust it."""
    check = _WHERE_TO_CHECK.get(provider, _CHECK_IT)
    return (
        f"fingerprint: {address} presented a certificate with SHA-256 fingerprint {seen}; "
        f"{check} and run again with --fingerprint {seen}"
    )


def _unpinned(provider: str, address: str, exc: InvalidArgument) -> None:
    """Say which fingerprint the host presented to the center, and how to trust it."""
    seen = _FINGERPRINT.search(exc.reason)
    if seen is not None:
        common.fail(_rerun(provider, address, seen.group()))


@host_app.command("list")
def host_list(json_out: JsonOpt = False) -> None:
    """The hosts, by path, with their connection state, maintenance mode and CPU load
    (at the last sync; - where the host does not say, or is disconnected)."""
    hosts = on_center(lambda c: c.get("/hosts"))
    rows = [
        [
            h["path"],
            h["provider"],
            h["address"],
            h["state"],
            "yes" if h["maintenance"] else "no",
            _cpu_load(h),
            h["version"],
            h["error"],
        ]
        for h in hosts
    ]
    columns = ["PATH", "PROVIDER", "ADDRESS", "STATE", "MAINTENANCE", "CPU", "VERSION", "ERROR"]
    show(hosts, json_out, lambda _: print_table(columns, rows))


def _cpu_load(host: dict[str, Any]) -> str:
    """A host's CPU load as last synced; - where it does not say or is away."""
    load = host.get("cpu_load")
    return "-" if load is None or host["state"] != "connected" else f"{load:.0%}"


class Switch(StrEnum):
    ON = "on"
    OFF = "off"


NoWaitOpt = Annotated[
    bool, typer.Option("--no-wait", help="Print the task's id instead of waiting for it.")
]


@host_app.command("maintenance")
def host_maintenance(
    host: HostArg,
    switch: Annotated[Switch, typer.Argument(help="on: enter maintenance mode; off: leave it.")],
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="If running VMs cannot move yet, keep trying until they can or are stopped "
            "(else: refuse at once, naming them).",
        ),
    ] = False,
    no_wait: NoWaitOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Put a host in maintenance mode or take it out of it.

    Entering moves its running VMs, live, to the other hosts of its cluster first (its
    stopped VMs stay); then no VM runs or is placed there until it leaves. To stop the
    evacuation: thinvisor center task cancel ID.
    """

    async def what(center: CenterClient) -> tuple[str, str, dict[str, Any]]:
        found = await center.host(host)
        body = {"maintenance": switch is Switch.ON, "wait": wait}
        return "POST", f"/hosts/{found['id']}/maintenance", body

    result = center_vm.operation(what, no_wait)
    if json_out:
        common.print_json(result)
    elif no_wait:
        typer.echo(f"task {result['id']} started: {result['kind']} {result['object']}")
    else:
        typer.echo(maintenance_said(result))


def maintenance_said(result: dict[str, Any]) -> str:
    """What entering or leaving maintenance mode did: where each VM went."""
    if not result["maintenance"]:
        return f"host {result['host']} is out of maintenance mode"
    lines = [f"host {result['host']} is in maintenance mode"]
    lines += [f"moved {m['vm']} to {m['to']}" for m in result["moved"]]
    if result["stayed"]:
        lines.append(f"stayed there: {', '.join(result['stayed'])}")
    return "\n".join(lines)


@host_app.command("remove")
def host_remove(host: HostArg) -> None:
    """Stop managing a host: it and its VMs leave the inventory (nothing on it changes)."""

    async def go(center: CenterClient) -> str:
        found = await center.host(host)
        await center.call("DELETE", f"/hosts/{found['id']}")
        path: str = found["path"]
        return path

    typer.echo(f"removed host {on_center(go)}")


@host_app.command("reconnect")
def host_reconnect(host: HostArg) -> None:
    """Connect to a host again now, and take its whole inventory again."""

    async def go(center: CenterClient) -> dict[str, Any]:
        found = await center.host(host)
        back: dict[str, Any] = (await center.call("POST", f"/hosts/{found['id']}/reconnect")).json()
        return back

    back = on_center(go)
    typer.echo(
        f"host {back['path']}: {back['state']}" + (f" ({back['error']})" if back["error"] else "")
    )


# --- tasks and events -----------------------------------------------------------------


@app.command()
def tasks(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """Recent tasks, newest first."""
    found = on_center(lambda c: c.get("/tasks", limit=limit))
    rows = [
        [t["id"][:8], t["kind"], t["object"], t["user"], t["state"], t["progress"], _outcome(t)]
        for t in found
    ]
    columns = ["ID", "KIND", "OBJECT", "USER", "STATE", "%", "MESSAGE"]
    show(found, json_out, lambda _: print_table(columns, rows))


def _outcome(task: dict[str, Any]) -> str:
    error = task.get("error")
    return str(error["message"]) if error else str(task.get("message") or "")


task_app = typer.Typer(help="Tasks of the center.", no_args_is_help=True)
app.add_typer(task_app, name="task")


@task_app.command("cancel")
def task_cancel(
    task_id: Annotated[
        str, typer.Argument(help="The task: its id, or the start of it as 'tasks' shows it.")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Cancel a running task (a migration: the VM keeps running where it was)."""
    task = on_center(lambda c: c.cancel_task(task_id))
    if json_out:
        common.print_json(task)
    elif task["state"] == "success":
        typer.echo(f"task {task['id']} had finished before it could be cancelled")
    else:
        typer.echo(f"task {task['id']} {task['kind']} {task['object']}: {_outcome(task)}")


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print new ones.")] = False,
    kind: Annotated[str | None, typer.Option(help="Only kinds starting so, like vm.")] = None,
    limit: Annotated[int, typer.Option(help="How many of the newest.")] = 50,
    json_out: JsonOpt = False,
) -> None:
    """The center's events, every host's merged in, oldest first."""
    found = on_center(lambda c: c.get("/events", limit=limit, kind=kind))
    for event in found:
        _print_event(event, json_out)
    if follow:
        since = found[-1]["id"] if found else None
        common.guard(lambda: _follow_events(since, kind, json_out))


def _print_event(event: dict[str, Any], json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
    else:
        who = f" [{event['user']}]" if event.get("user") else ""
        where = f" {event['object']}" if event.get("object") else ""
        sys.stdout.write(f"{event['time']} {event['kind']}{where}{who}: {event['message']}\n")
    sys.stdout.flush()


def _follow_events(since: int | None, kind: str | None, json_out: bool) -> None:
    """Print new events as they come, until interrupted or the center goes."""
    login: Login = load_center_login()
    secure = login.url.startswith("https:")
    url = ("wss" if secure else "ws") + login.url[login.url.index(":") :] + f"{API}/events/stream"
    if since is not None:
        url += f"?since={since}"
    headers = {"Authorization": f"Bearer {login.token}"}
    tls = pinned_context(login.fingerprint) if secure else None
    try:
        with connect(url, ssl=tls, additional_headers=headers, proxy=None) as conn:
            for message in conn:
                event = json.loads(message)
                if kind is None or str(event["kind"]).startswith(kind):
                    _print_event(event, json_out)
    except KeyboardInterrupt:
        return
    except InvalidStatus as exc:
        raise ThinvisorError(
            f"{login.url}: events refused (HTTP {exc.response.status_code})"
        ) from None
    except ConnectionClosed as exc:
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        raise ThinvisorError(f"{login.url}: the event stream ended {reason}".strip()) from None
    except (OSError, InvalidHandshake) as exc:
        raise ThinvisorError(f"cannot reach {login.url}: {exc}") from exc


# --- permissions ----------------------------------------------------------------------


@app.command()
def grant(
    path: PathArg,
    user: Annotated[str, typer.Argument(help="The user.")],
    role: Annotated[
        Role, typer.Argument(help="Their role there and below (no-access: hides it from them).")
    ],
) -> None:
    """Give a user a role on an object and everything below it."""

    async def go(center: CenterClient) -> dict[str, Any]:
        node = await center.node(path)
        body = {"role": role.value}
        answer = await center.call(
            "PUT", f"/nodes/{node['id']}/permissions/{quote(user, safe='')}", body=body
        )
        granted: dict[str, Any] = answer.json()
        return granted

    done = on_center(go)
    typer.echo(f"{done['user']} is {done['role']} on {done['path']} and below")


@app.command()
def revoke(path: PathArg, user: Annotated[str, typer.Argument(help="The user.")]) -> None:
    """Take a user's role on an object away (their role from above applies again)."""

    async def go(center: CenterClient) -> str:
        node = await center.node(path)
        await center.call("DELETE", f"/nodes/{node['id']}/permissions/{quote(user, safe='')}")
        found: str = node["path"]
        return found

    typer.echo(f"{user} has no role granted on {on_center(go)} any more")


@app.command()
def permissions(
    path: Annotated[str | None, typer.Argument(help="Only the grants on this object.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's grants.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """The roles granted on objects of the inventory."""

    async def go(center: CenterClient) -> list[dict[str, Any]]:
        node = None if path is None else (await center.node(path))["id"]
        found: list[dict[str, Any]] = await center.get("/permissions", node=node, user=user)
        return found

    grants = on_center(go)
    rows = [[g["path"], g["user"], g["role"]] for g in grants]
    show(grants, json_out, lambda _: print_table(["PATH", "USER", "ROLE"], rows))


# --- tags -----------------------------------------------------------------------------

TagArg = Annotated[str, typer.Argument(help="The tag's name.")]


@tag_app.command("create")
def tag_create(
    name: TagArg,
    category: Annotated[str | None, typer.Option(help="A category for the tag.")] = None,
) -> None:
    """Make a tag."""
    body = {"name": name, "category": category}
    on_center(lambda c: c.call("POST", "/tags", body=body))
    typer.echo(f"created tag {name!r}")


@tag_app.command("list")
def tag_list(json_out: JsonOpt = False) -> None:
    """Every tag."""
    found = on_center(lambda c: c.get("/tags"))
    rows = [[t["name"], t["category"]] for t in found]
    show(found, json_out, lambda _: print_table(["NAME", "CATEGORY"], rows))


@tag_app.command("show")
def tag_show(name: TagArg, json_out: JsonOpt = False) -> None:
    """The objects that carry a tag."""
    found = on_center(lambda c: c.get(f"/tags/{quote(name, safe='')}"))
    rows = [[n["path"], n["kind"]] for n in found["nodes"]]
    show(found, json_out, lambda _: print_table(["PATH", "KIND"], rows))


@tag_app.command("delete")
def tag_delete(name: TagArg) -> None:
    """Delete a tag; it leaves every object that carries it."""
    on_center(lambda c: c.call("DELETE", f"/tags/{quote(name, safe='')}"))
    typer.echo(f"deleted tag {name!r}")


def _tagging(method: str, path: str, name: str) -> str:
    async def go(center: CenterClient) -> str:
        node = await center.node(path)
        await center.call(method, f"/nodes/{node['id']}/tags/{quote(name, safe='')}")
        found: str = node["path"]
        return found

    return on_center(go)


@tag_app.command("add")
def tag_add(path: PathArg, name: TagArg) -> None:
    """Put a tag on an object."""
    typer.echo(f"{_tagging('PUT', path, name)} is tagged {name!r}")


@tag_app.command("remove")
def tag_remove(path: PathArg, name: TagArg) -> None:
    """Take a tag off an object."""
    typer.echo(f"{_tagging('DELETE', path, name)} is no longer tagged {name!r}")
