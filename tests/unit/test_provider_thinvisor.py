"""The thinvisor provider's translations, without an agent: credentials, where a VM's
disks live, a VM the agent cannot read, and the event ids a resumed stream relies on."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from thinvisor.providers.base import ChangeKind, Connection, PowerState
from thinvisor.providers.thinvisor import (
    EventStream,
    ThinvisorProvider,
    auth_header,
    disk_datastore,
    vm_record,
)

STORES = {"local": "/var/lib/ds", "fast": "/var/lib/ds/fast", "nfs": "/mnt/nfs"}


def test_password_goes_as_basic_and_a_token_as_bearer() -> None:
    basic = auth_header("admin", "pa:ss")["Authorization"]
    assert basic == "Basic " + base64.b64encode(b"admin:pa:ss").decode()
    assert auth_header(None, "tv_abc") == {"Authorization": "Bearer tv_abc"}
    assert auth_header("admin", None) == {}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("disk0.qcow2", "local"),  # relative: in the VM's own directory
        ("/mnt/nfs/images/base.qcow2", "nfs"),
        ("/var/lib/ds/fast/web/disk1.qcow2", "fast"),  # the innermost datastore
        ("/srv/elsewhere.raw", "local"),
    ],
)
def test_disk_datastore(path: str, expected: str) -> None:
    assert disk_datastore(path, "local", STORES) == expected


def test_vm_record_of_a_vm_and_of_an_invalid_one() -> None:
    spec = {
        "vcpus": 2,
        "memory_mib": 96,
        "template": False,
        "disks": [{"path": "disk0.qcow2"}, {"path": "/mnt/nfs/x/d.qcow2"}],
        "nics": [{"network": "user"}, {"network": "lan"}, {"network": "lan"}],
    }
    vm = {"name": "web", "datastore": "local", "state": "paused", "uuid": "u", "spec": spec}
    record = vm_record(vm, STORES)
    assert (record.id, record.power_state, record.cpus, record.memory_mib) == (
        "web", PowerState.PAUSED, 2, 96)  # fmt: skip
    assert (record.datastores, record.networks) == (("local", "nfs"), ("user", "lan"))
    broken = vm_record({"name": "b", "datastore": "local", "state": "invalid", "spec": None}, {})
    assert (broken.power_state, broken.cpus, broken.datastores) == (
        PowerState.UNKNOWN, 0, ("local",))  # fmt: skip


def event(event_id: int, kind: str = "auth.login") -> dict[str, Any]:
    return {"id": event_id, "kind": kind, "object": None, "user": "u", "message": "m"}


def test_resumed_stream_skips_repeats_and_says_when_events_were_lost() -> None:
    provider = ThinvisorProvider(Connection("https://127.0.0.1:9", "u", "p", "AA"))
    provider.last_event_id = 10
    stream = EventStream(provider)

    async def kinds(e: dict[str, Any]) -> list[ChangeKind]:
        return [c.kind for c in await stream.changes(e)]

    assert asyncio.run(kinds(event(9))) == []  # seen before the reconnect
    assert asyncio.run(kinds(event(11))) == []  # the next one, of nothing the center lists
    assert asyncio.run(kinds(event(15, "datastore.added"))) == [ChangeKind.RESYNC] * 2
    assert provider.last_event_id == 15
