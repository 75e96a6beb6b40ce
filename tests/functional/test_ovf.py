"""OVF/OVA export and import on real QEMU: an appliance VM's disk content survives the
trip through an OVA, and hostile packages are refused without leaving anything behind."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidState
from thinvisor.host.inventory import Inventory
from thinvisor.host.ovf_io import export_ova, import_ovf
from thinvisor.host.tasks import Progress, Task

from .hostenv import READY, TestHost

pytestmark = pytest.mark.functional

MARK = "THINVISOR-OVF-MARK"
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
SOURCE_MAC = "02:74:76:0f:0f:01"


def guest(host: TestHost, name: str, command: str, timeout: float = 60) -> tuple[int, str]:
    return host.guest(name, command, timeout)


def hidden(host: TestHost) -> list[str]:
    return sorted(p.name for p in host.datastore.iterdir() if p.name.startswith("."))


def source_vm(host: TestHost, *, start: bool) -> None:
    """An appliance VM with a 16 MiB data disk (/dev/vda in the guest) and an e1000 NIC."""
    nic = {"name": "net0", "mac": SOURCE_MAC, "model": "e1000", "network": "user"}
    host.create("src", start=start, disk_mib=16, nics=[nic])


def descriptor_items(ova: Path) -> tuple[list[str], ET.Element]:
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        stream = tar.extractfile(names[0])
        assert stream is not None
        return names, ET.fromstring(stream.read())


def test_export_then_import_keeps_the_disk_content(host: TestHost) -> None:
    source_vm(host, start=True)
    host.wait_ready("src")
    write = f"echo {MARK} | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null"
    assert guest(host, "src", write)[0] == 0
    host.run(host.service.shutdown("src", timeout=90))
    ova = host.datastore / "src.ova"
    task = Task("t1", "vm.export", "vm/src", None)
    assert host.run(export_ova(host.service, "src", ova, Progress(task))) == ova
    assert task.progress >= 80 and task.message == "writing the OVA"
    assert hidden(host) == []

    names, root = descriptor_items(ova)
    assert names == ["src.ovf", "src.mf", "src-disk0.vmdk", "src-vmlinuz", "src-initrd.img"]
    assert ova.read_bytes()[257:263] == b"ustar\x00"
    disk = root.find(f"{OVF}DiskSection/{OVF}Disk")
    assert disk is not None and disk.get(f"{OVF}capacity") == str(16 << 20)
    items = {item.findtext(f"{RASD}ResourceType"): item for item in root.iter(f"{OVF}Item")}
    assert items["3"].findtext(f"{RASD}VirtualQuantity") == "1"
    assert items["4"].findtext(f"{RASD}VirtualQuantity") == "128"
    assert items["4"].findtext(f"{RASD}AllocationUnits") == "byte * 2^20"
    assert items["10"].findtext(f"{RASD}ResourceSubType") == "E1000"
    assert items["10"].findtext(f"{RASD}Address") == SOURCE_MAC
    check_manifest_and_vmdk(host, ova)

    # The source still has SOURCE_MAC: the copy gets a new one.
    task = Task("t2", "vm.import", None, None)
    copy = host.run(import_ovf(host.service, ova, name="copy", progress=Progress(task)))
    assert (task.progress, task.message) == (50, "converting the disks to qcow2")
    assert copy.spec is not None
    assert [(d.name, d.bus, d.format) for d in copy.spec.disks] == [("disk0", "virtio", "qcow2")]
    assert (copy.spec.vcpus, copy.spec.memory_mib, copy.spec.boot.kind) == (1, 128, "kernel")
    assert copy.spec.cdrom is not None and copy.spec.cdrom.bus == "scsi"
    assert [n.model for n in copy.spec.nics] == ["e1000"]
    assert copy.spec.nics[0].mac != SOURCE_MAC
    assert hidden(host) == []
    host.run(host.service.start("copy"))
    log = host.wait_ready("copy")
    assert float(READY.search(log).group(1)) > 0  # type: ignore[union-attr]
    read = f"dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c {len(MARK) + 1}"
    assert guest(host, "copy", read) == (0, f"{MARK}\n")

    # Once the MAC is free on this host, a thinvisor OVA keeps it.
    host.run(host.service.delete_vm("src"))
    again = host.run(import_ovf(host.service, ova, name="again"))
    assert again.spec is not None and again.spec.nics[0].mac == SOURCE_MAC


def check_manifest_and_vmdk(host: TestHost, ova: Path) -> None:
    """Every member is in the manifest with its SHA-256; the disk is stream-optimized."""
    out = host.root / "unpacked"
    with tarfile.open(ova) as tar:
        tar.extractall(out, filter="data")
    lines = (out / "src.mf").read_text().splitlines()
    expected = [
        f"SHA256({name})= {hashlib.sha256((out / name).read_bytes()).hexdigest()}"
        for name in ["src.ovf", "src-disk0.vmdk", "src-vmlinuz", "src-initrd.img"]
    ]
    assert lines == expected
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(out / "src-disk0.vmdk")],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(info.stdout)
    assert data["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert data["virtual-size"] == 16 << 20


def test_export_is_refused_while_the_vm_runs(host: TestHost) -> None:
    source_vm(host, start=True)
    with pytest.raises(InvalidState):
        host.run(export_ova(host.service, "src", host.datastore / "src.ova"))
    assert not (host.datastore / "src.ova").exists()
    assert hidden(host) == []


def test_export_refuses_targets_outside_datastores_or_taken(host: TestHost) -> None:
    source_vm(host, start=False)
    with pytest.raises(InvalidArgument, match="outside the host's datastores"):
        host.run(export_ova(host.service, "src", host.root / "src.ova"))
    taken = host.datastore / "taken.ova"
    taken.write_bytes(b"mine")
    with pytest.raises(AlreadyExists, match="already exists"):
        host.run(export_ova(host.service, "src", taken))
    assert taken.read_bytes() == b"mine"
    assert hidden(host) == []


def tamper(ova: Path, member: str) -> None:
    """Flip one byte in the middle of ``member``'s data; the tar stays valid."""
    with tarfile.open(ova) as tar:
        info = tar.getmember(member)
    with ova.open("r+b") as f:
        f.seek(info.offset_data + info.size // 2)
        byte = f.read(1)[0]
        f.seek(info.offset_data + info.size // 2)
        f.write(bytes([byte ^ 0x55]))


def assert_nothing_imported(host: TestHost, name: str) -> None:
    assert Inventory(host.config).find(name) is None
    assert hidden(host) == []


def test_bad_packages_are_refused_and_leave_nothing(host: TestHost) -> None:
    source_vm(host, start=False)
    good = host.datastore / "src.ova"
    host.run(export_ova(host.service, "src", good))

    bad = host.datastore / "tampered.ova"
    bad.write_bytes(good.read_bytes())
    tamper(bad, "src-disk0.vmdk")
    with pytest.raises(InvalidArgument) as caught:
        host.run(import_ovf(host.service, bad, name="copy"))
    assert (caught.value.field, caught.value.reason) == (
        "ova",
        "checksum mismatch for src-disk0.vmdk: its SHA256 differs",
    )
    assert_nothing_imported(host, "copy")

    broken = b'<?xml version="1.0"?>\n<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">\n'
    digest = hashlib.sha256(broken).hexdigest()
    malformed = host.datastore / "malformed.ova"
    with tarfile.open(malformed, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("m.ovf", broken), ("m.mf", f"SHA256(m.ovf)= {digest}\n".encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InvalidArgument) as caught:
        host.run(import_ovf(host.service, malformed, name="m"))
    assert caught.value.field == "ovf"
    assert caught.value.reason == "malformed XML: no element found: line 3, column 0"
    assert_nothing_imported(host, "m")

    # The intact package still imports (and the VM it makes is real).
    copy = host.run(import_ovf(host.service, good, name="copy"))
    assert copy.state == "stopped"
    assert hidden(host) == []


FOREIGN_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References><File ovf:href="{disk}" ovf:id="file1"/></References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1"
        ovf:fileRef="file1"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="esx-web">
    <Info>A virtual machine</Info>
    <Name>esx-web</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System><vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>128</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:01:02:03</rasd:Address>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)
    return done.stdout


def foreign_ova(host: TestHost, disk: Path) -> Path:
    """An OVA as VMware would write it (no manifest), holding ``disk``."""
    ova = host.datastore / "esx-web.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        descriptor = FOREIGN_OVF.replace("{disk}", disk.name).encode()
        info = tarfile.TarInfo("esx-web.ovf")
        info.size = len(descriptor)
        tar.addfile(info, io.BytesIO(descriptor))
        tar.add(disk, disk.name)
    return ova


def test_imports_a_vmware_ova(host: TestHost) -> None:
    raw = host.root / "disk.raw"
    raw.write_bytes(MARK.encode() + b"\n" + bytes(4 << 20))
    vmdk = host.root / "esx-web-disk1.vmdk"
    qemu_img(
        "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(vmdk)
    )
    ova = foreign_ova(host, vmdk)
    vm = host.run(import_ovf(host.service, ova))
    assert vm.name == "esx-web" and vm.spec is not None
    assert vm.spec.boot.kind == "firmware"
    assert [d.bus for d in vm.spec.disks] == ["scsi"]
    # VmxNet3 becomes e1000; a MAC from another product is never reused.
    assert [(n.model, n.network) for n in vm.spec.nics] == [("e1000", "user")]
    assert vm.spec.nics[0].mac.startswith("02:74:76:")
    imported = vm.paths.vm_dir / vm.spec.disks[0].path
    # Grown to the descriptor's 16 MiB capacity, the guest's bytes intact.
    assert json.loads(qemu_img("info", "--output=json", str(imported)))["virtual-size"] == 16 << 20
    back = host.root / "back.raw"
    qemu_img("convert", "-O", "raw", str(imported), str(back))
    assert back.read_bytes()[: len(MARK) + 1] == MARK.encode() + b"\n"
    assert hidden(host) == []


def test_a_vmdk_pointing_at_a_host_file_is_refused(host: TestHost) -> None:
    secret = host.root / "secret"
    secret.write_bytes(b"host secret\n" + bytes(1 << 20))
    # A descriptor-only VMDK whose extent is a file of the host, not part of the package.
    vmdk = host.root / "esx-web-disk1.vmdk"
    vmdk.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        f'RW 2048 FLAT "{secret}" 0\n'
    )
    assert "monolithicFlat" in qemu_img("info", str(vmdk))  # qemu-img would follow it
    ova = foreign_ova(host, vmdk)
    with pytest.raises(InvalidArgument) as caught:
        host.run(import_ovf(host.service, ova))
    assert caught.value.reason == (
        "disk file esx-web-disk1.vmdk is not a self-contained sparse VMDK"
    )
    assert_nothing_imported(host, "esx-web")
