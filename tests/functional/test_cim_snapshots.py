"""The Virtual System Snapshot Service over CIM-XML: an appliance VM defined, started,
snapshotted (with its memory, and without), reverted and its snapshots destroyed with
pywbem's ``WBEMConnection`` only; the guest, over its serial console, shows what each
step did to its memory and its disk."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import pywbem
from pywbem import CIMInstance, CIMInstanceName, Uint16, Uint64, WBEMConnection

from .cimenv import connect, served_agent
from .hostenv import TestHost

pytestmark = pytest.mark.functional

VSMS = "TV_VirtualSystemManagementService"
SNAPSHOT_SERVICE = "TV_VirtualSystemSnapshotService"
FULL, DISK = 2, 3
BLOCK = 4096


@pytest.fixture
def url(host: TestHost) -> Iterator[str]:
    with served_agent(host.config) as served:
        yield served


def only(conn: WBEMConnection, classname: str) -> CIMInstanceName:
    [path] = conn.EnumerateInstanceNames(classname)
    return path


def define(conn: WBEMConnection, name: str) -> CIMInstanceName:
    """An appliance VM with a 16 MiB data disk (the guest's /dev/vda)."""
    system = CIMInstance(
        "CIM_VirtualSystemSettingData",
        {"ElementName": name, "VirtualSystemType": "DMTF:thinvisor:appliance"},
    )

    def rasd(kind: int, quantity: int, units: str) -> CIMInstance:
        props = {
            "ResourceType": Uint16(kind),
            "VirtualQuantity": Uint64(quantity),
            "AllocationUnits": units,
        }
        return CIMInstance("CIM_ResourceAllocationSettingData", props)

    resources = [rasd(4, 128, "byte*2^20"), rasd(3, 1, "count"), rasd(31, 16, "byte*2^20")]
    rc, out = conn.InvokeMethod(
        "DefineSystem", only(conn, VSMS), SystemSettings=system, ResourceSettings=resources
    )
    assert rc == 0
    vm: CIMInstanceName = out["ResultingSystem"]
    return vm


def power(conn: WBEMConnection, vm: CIMInstanceName, state: int) -> None:
    rc, _ = conn.InvokeMethod("RequestStateChange", vm, RequestedState=Uint16(state))
    assert rc == 0


def enabled_state(conn: WBEMConnection, vm: CIMInstanceName) -> int:
    return int(conn.GetInstance(vm)["EnabledState"])


def wait_job(conn: WBEMConnection, job: CIMInstanceName, timeout: float = 180) -> CIMInstance:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inst = conn.GetInstance(job)
        if inst["JobState"] in (7, 10):  # Completed, Exception
            return inst
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not finish")


def run_job(conn: WBEMConnection, method: str, **params: object) -> CIMInstanceName:
    """Invoke a snapshot service method; wait for its job, which must succeed."""
    rc, out = conn.InvokeMethod(method, only(conn, SNAPSHOT_SERVICE), **params)
    assert rc == 4096, f"{method} answered {rc}"
    job = wait_job(conn, out["Job"])
    assert job["JobState"] == 7, job["ErrorDescription"]
    path: CIMInstanceName = out["Job"]
    return path


def snapshots_of(conn: WBEMConnection, vm: CIMInstanceName) -> dict[str, CIMInstance]:
    found = conn.Associators(vm, AssocClass="CIM_SnapshotOfVirtualSystem")
    return {str(s["ElementName"]): s for s in found}


def sh(host: TestHost, name: str, command: str, timeout: float = 60) -> str:
    return host.sh(name, command, timeout).strip()


def write_disk(host: TestHost, name: str, text: str) -> None:
    sh(host, name, f"printf '%s' '{text}' | dd of=/dev/vda bs={BLOCK} conv=fsync")


def read_disk(host: TestHost, name: str, size: int) -> str:
    """The start of the data disk, read past the guest's page cache."""
    return sh(
        host, name, f"dd if=/dev/vda bs={BLOCK} count=1 iflag=direct 2>/dev/null | head -c {size}"
    )


def created_by(conn: WBEMConnection, job: CIMInstanceName) -> CIMInstance:
    """The snapshot a CreateSnapshot job took, as its ``CIM_AffectedJobElement`` names it."""
    [snap] = conn.Associators(
        job, AssocClass="CIM_AffectedJobElement", ResultClass="CIM_VirtualSystemSettingData"
    )
    return snap


def check_the_only_snapshot(conn: WBEMConnection, vm: CIMInstanceName, snap: CIMInstance) -> None:
    """``snap`` is the VM's one snapshot and its current one; the VM keeps its own VSSD."""
    assert set(snapshots_of(conn, vm)) == {snap["ElementName"]}
    [current] = conn.AssociatorNames(vm, AssocClass="TV_MostCurrentSnapshotInBranch")
    assert current["InstanceID"] == snap["InstanceID"]
    [ref] = conn.References(vm, ResultClass="CIM_SnapshotOfVirtualSystem")
    assert ref["Dependent"]["InstanceID"] == snap["InstanceID"]
    [own] = conn.Associators(vm, AssocClass="CIM_SettingsDefineState")
    assert own["InstanceID"] == f"thinvisor:{vm['Name']}"
    every = {str(i["InstanceID"]) for i in conn.EnumerateInstances("CIM_VirtualSystemSettingData")}
    assert every == {own["InstanceID"], snap["InstanceID"]}


def check_a_missing_snapshot_changes_nothing(
    conn: WBEMConnection, vm: CIMInstanceName, snap: CIMInstance
) -> None:
    """A reference to a snapshot that does not exist: Invalid Parameter, nothing done."""
    jobs = len(conn.EnumerateInstanceNames("TV_ConcreteJob"))
    missing = snap.path.copy()
    missing["InstanceID"] = f"thinvisor:{vm['Name']}:snapshot:99"
    service = only(conn, SNAPSHOT_SERVICE)
    assert conn.InvokeMethod("ApplySnapshot", service, Snapshot=missing)[0] == 4
    assert conn.InvokeMethod("DestroySnapshot", service, AffectedSnapshot=missing)[0] == 4
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetInstance(missing)
    assert exc.value.status_code == pywbem.CIM_ERR_NOT_FOUND
    assert len(conn.EnumerateInstanceNames("TV_ConcreteJob")) == jobs
    assert set(snapshots_of(conn, vm)) == {snap["ElementName"]}
    assert enabled_state(conn, vm) == 2


def test_snapshots_taken_applied_and_destroyed_over_cim(host: TestHost, url: str) -> None:
    conn = connect(url)
    vm = define(conn, "snapvm")
    power(conn, vm, 2)
    host.wait_ready("snapvm")
    sh(host, "snapvm", "echo before > /root/mark")
    write_disk(host, "snapvm", "DISK-BEFORE")

    # A full snapshot of the running VM: its memory too.
    settings = CIMInstance("CIM_SettingData", {"ElementName": "s1", "Description": "first"})
    job = run_job(
        conn,
        "CreateSnapshot",
        AffectedSystem=vm,
        SnapshotSettings=settings,
        SnapshotType=Uint16(FULL),
    )
    s1 = created_by(conn, job)
    assert s1.classname == "TV_VirtualSystemSettingData"
    assert (s1["ElementName"], s1["Description"]) == ("s1", "first")
    assert s1["VirtualSystemIdentifier"] == "snapvm" and "memory:true" in s1["Notes"]
    assert s1["CreationTime"] is not None
    assert enabled_state(conn, vm) == 2  # still running
    check_the_only_snapshot(conn, vm, s1)

    sh(host, "snapvm", "echo after > /root/mark")
    write_disk(host, "snapvm", "DISK-AFTER!")
    check_a_missing_snapshot_changes_nothing(conn, vm, s1)
    assert sh(host, "snapvm", "cat /root/mark") == "after"

    # Applying s1 brings back its memory (the VM runs again) and its disk.
    run_job(conn, "ApplySnapshot", Snapshot=s1.path)
    assert enabled_state(conn, vm) == 2
    assert sh(host, "snapvm", "cat /root/mark") == "before"
    assert read_disk(host, "snapvm", 11) == "DISK-BEFORE"

    # A disk snapshot, taken from s1's state: s1's child, without memory.
    settings = CIMInstance("CIM_SettingData", {"ElementName": "s2"})
    job = run_job(
        conn,
        "CreateSnapshot",
        AffectedSystem=vm,
        SnapshotSettings=settings,
        SnapshotType=Uint16(DISK),
    )
    s2 = created_by(conn, job)
    assert s2["ElementName"] == "s2" and "memory:false" in s2["Notes"]
    [child] = conn.Associators(s1.path, AssocClass="TV_ParentChildSettingData", Role="Antecedent")
    assert child.path == s2.path
    [current] = conn.Associators(vm, AssocClass="TV_MostCurrentSnapshotInBranch")
    assert current.path == s2.path

    # Destroying s1 keeps s2 (s1's data merged into it), now the root of the tree.
    run_job(conn, "DestroySnapshot", AffectedSnapshot=s1.path)
    with pytest.raises(pywbem.CIMError) as exc:
        conn.GetInstance(s1.path)
    assert exc.value.status_code == pywbem.CIM_ERR_NOT_FOUND
    check_the_only_snapshot(conn, vm, s2)
    assert conn.Associators(s2.path, AssocClass="TV_ParentChildSettingData") == []
    assert enabled_state(conn, vm) == 2
    assert read_disk(host, "snapvm", 11) == "DISK-BEFORE"
    power(conn, vm, 3)


def test_a_stopped_vm_reverts_to_a_disk_snapshot_and_stays_stopped(
    host: TestHost, url: str
) -> None:
    conn = connect(url)
    vm = define(conn, "coldvm")
    power(conn, vm, 2)
    host.wait_ready("coldvm")
    write_disk(host, "coldvm", "STATE-A")
    power(conn, vm, 3)
    # Full is the default type; a stopped VM has no memory to save.
    snap = created_by(conn, run_job(conn, "CreateSnapshot", AffectedSystem=vm))
    assert str(snap["ElementName"]).startswith("coldvm ") and "memory:false" in snap["Notes"]
    power(conn, vm, 2)
    host.wait_ready("coldvm", count=2)
    write_disk(host, "coldvm", "STATE-B")
    power(conn, vm, 3)

    run_job(conn, "ApplySnapshot", Snapshot=snap.path)
    assert enabled_state(conn, vm) == 3
    power(conn, vm, 2)
    host.wait_ready("coldvm", count=3)
    assert read_disk(host, "coldvm", 7) == "STATE-A"
    power(conn, vm, 3)
