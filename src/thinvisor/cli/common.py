"""What every CLI command shares: the configuration, the service, one-line errors."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer

from thinvisor.config import HostConfig, load_config
from thinvisor.errors import ThinvisorError
from thinvisor.host.service import HostService

T = TypeVar("T")

_state: dict[str, Any] = {"config": None}


def set_config_path(path: Path | None) -> None:
    _state["config_path"] = path
    _state["config"] = None


def config() -> HostConfig:
    if _state["config"] is None:
        _state["config"] = load_config(_state.get("config_path"))
    cfg: HostConfig = _state["config"]
    return cfg


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run(coro_factory: Any) -> Any:
    """Run ``coro_factory(service)`` to completion; thinvisor errors become one line."""
    try:
        service = HostService(config())
        coro: Coroutine[Any, Any, Any] = coro_factory(service)
        return asyncio.run(coro)
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
