"""Roles and what each may do.

Every REST route and CIM method names one permission; a role holds a fixed set of them:

- ``admin``: everything.
- ``operator``: read, power and console.
- ``read-only``: read.
- ``no-access``: nothing. Such a user still authenticates (a login still gives a token),
  and every route but ``/health`` answers them 403: on a host, that suspends an account
  without removing it and its tokens. On the center, it is the usual own role of a
  tenant's user, granted more on one part of the tree (``thinvisor.center.permissions``):
  the rest of the inventory is hidden from them, as vCenter's "No Access" hides it.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    READ_ONLY = "read-only"
    NO_ACCESS = "no-access"


class Permission(StrEnum):
    READ = "read"
    """See the inventory, tasks, events, host information; list and download datastores."""
    POWER = "power"
    """Start, stop, shut down, reset, pause, resume and suspend VMs."""
    CONSOLE = "console"
    """Open a VM's serial and VNC consoles."""
    CONFIGURE = "configure"
    """Create, change and delete VMs, disks and CD-ROMs; upload to datastores."""
    ADMIN = "admin"
    """Manage users and other users' tokens; shut the host agent down."""


_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.OPERATOR: frozenset({Permission.READ, Permission.POWER, Permission.CONSOLE}),
    Role.READ_ONLY: frozenset({Permission.READ}),
    Role.NO_ACCESS: frozenset(),
}


def permissions(role: Role) -> frozenset[Permission]:
    """Everything ``role`` may do."""
    return _PERMISSIONS[Role(role)]


def allows(role: Role, permission: Permission) -> bool:
    """Whether ``role`` holds ``permission``."""
    return Permission(permission) in permissions(role)
