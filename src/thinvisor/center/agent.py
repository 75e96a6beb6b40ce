"""The center: what ``thinvisor center serve`` runs, the role VirtualCenter played.

It owns the inventory database, the users (the same model as a host agent's: users,
tokens, roles, plus permissions on inventory objects), the merged event log, the tasks,
one ``HostSync`` per managed host and the ``HaMonitor`` that restarts the VMs of failed
hosts of clusters with HA.
"""

from __future__ import annotations

import logging

from thinvisor.auth import User, UserStore
from thinvisor.auth.gate import PasswordGate
from thinvisor.center.config import CenterConfig
from thinvisor.center.db import Database, open_database
from thinvisor.center.ha import HaMonitor
from thinvisor.center.inventory import Inventory
from thinvisor.center.permissions import Permissions
from thinvisor.center.rules import Rules
from thinvisor.center.secrets import SecretBox
from thinvisor.center.service import CenterService
from thinvisor.fs import private_dir
from thinvisor.host.events import EventLog
from thinvisor.host.tasks import TaskManager

log = logging.getLogger(__name__)


class CenterAgent:
    def __init__(self, config: CenterConfig, *, database: Database | None = None) -> None:
        self.config = config
        private_dir(config.state_dir)
        self.events = EventLog(config.state_dir / "events.jsonl")
        self.tasks = TaskManager(self.events)
        self.users = UserStore(config.state_dir / "users.json")
        self.gate = PasswordGate(self.users, self.events)
        self.database = database or open_database(config.database_url)
        self.secrets = SecretBox(config.state_dir / "secret.key")
        self.inventory = Inventory(self.database, self.secrets)
        self.permissions = Permissions(self.database)
        self.service = CenterService(self.inventory, self.tasks, self.events, config.sync)
        self.ha = HaMonitor(
            self.inventory, self.service.syncs, self.events, Rules(self.database), config.ha
        )
        self.tls_fingerprint: str | None = None  # set by the server once TLS is set up

    async def authenticate(self, name: str, password: str) -> User | None:
        return await self.gate.authenticate(name, password)

    async def check_password(self, address: str, name: str, password: str, via: str) -> User:
        """A user by password: failed logins are slowed down, refused and recorded."""
        return await self.gate.check_password(address, name, password, via)

    async def start(self) -> None:
        """Follow every registered host, and watch those of clusters with HA."""
        hosts = await self.service.start()
        self.ha.start()
        self.events.emit("center.started", f"center started; following {hosts} hosts")

    async def stop(self) -> None:
        await self.ha.stop()
        await self.service.close()
        await self.tasks.close()
        self.events.emit("center.stopped", "center stopped")
        self.database.close()
