"""What the CIM server tests share: a served app on a free port, a test agent with fast
password hashing, and a pywbem connection."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from argon2 import PasswordHasher
from pywbem import WBEMConnection

from thinvisor.auth import Role, UserStore
from thinvisor.cim.provider import CIMV2
from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.host.agent import HostAgent

TEST_CACHE = Path(os.environ.get("THINVISOR_TEST_CACHE") or "/var/cache/thinvisor-test")
# Tests hash many passwords: cheap parameters (the product keeps argon2's defaults).
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ADMIN = ("admin", "password123")
READER = ("reader", "password123")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_agent(config: HostConfig) -> HostAgent:
    """An agent (not started) with an admin and a read-only user."""
    agent = HostAgent(config)
    agent.users = UserStore(config.state_dir / "users.json", hasher=FAST)
    agent.users.add_user(*ADMIN, Role.ADMIN)
    agent.users.add_user(*READER, Role.READ_ONLY)
    return agent


def temp_config(root: Path) -> HostConfig:
    return HostConfig(
        state_dir=root / "state",
        run_dir=root / "run",
        cache_dir=root / "cache",
        datastores=[DatastoreConfig(name="local", path=root / "local")],
    )


def connect(url: str, creds: tuple[str, str] = ADMIN, **kwargs: Any) -> WBEMConnection:
    kwargs.setdefault("timeout", 120)
    return WBEMConnection(url, creds, default_namespace=CIMV2, **kwargs)


class Served:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app: Any, certfile: str | None = None, keyfile: str | None = None) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            lifespan="off",
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def served_agent(config: HostConfig) -> Iterator[str]:
    """The CIM server of an agent on ``config``, over plain HTTP on loopback: its URL."""
    from thinvisor.cim.providers import default_registry
    from thinvisor.cim.schema import load_repository
    from thinvisor.cim.server import create_cim_app

    agent = make_agent(config)
    served = Served(create_cim_app(agent, load_repository(TEST_CACHE), default_registry()))
    try:
        yield f"http://127.0.0.1:{served.port}"
    finally:
        served.close()
        agent.events.close()
