"""The VM lifecycle: power states, actions, and which action each state allows.

Like Firecracker's action list, every action names the states it is allowed in; a call
in any other state is refused with ``InvalidState`` before anything is done.
"""

from __future__ import annotations

from enum import StrEnum

from thinvisor.errors import InvalidState


class PowerState(StrEnum):
    STOPPED = "stopped"
    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"


class Action(StrEnum):
    START = "start"
    STOP = "stop"
    SHUTDOWN = "shut down"
    RESET = "reset"
    PAUSE = "pause"
    RESUME = "resume"
    SUSPEND = "suspend"
    DELETE = "delete"
    RECONFIGURE = "reconfigure"
    ADD_DISK = "add a disk"
    REMOVE_DISK = "remove a disk"
    RESIZE_DISK = "resize a disk"
    CHANGE_CDROM = "change the CD-ROM"
    ADD_NIC = "add a NIC"
    REMOVE_NIC = "remove a NIC"
    CHANGE_NIC = "change a NIC"
    SNAPSHOT = "take a snapshot"
    REVERT_SNAPSHOT = "revert to a snapshot"
    DELETE_SNAPSHOT = "delete a snapshot"
    CLONE = "clone the current state"
    CLONE_SNAPSHOT = "clone a snapshot"
    EXPORT = "export"
    MOVE_DISK = "move a disk"
    CONVERT_DISK = "change a disk's provisioning"
    MARK_TEMPLATE = "mark as a template"
    MIGRATE = "live-migrate"


_S = PowerState
ALLOWED: dict[Action, frozenset[PowerState]] = {
    # Powering on a suspended VM resumes it from its saved state, as on ESXi.
    Action.START: frozenset({_S.STOPPED, _S.SUSPENDED}),
    # Powering off a suspended VM discards its saved state.
    Action.STOP: frozenset({_S.RUNNING, _S.PAUSED, _S.SUSPENDED}),
    Action.SHUTDOWN: frozenset({_S.RUNNING}),
    Action.RESET: frozenset({_S.RUNNING, _S.PAUSED}),
    Action.PAUSE: frozenset({_S.RUNNING}),
    Action.RESUME: frozenset({_S.PAUSED, _S.SUSPENDED}),
    Action.SUSPEND: frozenset({_S.RUNNING, _S.PAUSED}),
    Action.DELETE: frozenset({_S.STOPPED, _S.SUSPENDED}),
    Action.RECONFIGURE: frozenset({_S.STOPPED}),
    # A suspended VM's saved state describes its devices: they may not change.
    Action.ADD_DISK: frozenset({_S.STOPPED, _S.RUNNING}),
    Action.REMOVE_DISK: frozenset({_S.STOPPED, _S.RUNNING}),
    Action.RESIZE_DISK: frozenset({_S.STOPPED, _S.RUNNING, _S.PAUSED}),
    Action.CHANGE_CDROM: frozenset({_S.STOPPED, _S.RUNNING, _S.PAUSED}),
    Action.ADD_NIC: frozenset({_S.STOPPED, _S.RUNNING}),
    Action.REMOVE_NIC: frozenset({_S.STOPPED, _S.RUNNING}),
    # Link state, port group and shaping are the host's side of the NIC: not in the
    # saved state of a suspended VM.
    Action.CHANGE_NIC: frozenset({_S.STOPPED, _S.RUNNING, _S.PAUSED, _S.SUSPENDED}),
    # A suspended VM's saved state belongs to its current disks: no snapshot of it.
    Action.SNAPSHOT: frozenset({_S.STOPPED, _S.RUNNING, _S.PAUSED}),
    # Reverting powers the VM off first (and drops a suspended state), as on ESXi.
    Action.REVERT_SNAPSHOT: frozenset({_S.STOPPED, _S.RUNNING, _S.PAUSED, _S.SUSPENDED}),
    Action.DELETE_SNAPSHOT: frozenset({_S.STOPPED, _S.RUNNING, _S.PAUSED, _S.SUSPENDED}),
    # The current state of a running VM changes under the copy: clone a snapshot instead.
    Action.CLONE: frozenset({_S.STOPPED}),
    Action.CLONE_SNAPSHOT: frozenset({_S.STOPPED, _S.RUNNING, _S.PAUSED, _S.SUSPENDED}),
    Action.EXPORT: frozenset({_S.STOPPED}),
    Action.MOVE_DISK: frozenset({_S.STOPPED, _S.RUNNING, _S.PAUSED}),
    Action.CONVERT_DISK: frozenset({_S.STOPPED}),
    Action.MARK_TEMPLATE: frozenset({_S.STOPPED}),
    # Live migration moves a running guest (a paused one would be resumed by the move);
    # a stopped VM's files move (cold migration).
    Action.MIGRATE: frozenset({_S.RUNNING, _S.STOPPED}),
}

# What a template allows: it is never powered on and its disks never change, since
# linked clones may read them.
TEMPLATE_ALLOWED = frozenset(
    {Action.DELETE, Action.CLONE, Action.CLONE_SNAPSHOT, Action.EXPORT, Action.MARK_TEMPLATE}
)


def check_allowed(vm: str, state: PowerState, action: Action) -> None:
    """Raise ``InvalidState`` unless ``action`` is allowed in ``state``."""
    if state not in ALLOWED[action]:
        raise InvalidState(vm, state.value, action.value)


def check_template(vm: str, template: bool, action: Action) -> None:
    """Raise ``InvalidState`` when ``vm`` is a template and ``action`` is not for one."""
    if template and action not in TEMPLATE_ALLOWED:
        raise InvalidState(vm, "a template", action.value)


def power_state_of(qemu_status: str) -> PowerState:
    """Map QEMU's run state (``query-status``) onto thinvisor's power states."""
    return PowerState.RUNNING if qemu_status == "running" else PowerState.PAUSED
