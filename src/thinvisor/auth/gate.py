"""The one password check every edge of an agent (REST, CIM) goes through.

Failed logins from one address are slowed down (``LoginThrottle``), and each one is
refused and recorded as an event. The host agent and the center both hold one.
"""

from __future__ import annotations

import asyncio

from thinvisor.auth.throttle import LoginThrottle
from thinvisor.auth.users import User, UserStore
from thinvisor.errors import TooManyAttempts, Unauthenticated
from thinvisor.host.events import EventLog


class PasswordGate:
    def __init__(self, users: UserStore, events: EventLog) -> None:
        self.users = users
        self.events = events
        self.throttle = LoginThrottle()

    async def authenticate(self, name: str, password: str) -> User | None:
        # Password hashing is deliberately slow: keep it off the event loop.
        return await asyncio.to_thread(self.users.authenticate, name, password)

    async def check_password(self, address: str, name: str, password: str, via: str) -> User:
        """A user by password; ``TooManyAttempts`` while ``address`` is slowed down,
        ``Unauthenticated`` (recorded) for a wrong name or password."""
        wait = self.throttle.delay(address)
        if wait > 0:
            raise TooManyAttempts(wait)
        user = await self.authenticate(name, password)
        if user is None:
            self.throttle.failed(address)
            self.events.emit(
                "auth.login_failed",
                f"login failed for {name!r} from {address} ({via})",
                object=f"user/{name}",
                data={"address": address, "via": via},
            )
            raise Unauthenticated("wrong user name or password")
        self.throttle.succeeded(address)
        return user
