"""Who may use the host agent, and what they may do: users, API tokens, roles, throttling.

Plain library code with no HTTP in it; the REST API and the CLI both build on it.
"""

from __future__ import annotations

from thinvisor.auth.roles import Permission, Role, allows, permissions
from thinvisor.auth.throttle import LoginThrottle
from thinvisor.auth.users import TOKEN_PREFIX, TokenInfo, User, UserStore

__all__ = [
    "TOKEN_PREFIX",
    "LoginThrottle",
    "Permission",
    "Role",
    "TokenInfo",
    "User",
    "UserStore",
    "allows",
    "permissions",
]
