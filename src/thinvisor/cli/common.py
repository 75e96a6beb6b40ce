"""What every CLI command shares: the configuration, the service, one-line errors.

The ``vm`` commands work on the host agent of ``thinvisor login`` when there is a login,
and on the local host otherwise; ``THINVISOR_LOCAL=1`` in the environment forces the
local host even when logged in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeAlias, TypeVar

import typer
from rich.console import Console

from thinvisor.cli.remote import Login, RemoteHost, load_login
from thinvisor.config import HostConfig, load_config
from thinvisor.errors import ThinvisorError
from thinvisor.host.service import HostService
from thinvisor.network import namespace

T = TypeVar("T")
Host: TypeAlias = HostService | RemoteHost

LOCAL_ENV = "THINVISOR_LOCAL"

_state: dict[str, Any] = {"config": None}


def set_config_path(path: Path | None) -> None:
    _state["config_path"] = path
    _state["config"] = None


def config() -> HostConfig:
    if _state["config"] is None:
        _state["config"] = load_config(_state.get("config_path"))
    cfg: HostConfig = _state["config"]
    return cfg


def console() -> Console:
    """Rich output without its markup guesses: a MAC's ":ab:" is not an emoji."""
    return Console(emoji=False, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def service() -> HostService:
    """The local host's service, in the network namespace its VMs' networking lives in."""
    cfg = config()
    namespace.enter(cfg.network.namespace)
    return HostService(cfg)


def run(coro_factory: Any) -> Any:
    """Run ``coro_factory(service)`` to completion; thinvisor errors become one line."""
    try:
        coro: Coroutine[Any, Any, Any] = coro_factory(service())
        return asyncio.run(coro)
    except ThinvisorError as exc:
        fail(str(exc))


def remote_login() -> Login | None:
    """The login the vm commands use; None for the local host (no login, or
    ``THINVISOR_LOCAL`` set to anything but 0)."""
    if os.environ.get(LOCAL_ENV, "") not in ("", "0"):
        return None
    login: Login | None = guard(load_login)
    return login


def run_on_host(coro_factory: Any) -> Any:
    """Run ``coro_factory(host)`` on the logged-in agent (a ``RemoteHost``) or else the
    local ``HostService``; thinvisor errors become one line."""
    login = remote_login()
    if login is None:
        return run(coro_factory)

    async def remote() -> Any:
        progress = sys.stderr.isatty()
        async with RemoteHost(login, show_progress=progress) as host:
            return await coro_factory(host)

    try:
        return asyncio.run(remote())
    except ThinvisorError as exc:
        fail(str(exc))


def guard(fn: Any) -> Any:
    """Run a plain function; thinvisor errors become one line."""
    try:
        return fn()
    except ThinvisorError as exc:
        fail(str(exc))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # qemu.qmp logs a dropped connection as an error; thinvisor reports what it means.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
