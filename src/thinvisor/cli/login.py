"""``thinvisor login URL`` and ``thinvisor logout``: point the ``vm`` commands at a host agent.

After a login, every ``thinvisor vm ...`` command works against that agent; after a
logout (or with ``THINVISOR_LOCAL=1`` in the environment) against the local host again.
The login is ``$XDG_CONFIG_HOME/thinvisor/login.json`` (``~/.config`` by default), mode
0600: the agent's URL, an API token, the user, and the SHA-256 fingerprint of the agent's
certificate, which every later connection must present (confirmed at login, as ssh does).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Annotated

import typer

from thinvisor.cli import common
from thinvisor.cli.remote import (
    Login,
    RemoteHost,
    agent_url,
    login_path,
    remove_login,
    save_login,
    server_fingerprint,
)
from thinvisor.cli.users import read_password


def register(app: typer.Typer) -> None:
    """Add ``login`` and ``logout`` to the top-level command."""
    app.command()(login)
    app.command()(logout)


def login(
    url: Annotated[str, typer.Argument(help="The host agent, like https://HOST:8443.")],
    user: Annotated[str, typer.Option("--user", prompt="User", help="The user to log in as.")],
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file",
            help="Read the password from the first line of this file ('-': standard input) "
            "instead of prompting.",
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Trust the host's certificate without asking.")
    ] = False,
) -> None:
    """Log in to a host agent; the vm commands then work on that host."""
    base = common.guard(lambda: agent_url(url))
    fingerprint = None
    if base.startswith("https:"):
        fingerprint = common.guard(lambda: server_fingerprint(base))
        _confirm(base, fingerprint, yes)
    else:
        typer.echo(
            f"warning: {base} is plain HTTP: the password and token travel in clear", err=True
        )
    password = (
        common.guard(lambda: read_password(password_file))
        if password_file is not None
        else typer.prompt("Password", hide_input=True)
    )
    pending = Login(url=base, token="", fingerprint=fingerprint, user=user)
    label = f"thinvisor CLI on {socket.gethostname()}"

    async def go() -> dict[str, str]:
        async with RemoteHost(pending) as host:
            return await host.log_in(user, password, label)

    answer = common.guard(lambda: asyncio.run(go()))
    done = pending.model_copy(update={"token": answer["token"], "user": answer["user"]})
    path = common.guard(lambda: save_login(done))
    typer.echo(f"logged in to {base} as {done.user} ({answer.get('role', '?')}); saved in {path}")
    typer.echo(
        "thinvisor vm commands now work on this host "
        "(THINVISOR_LOCAL=1 for the local one, 'thinvisor logout' to go back)",
        err=True,
    )


def _confirm(url: str, fingerprint: str, yes: bool) -> None:
    typer.echo(f"The certificate of {url} has the SHA-256 fingerprint\n  {fingerprint}", err=True)
    if yes:
        return
    typer.echo(
        "Compare it with the one the host shows ('thinvisor host info' on it, or its log).",
        err=True,
    )
    if not typer.confirm("Trust this certificate?", default=False, err=True):
        common.fail("not logged in: the certificate was not trusted")


def logout() -> None:
    """Forget the login: the vm commands work on the local host again."""
    path = login_path()
    if not path.exists():
        typer.echo("not logged in; the vm commands work on the local host")
        return
    forgotten = common.guard(lambda: remove_login(path))
    where = f" of {forgotten.url}" if forgotten else ""
    typer.echo(f"logged out{where}; the vm commands work on the local host")
    typer.echo(
        "the token stays valid until it is revoked on the host ('thinvisor host token revoke')",
        err=True,
    )
