"""``thinvisor host init``, ``host user ...`` and ``host token ...``: who may use the agent.

Passwords never come from the command line (it shows in ``ps`` and in shell history): they
come from the first line of a file (``-`` for standard input) or from a prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from thinvisor.auth import Role, UserStore
from thinvisor.cli import common
from thinvisor.errors import AlreadyExists, InvalidArgument, ThinvisorError
from thinvisor.model.vm import check_name

T = TypeVar("T")

app = typer.Typer(help="Users and API tokens of the host agent.", no_args_is_help=True)
user_app = typer.Typer(help="Add, list, change and remove users.", no_args_is_help=True)
token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")

NameArg = Annotated[str, typer.Argument(help="The user's name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="Read the password from the first line of this file ('-': standard input) "
        "instead of prompting.",
    ),
]

out = common.console()


def store() -> UserStore:
    """The host's user store: ``<state_dir>/users.json``."""
    return UserStore(common.config().state_dir / "users.json")


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ThinvisorError as exc:
        common.fail(str(exc))


def read_password(path: Path | None) -> str:
    """The first line of ``path`` (without its line ending), or a prompt with confirmation."""
    if path is None:
        password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        return password
    try:
        text = sys.stdin.readline() if str(path) == "-" else path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument("password-file", f"cannot read {path}: {exc}") from exc
    lines = text.splitlines()
    return lines[0] if lines else ""


@app.command()
def init(
    user: Annotated[str, typer.Option("--user", help="The admin's name.")] = "admin",
    password_file: PasswordFileOpt = None,
) -> None:
    """Create the first admin user of a fresh host."""

    def go() -> str:
        users = store()
        if not users.is_empty():  # before the prompt: no password typed for nothing
            raise AlreadyExists(f"users already exist in {users.path}; see 'user add'")
        check_new_user(users, user)
        created = users.add_first_user(user, read_password(password_file))
        return f"created admin user {created.name!r} in {users.path}"

    typer.echo(_guard(go))


@user_app.command("add")
def user_add(
    name: NameArg,
    role: Annotated[
        Role,
        typer.Option(
            "--role",
            help="What the user may do (no-access: log in only, a suspended account).",
        ),
    ],
    password_file: PasswordFileOpt = None,
) -> None:
    """Add a user with a role."""

    def go() -> str:
        users = store()
        check_new_user(users, name)
        created = users.add_user(name, read_password(password_file), role)
        return f"added user {created.name!r} with role {created.role}"

    typer.echo(_guard(go))


def check_new_user(users: UserStore, name: str) -> None:
    """Refuse a bad or taken name before prompting for a password."""
    try:
        check_name(name)
    except ValueError as exc:
        raise InvalidArgument("name", str(exc)) from None
    if any(u.name == name for u in users.users()):
        raise AlreadyExists(f"user {name!r} already exists")


@user_app.command("list")
def user_list(json_out: JsonOpt = False) -> None:
    """List the users and their roles."""
    users = _guard(lambda: store().users())
    if json_out:
        common.print_json([u.to_dict() for u in users])
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "ROLE", "CREATED"):
        table.add_column(col)
    for u in users:
        table.add_row(u.name, str(u.role), u.created.isoformat())
    out.print(table)


@user_app.command("remove")
def user_remove(name: NameArg) -> None:
    """Remove a user and revoke its tokens."""
    _guard(lambda: store().remove_user(name))
    typer.echo(f"removed user {name!r}")


@user_app.command("passwd")
def user_passwd(name: NameArg, password_file: PasswordFileOpt = None) -> None:
    """Set a user's password."""

    def go() -> None:
        users = store()
        users.get(name)  # before the prompt: no password typed for nobody
        users.set_password(name, read_password(password_file))

    _guard(go)
    typer.echo(f"changed the password of {name!r}")


@user_app.command("role")
def user_role(
    name: NameArg,
    role: Annotated[
        Role,
        typer.Argument(help="What the user may do (no-access: log in only, a suspended account)."),
    ],
) -> None:
    """Change a user's role."""
    changed = _guard(lambda: store().set_role(name, role))
    typer.echo(f"user {changed.name!r} now has role {changed.role}")


@token_app.command("create")
def token_create(
    name: NameArg,
    label: Annotated[str, typer.Option("--label", help="What the token is for.")] = "",
) -> None:
    """Create an API token for a user and print it; it is shown this once only."""
    info, token = _guard(lambda: store().create_token(name, label))
    typer.echo(f"created token {info.id} for {info.owner!r}; it is not shown again", err=True)
    typer.echo(token)


@token_app.command("list")
def token_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's tokens.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List API tokens (never the tokens themselves)."""
    tokens = _guard(lambda: store().tokens(user))
    if json_out:
        common.print_json([t.to_dict() for t in tokens])
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "USER", "LABEL", "CREATED"):
        table.add_column(col)
    for t in tokens:
        table.add_row(t.id, t.owner, t.label, t.created.isoformat())
    out.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id.")],
) -> None:
    """Revoke an API token."""
    info = _guard(lambda: store().revoke_token(token_id))
    typer.echo(f"revoked token {info.id} of {info.owner!r}")
