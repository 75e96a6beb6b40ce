"""The lifecycle state machine: every action is allowed exactly where documented."""

from __future__ import annotations

import pytest

from thinvisor.errors import InvalidState
from thinvisor.host.state import ALLOWED, Action, PowerState, check_allowed, power_state_of

S = PowerState


def test_every_action_has_an_entry() -> None:
    assert set(ALLOWED) == set(Action)


@pytest.mark.parametrize(
    ("action", "allowed"),
    [
        (Action.START, {S.STOPPED, S.SUSPENDED}),
        (Action.STOP, {S.RUNNING, S.PAUSED, S.SUSPENDED}),
        (Action.SHUTDOWN, {S.RUNNING}),
        (Action.RESET, {S.RUNNING, S.PAUSED}),
        (Action.PAUSE, {S.RUNNING}),
        (Action.RESUME, {S.PAUSED, S.SUSPENDED}),
        (Action.SUSPEND, {S.RUNNING, S.PAUSED}),
        (Action.DELETE, {S.STOPPED, S.SUSPENDED}),
        (Action.ADD_DISK, {S.STOPPED, S.RUNNING}),
    ],
)
def test_allowed_states(action: Action, allowed: set[PowerState]) -> None:
    for state in PowerState:
        if state in allowed:
            check_allowed("vm1", state, action)
        else:
            with pytest.raises(InvalidState) as info:
                check_allowed("vm1", state, action)
            assert info.value.http_status == 409
            assert str(info.value) == f"vm 'vm1': cannot {action.value} while {state.value}"


@pytest.mark.parametrize(
    ("qemu", "state"),
    [
        ("running", S.RUNNING),
        ("paused", S.PAUSED),
        ("postmigrate", S.PAUSED),
        ("guest-panicked", S.PAUSED),
    ],
)
def test_qemu_run_states(qemu: str, state: PowerState) -> None:
    assert power_state_of(qemu) is state
