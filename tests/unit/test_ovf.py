"""OVF descriptors, manifests and OVA archives, without QEMU: thinvisor's own round trip,
descriptors as VMware and VirtualBox write them, and hostile input."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import tarfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import AlreadyExists, InvalidArgument
from thinvisor.host import ovf_io
from thinvisor.host.service import HostService
from thinvisor.storage import ovf
from thinvisor.storage.ovf import (
    OvfDisk,
    OvfFile,
    OvfKernel,
    OvfNic,
    OvfSystem,
    build_descriptor,
    parse_descriptor,
)

RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
ENVELOPE = "{http://schemas.dmtf.org/ovf/envelope/1}"


def appliance_system() -> OvfSystem:
    """What thinvisor exports for a kernel-booting VM with disks on every bus."""
    return OvfSystem(
        name="web1",
        vcpus=2,
        memory_mib=384,
        disks=(
            OvfDisk("vmdisk1", "disk0", OvfFile("file1", "web1-disk0.vmdk", 4096), 16 << 20),
            OvfDisk(
                "vmdisk2", "disk1", OvfFile("file2", "web1-disk1.vmdk", 512), 8 << 20, "ide", 0
            ),
            OvfDisk("vmdisk3", "disk2", OvfFile("file3", "web1-disk2.vmdk"), 1 << 30, "scsi"),
        ),
        nics=(
            OvfNic("net0", "virtio", "user", "02:74:76:0a:0b:0c"),
            OvfNic("net1", "e1000", "lan", "02:74:76:0a:0b:0d", connected=False),
            OvfNic("net2", "rtl8139", "lan"),
        ),
        cdrom_bus="scsi",
        thinvisor=True,
        machine="pc",
        kernel=OvfKernel(
            OvfFile("file4", "web1-vmlinuz", 100),
            OvfFile("file5", "web1-initrd.img", 50),
            "console=ttyS0 quiet",
        ),
    )


def test_descriptor_round_trip() -> None:
    system = appliance_system()
    assert parse_descriptor(build_descriptor(system)) == system


def test_descriptor_round_trip_with_firmware_boot() -> None:
    system = OvfSystem(
        name="db",
        disks=(OvfDisk("vmdisk1", "disk0", OvfFile("file1", "db-disk0.vmdk", 1), 1 << 20),),
        thinvisor=True,
        machine="q35",
        boot_order=("cdrom", "disk"),
    )
    assert parse_descriptor(build_descriptor(system)) == system


def test_descriptor_is_written_as_vmware_and_virtualbox_read_it() -> None:
    data = build_descriptor(appliance_system())
    assert b'xmlns="http://schemas.dmtf.org/ovf/envelope/1"' in data
    assert b"<References>" in data  # OVF elements unprefixed, under the default namespace
    root = ET.fromstring(data)
    assert root.tag == f"{ENVELOPE}Envelope"
    system_type = root.find(f".//{{{ovf.VSSD_NS}}}VirtualSystemType")
    assert system_type is not None and system_type.text == "vmx-07"
    items = root.findall(f".//{ENVELOPE}Item")
    for item in items:  # the RASD schema's element order
        fields = [child.tag for child in item]
        assert fields == sorted(fields)
    by_type: dict[str | None, list[ET.Element]] = {}
    for item in items:
        by_type.setdefault(item.findtext(f"{RASD}ResourceType"), []).append(item)
    memory = by_type["4"][0]
    assert memory.findtext(f"{RASD}AllocationUnits") == "byte * 2^20"
    assert memory.findtext(f"{RASD}VirtualQuantity") == "384"
    assert by_type["3"][0].findtext(f"{RASD}VirtualQuantity") == "2"
    nic_types = [i.findtext(f"{RASD}ResourceSubType") for i in by_type["10"]]
    assert nic_types == ["VirtioNet", "E1000", "RTL8139"]
    assert by_type["10"][0].findtext(f"{RASD}Address") == "02:74:76:0a:0b:0c"
    assert [i.findtext(f"{RASD}ResourceSubType") for i in by_type["6"]] == ["lsilogic"]
    assert len(by_type["5"]) == 1 and len(by_type["15"]) == 1
    disk = root.find(f"{ENVELOPE}DiskSection/{ENVELOPE}Disk")
    assert disk is not None
    assert disk.get(f"{ENVELOPE}capacity") == str(16 << 20)
    assert disk.get(f"{ENVELOPE}format") == ovf.VMDK_STREAM_OPTIMIZED
    section = root.find(f".//{{{ovf.TV_NS}}}Thinvisor")
    assert section is not None and section.get(f"{ENVELOPE}required") == "false"
    assert section[0].tag == f"{ENVELOPE}Info"  # every section starts with its Info


def test_many_scsi_disks_get_a_second_controller_and_skip_unit_7() -> None:
    disks = tuple(
        OvfDisk(f"vmdisk{n}", f"disk{n}", OvfFile(f"file{n}", f"d{n}.vmdk"), 1 << 20)
        for n in range(16)
    )
    root = ET.fromstring(build_descriptor(OvfSystem(name="big", disks=disks)))
    items = root.findall(f".//{ENVELOPE}Item")
    controllers = [i for i in items if i.findtext(f"{RASD}ResourceType") == "6"]
    assert len(controllers) == 2
    units = [
        i.findtext(f"{RASD}AddressOnParent")
        for i in items
        if i.findtext(f"{RASD}ResourceType") == "17"
    ]
    assert "7" not in units[:15] and units[15] == "0"


VMWARE_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by VMware ovftool 4.4.3 (build-18663434), UTC time: 2023-03-02T10:11:12.345Z-->
<Envelope vmw:buildId="build-18663434" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vmw="http://www.vmware.com/schema/ovf"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="web01-disk1.vmdk" ovf:id="file1" ovf:size="734003200"/>
    <File ovf:href="web01-disk2.vmdk" ovf:id="file2" ovf:size="68096"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1"
        ovf:fileRef="file1" ovf:populatedSize="2147483648"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="512" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk2"
        ovf:fileRef="file2"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="web01">
    <Info>A virtual machine</Info>
    <Name>web01</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian10_64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>web01</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">1</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>2048MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>SATA controller 0</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>1</rasd:Address>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>VirtualIDEController 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>CD-ROM 1</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:Parent>5</rasd:Parent>
        <rasd:ResourceSubType>vmware.cdrom.remotepassthrough</rasd:ResourceSubType>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>00:50:56:ab:cd:ef</rasd:Address>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on &quot;VM Network&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>10</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="wakeOnLanEnabled" vmw:value="true"/>
      </Item>
      <Item>
        <rasd:AddressOnParent>8</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 2</rasd:ElementName>
        <rasd:InstanceID>11</rasd:InstanceID>
        <rasd:ResourceSubType>E1000e</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>Video card</rasd:ElementName>
        <rasd:InstanceID>12</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="{firmware}"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def test_parses_a_vmware_descriptor() -> None:
    system = parse_descriptor(VMWARE_OVF.replace("{firmware}", "bios").encode())
    assert (system.name, system.vcpus, system.memory_mib) == ("web01", 2, 2048)
    assert [(d.id, d.file.href, d.capacity, d.bus) for d in system.disks] == [
        ("vmdisk1", "web01-disk1.vmdk", 16 << 30, "scsi"),
        ("vmdisk2", "web01-disk2.vmdk", 512 << 20, "ide"),  # SATA: thinvisor's ide
    ]
    assert system.disks[0].populated_size == 2 << 30
    assert system.disks[0].file.size == 734003200
    # VmxNet3 does not exist in thinvisor: e1000, which every guest drives; e1000e is e1000.
    assert [(n.model, n.network, n.mac, n.connected) for n in system.nics] == [
        ("e1000", "VM Network", "00:50:56:ab:cd:ef", True),
        ("e1000", "VM Network", None, False),
    ]
    assert system.cdrom_bus == "ide"
    assert not system.thinvisor and system.kernel is None and system.machine is None
    assert system.firmware == "bios"


def test_a_vmware_uefi_guest_is_recognised() -> None:
    system = parse_descriptor(VMWARE_OVF.replace("{firmware}", "efi").encode())
    assert system.firmware == "efi"


VIRTUALBOX_OVF2 = """<?xml version="1.0"?>
<Envelope ovf:version="2.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/2"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
    xmlns:vbox="http://www.virtualbox.org/ovf/machine"
    xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData.xsd"
    xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData.xsd">
  <References>
    <File ovf:id="file1" ovf:href="Debian 12-disk001.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="21474836480" ovf:diskId="vmdisk1" ovf:fileRef="file1"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
        vbox:uuid="5a0ab5f4-3bc4-4c4f-8b9d-0d4e4a4c1c11"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="Debian 12">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>Debian 12</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>1 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>1024 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>ideController0</rasd:Caption>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <EthernetPortItem>
        <epasd:AutomaticAllocation>true</epasd:AutomaticAllocation>
        <epasd:Caption>Ethernet adapter on 'NAT'</epasd:Caption>
        <epasd:Connection>NAT</epasd:Connection>
        <epasd:InstanceID>8</epasd:InstanceID>
        <epasd:ResourceSubType>E1000</epasd:ResourceSubType>
        <epasd:ResourceType>10</epasd:ResourceType>
      </EthernetPortItem>
      <EthernetPortItem>
        <epasd:AutomaticAllocation>true</epasd:AutomaticAllocation>
        <epasd:Caption>Ethernet adapter on 'NAT'</epasd:Caption>
        <epasd:Connection>NAT</epasd:Connection>
        <epasd:InstanceID>9</epasd:InstanceID>
        <epasd:ResourceSubType>virtio-net</epasd:ResourceSubType>
        <epasd:ResourceType>10</epasd:ResourceType>
      </EthernetPortItem>
      <EthernetPortItem>
        <epasd:AutomaticAllocation>true</epasd:AutomaticAllocation>
        <epasd:Connection>NAT</epasd:Connection>
        <epasd:InstanceID>10</epasd:InstanceID>
        <epasd:ResourceSubType>PCNet32</epasd:ResourceSubType>
        <epasd:ResourceType>10</epasd:ResourceType>
      </EthernetPortItem>
      <StorageItem>
        <sasd:AddressOnParent>0</sasd:AddressOnParent>
        <sasd:Caption>disk1</sasd:Caption>
        <sasd:Description>Disk Image</sasd:Description>
        <sasd:HostResource>/disk/vmdisk1</sasd:HostResource>
        <sasd:InstanceID>11</sasd:InstanceID>
        <sasd:Parent>5</sasd:Parent>
        <sasd:ResourceType>17</sasd:ResourceType>
      </StorageItem>
      <StorageItem>
        <sasd:AddressOnParent>0</sasd:AddressOnParent>
        <sasd:AutomaticAllocation>true</sasd:AutomaticAllocation>
        <sasd:Caption>cdrom1</sasd:Caption>
        <sasd:Description>CD-ROM Drive</sasd:Description>
        <sasd:InstanceID>12</sasd:InstanceID>
        <sasd:Parent>3</sasd:Parent>
        <sasd:ResourceType>15</sasd:ResourceType>
      </StorageItem>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.19-linux"
        uuid="{d3f6a4ad-0c33-4cf5-9bd3-5a2b4b0bd1a1}" name="Debian 12">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware><CPU count="1"/><Memory RAMSize="1024"/></Hardware>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
"""


def test_parses_a_virtualbox_ovf2_descriptor() -> None:
    system = parse_descriptor(VIRTUALBOX_OVF2.encode())
    assert (system.name, system.vcpus, system.memory_mib) == ("Debian 12", 1, 1024)
    assert [(d.file.href, d.capacity, d.bus) for d in system.disks] == [
        ("Debian 12-disk001.vmdk", 20 << 30, "ide")  # on the AHCI controller
    ]
    assert [n.model for n in system.nics] == ["e1000", "virtio", "e1000"]
    assert all(n.network == "NAT" and n.mac is None for n in system.nics)
    assert system.cdrom_bus == "ide"
    assert not system.thinvisor


def test_a_virtualbox_uefi_guest_is_recognised() -> None:
    efi = VIRTUALBOX_OVF2.replace("<Hardware>", '<Hardware><Firmware type="EFI64"/>')
    assert parse_descriptor(efi.encode()).firmware == "efi"


def test_parses_a_virtualbox_descriptor_in_ovf1() -> None:
    ovf1 = (
        VIRTUALBOX_OVF2.replace("envelope/2", "envelope/1")
        .replace('ovf:version="2.0"', 'ovf:version="1.0"')
        .replace("EthernetPortItem", "Item")
        .replace("StorageItem", "Item")
        .replace("epasd:", "rasd:")
        .replace("sasd:", "rasd:")
    )
    assert parse_descriptor(ovf1.encode()) == parse_descriptor(VIRTUALBOX_OVF2.encode())


def test_items_of_other_deployment_options_and_bounds_do_not_apply() -> None:
    data = VMWARE_OVF.replace("{firmware}", "bios").replace(
        "<VirtualSystem ",
        "<DeploymentOptionSection><Info>sizes</Info>"
        '<Configuration ovf:id="small"><Label>small</Label><Description>s</Description>'
        "</Configuration>"
        '<Configuration ovf:id="large" ovf:default="true"><Label>large</Label>'
        "<Description>l</Description></Configuration>"
        "</DeploymentOptionSection><VirtualSystem ",
    )
    extra = (
        '<Item ovf:configuration="large"><rasd:InstanceID>20</rasd:InstanceID>'
        "<rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>8</rasd:VirtualQuantity>"
        '</Item><Item ovf:configuration="small"><rasd:InstanceID>21</rasd:InstanceID>'
        "<rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity>"
        '</Item><Item ovf:bound="max"><rasd:InstanceID>22</rasd:InstanceID>'
        "<rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>9999</rasd:VirtualQuantity>"
        "</Item>"
    )
    data = data.replace('<vmw:Config ovf:required="false" vmw:key="firmware"', extra + "<x:y ")
    data = data.replace("<x:y ", '<vmw:Config ovf:required="false" vmw:key="firmware"')
    system = parse_descriptor(data.encode())
    assert (system.vcpus, system.memory_mib) == (8, 2048)


@pytest.mark.parametrize(
    ("subtype", "model"),
    [
        ("E1000", "e1000"),
        ("E1000e", "e1000"),
        ("VirtioNet", "virtio"),
        ("virtio-net", "virtio"),
        ("RTL8139", "rtl8139"),
        ("PCNet32", "e1000"),
        ("VmxNet3", "e1000"),
        ("", "e1000"),
    ],
)
def test_nic_models(subtype: str, model: str) -> None:
    assert ovf.nic_model(subtype) == model


@pytest.mark.parametrize(
    ("resource_type", "subtype", "bus"),
    [
        (6, "lsilogic", "scsi"),
        (6, "VirtualSCSI", "scsi"),
        (5, "PIIX4", "ide"),
        (5, "", "ide"),
        (20, "AHCI", "ide"),
        (20, "vmware.sata.ahci", "ide"),
        (20, "virtio-blk", "virtio"),
        (20, "virtio-scsi", "scsi"),
        (20, "vmware.nvme.controller", "ide"),
    ],
)
def test_controller_buses(resource_type: int, subtype: str, bus: str) -> None:
    assert ovf.controller_bus(resource_type, subtype) == bus


def minimal(body: str = "", references: str = "", disks: str = "") -> bytes:
    return f"""<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>{references}</References>
  <DiskSection><Info>disks</Info>{disks}</DiskSection>
  {body}
</Envelope>""".encode()


HARDWARE = "<VirtualHardwareSection><Info>hw</Info>{items}</VirtualHardwareSection>"
SYSTEM = '<VirtualSystem ovf:id="vm"><Info>vm</Info>' + HARDWARE + "</VirtualSystem>"
DISK_ITEM = (
    "<Item><rasd:HostResource>ovf:/disk/{disk}</rasd:HostResource>"
    "<rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>"
)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<Envelope><References>", "malformed XML: no element found: line 1, column 22"),
        (
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>',
            "refused XML",
        ),
        (b'<Envelope xmlns="urn:other"/>', "unknown envelope namespace 'urn:other'"),
        (b"<Project/>", "the root element is Project, not an OVF Envelope"),
        (minimal(), "the descriptor has no VirtualSystem"),
        (
            minimal(
                '<VirtualSystemCollection ovf:id="app"><Info>two</Info>'
                + SYSTEM.format(items="")
                + SYSTEM.format(items="")
                + "</VirtualSystemCollection>"
            ),
            "the descriptor holds 2 virtual systems; import one VM at a time",
        ),
        (
            minimal('<VirtualSystem ovf:id="vm"><Info>vm</Info></VirtualSystem>'),
            "VirtualSystem 'vm' has no VirtualHardwareSection",
        ),
        (
            minimal(disks='<Disk ovf:diskId="vmdisk1" ovf:capacity="1"/>'),
            "disk vmdisk1 has no file (ovf:fileRef); empty disks are not imported",
        ),
        (
            minimal(disks='<Disk ovf:diskId="vmdisk1" ovf:capacity="1" ovf:fileRef="file9"/>'),
            "disk vmdisk1 refers to file 'file9', which References does not list",
        ),
        (
            minimal(
                SYSTEM.format(items=DISK_ITEM.format(disk="vmdisk7")),
                references='<File ovf:id="file1" ovf:href="a.vmdk"/>',
            ),
            "disk item 5 refers to disk 'vmdisk7', which DiskSection does not list",
        ),
        (
            minimal(references='<File ovf:id="file1" ovf:href="../../etc/shadow"/>'),
            "file '../../etc/shadow' leads out of the package ('..')",
        ),
        (
            minimal(references='<File ovf:id="file1" ovf:href="/etc/shadow"/>'),
            "file '/etc/shadow' is an absolute path",
        ),
        (
            minimal(references='<File ovf:id="f" ovf:href="a.vmdk" ovf:chunkSize="1024"/>'),
            "file a.vmdk is split into chunks (ovf:chunkSize); it is not supported",
        ),
        (
            minimal(
                references='<File ovf:id="file1" ovf:href="a.vmdk"/>',
                disks='<Disk ovf:diskId="d" ovf:capacity="${size}" ovf:fileRef="file1"/>',
            ),
            "disk d: '${size}' is not a whole number",
        ),
        (
            minimal(
                SYSTEM.format(
                    items="<Item><rasd:InstanceID>1</rasd:InstanceID>"
                    "<rasd:ResourceType>4</rasd:ResourceType>"
                    "<rasd:AllocationUnits>pages</rasd:AllocationUnits>"
                    "<rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>"
                )
            ),
            "the memory item: unknown allocation units 'pages'",
        ),
    ],
)
def test_refuses_what_it_cannot_read(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_descriptor(data)
    assert caught.value.field == "ovf"
    assert caught.value.reason.startswith(reason)
    assert "\n" not in caught.value.reason


# Manifests


def test_manifest_round_trip_and_the_virtualbox_spelling() -> None:
    text = ovf.manifest_text({"a.ovf": "ab" * 32, "a-disk0.vmdk": "cd" * 32})
    assert text == f"SHA256(a.ovf)= {'ab' * 32}\nSHA256(a-disk0.vmdk)= {'cd' * 32}\n".encode()
    assert ovf.parse_manifest(text, "ova")["a-disk0.vmdk"] == ovf.Digest("SHA256", "cd" * 32)
    vbox = f"SHA1 (Debian 12.ovf) = {'EF' * 20}\nSHA1 (Debian 12-disk001.vmdk) = {'01' * 20}\n"
    parsed = ovf.parse_manifest(vbox.encode(), "ova")
    assert parsed["Debian 12.ovf"] == ovf.Digest("SHA1", "ef" * 20)
    assert set(parsed) == {"Debian 12.ovf", "Debian 12-disk001.vmdk"}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"MD5(a.ovf)= 00\n", "manifest line 1 is not 'SHA256(name)= digest'"),
        (b"SHA256(a.ovf)= abcd\n", "manifest line 1 is not 'SHA256(name)= digest'"),
        (f"SHA1(a)= {'0' * 40}\nSHA1(a)= {'0' * 40}\n".encode(), "the manifest lists a twice"),
        (b"\xff\xfe", "the manifest is not UTF-8 text"),
    ],
)
def test_malformed_manifests(text: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ovf.parse_manifest(text, "ova")
    assert (caught.value.field, caught.value.reason) == ("ova", reason)


def test_checksum_mismatch_names_the_file() -> None:
    manifest = {"a-disk0.vmdk": ovf.Digest("SHA256", "00" * 32)}
    with pytest.raises(InvalidArgument) as caught:
        ovf.check_digest(manifest, "a-disk0.vmdk", "11" * 32, "ova")
    assert caught.value.reason == "checksum mismatch for a-disk0.vmdk: its SHA256 differs"


# OVA archives


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_package(tmp_path: Path, disk: bytes = b"disk data " * 1000) -> Path:
    descriptor = build_descriptor(
        OvfSystem(
            name="a",
            disks=(OvfDisk("vmdisk1", "disk0", OvfFile("file1", "a-disk0.vmdk"), 1 << 20),),
        )
    )
    (tmp_path / "a-disk0.vmdk").write_bytes(disk)
    manifest = ovf.manifest_text({"a.ovf": sha256(descriptor), "a-disk0.vmdk": sha256(disk)})
    dest = tmp_path / "a.ova"
    members: list[ovf.Member] = [
        ("a.ovf", descriptor),
        ("a.mf", manifest),
        ("a-disk0.vmdk", tmp_path / "a-disk0.vmdk"),
    ]
    ovf.write_ova(dest, members)
    return dest


def test_write_ova_then_read_it_back(tmp_path: Path) -> None:
    dest = write_package(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with tarfile.open(dest) as tar:
        assert tar.getnames() == ["a.ovf", "a.mf", "a-disk0.vmdk"]
    assert dest.read_bytes()[257:263] == b"ustar\x00"  # POSIX ustar, as OVF requires
    work = tmp_path / "work"
    work.mkdir()
    with ovf.OvaPackage(dest) as package:
        manifest = ovf.parse_manifest(package.read_manifest() or b"", "ova")
        ovf.check_descriptor(package, manifest, package.read_descriptor())
        system = parse_descriptor(package.read_descriptor())
        got = package.fetch([f.href for f in system.files()], manifest, work)
    assert got == {"a-disk0.vmdk": work / "a-disk0.vmdk"}
    assert got["a-disk0.vmdk"].read_bytes() == b"disk data " * 1000


def test_write_ova_never_replaces_a_file(tmp_path: Path) -> None:
    dest = write_package(tmp_path)
    with pytest.raises(AlreadyExists):
        ovf.write_ova(dest, [("b.ovf", b"<x/>")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-disk0.vmdk", "a.ova"]


def test_write_ova_stops_when_asked_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "big.vmdk").write_bytes(b"x" * (3 << 20))
    stop = threading.Event()
    stop.set()
    with pytest.raises(ovf.Interrupted):
        ovf.write_ova(
            tmp_path / "b.ova", [("b.ovf", b"<x/>"), ("big.vmdk", tmp_path / "big.vmdk")], stop=stop
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.vmdk"]


def tampered(ova: Path, member: str) -> None:
    """Flip one byte of ``member``'s data, leaving the archive valid."""
    with tarfile.open(ova) as tar:
        offset = tar.getmember(member).offset_data
    with ova.open("r+b") as f:
        f.seek(offset + 3)
        byte = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_tampered_member_is_refused_by_name(tmp_path: Path) -> None:
    dest = write_package(tmp_path)
    tampered(dest, "a-disk0.vmdk")
    work = tmp_path / "work"
    work.mkdir()
    with ovf.OvaPackage(dest) as package:
        manifest = ovf.parse_manifest(package.read_manifest() or b"", "ova")
        ovf.check_descriptor(package, manifest, package.read_descriptor())
        with pytest.raises(InvalidArgument) as caught:
            package.fetch(["a-disk0.vmdk"], manifest, work)
    assert caught.value.reason == "checksum mismatch for a-disk0.vmdk: its SHA256 differs"


def test_a_tampered_descriptor_is_refused(tmp_path: Path) -> None:
    dest = write_package(tmp_path)
    tampered(dest, "a.ovf")
    with ovf.OvaPackage(dest) as package:
        manifest = ovf.parse_manifest(package.read_manifest() or b"", "ova")
        with pytest.raises(InvalidArgument, match=r"checksum mismatch for a\.ovf"):
            ovf.check_descriptor(package, manifest, package.read_descriptor())


def test_every_file_used_must_be_in_the_manifest(tmp_path: Path) -> None:
    dest = write_package(tmp_path)
    with ovf.OvaPackage(dest) as package:
        manifest = ovf.parse_manifest(package.read_manifest() or b"", "ova")
        del manifest["a-disk0.vmdk"]
        with pytest.raises(
            InvalidArgument, match=re.escape("the manifest does not list a-disk0.vmdk")
        ):
            package.fetch(["a-disk0.vmdk"], manifest, tmp_path)
        manifest["gone.vmdk"] = ovf.Digest("SHA256", "00" * 32)
        with pytest.raises(InvalidArgument, match=re.escape("gone.vmdk is missing from the OVA")):
            package.fetch([], manifest, tmp_path)


def raw_tar(path: Path, *infos: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in infos:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


OVF_MEMBER = (member("x.ovf"), b"<Envelope/>")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ((member("/etc/cron.d/x"), b"x"), "member '/etc/cron.d/x' is an absolute path"),
        ((member("../x.vmdk"), b"x"), "member '../x.vmdk' leads out of the package ('..')"),
        ((member("disks/x.vmdk"), b"x"), "member 'disks/x.vmdk' is not a plain file name"),
        (
            (member("x.vmdk", tarfile.SYMTYPE, "/etc/shadow"), b""),
            "member 'x.vmdk' is a symbolic link; an OVA holds files only",
        ),
        (
            (member("x.vmdk", tarfile.LNKTYPE, "x.ovf"), b""),
            "member 'x.vmdk' is a hard link; an OVA holds files only",
        ),
        (
            (member("sda", tarfile.BLKTYPE), b""),
            "member 'sda' is a block device; an OVA holds files only",
        ),
        (
            (member("tty", tarfile.CHRTYPE), b""),
            "member 'tty' is a character device; an OVA holds files only",
        ),
        (
            (member("dir", tarfile.DIRTYPE), b""),
            "member 'dir' is a directory; an OVA holds files only",
        ),
        ((member("x.ovf"), b"again"), "member 'x.ovf' appears twice"),
    ],
)
def test_unsafe_members_are_refused(
    tmp_path: Path, bad: tuple[tarfile.TarInfo, bytes], reason: str
) -> None:
    ova = raw_tar(tmp_path / "x.ova", OVF_MEMBER, bad)
    with pytest.raises(InvalidArgument) as caught:
        ovf.OvaPackage(ova)
    assert (caught.value.field, caught.value.reason) == ("ova", reason)


def test_the_descriptor_must_come_first(tmp_path: Path) -> None:
    ova = raw_tar(tmp_path / "x.ova", (member("x.vmdk"), b"disk"), OVF_MEMBER)
    with pytest.raises(
        InvalidArgument, match=re.escape("the first member must be the .ovf descriptor")
    ):
        ovf.OvaPackage(ova)


def test_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "x.ova").write_bytes(b"PK\x03\x04 a zip file, not a tar" * 40)
    with pytest.raises(InvalidArgument, match=r"^ova: x\.ova is not a tar archive"):
        ovf.OvaPackage(tmp_path / "x.ova")


def test_directory_packages(tmp_path: Path) -> None:
    write_package(tmp_path)
    with tarfile.open(tmp_path / "a.ova") as tar:
        tar.extractall(tmp_path / "dir", filter="data")
    package = ovf.open_package(tmp_path / "dir")
    assert isinstance(package, ovf.DirectoryPackage) and package.descriptor_name == "a.ovf"
    manifest = ovf.parse_manifest(package.read_manifest() or b"", "ovf")
    got = package.fetch(["a-disk0.vmdk"], manifest, tmp_path)
    assert got == {"a-disk0.vmdk": tmp_path / "dir" / "a-disk0.vmdk"}
    (tmp_path / "dir" / "a-disk0.vmdk").write_bytes(b"changed")
    with pytest.raises(InvalidArgument, match=re.escape("checksum mismatch for a-disk0.vmdk")):
        package.fetch(["a-disk0.vmdk"], manifest, tmp_path)
    (tmp_path / "dir" / "b.ovf").write_bytes(b"<x/>")
    with pytest.raises(
        InvalidArgument, match=re.escape("holds 2 .ovf files; exactly one is imported")
    ):
        ovf.open_package(tmp_path / "dir")


# The host side that needs no QEMU


@pytest.fixture
def service(tmp_path: Path) -> HostService:
    config = HostConfig(
        run_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        datastores=[DatastoreConfig(name="ds1", path=tmp_path / "ds1")],
    )
    return HostService(config)


def test_sweep_removes_only_import_and_export_leftovers(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    (ds / ".import-abc123" / "x").mkdir(parents=True)
    (ds / ".export-def456").mkdir()
    (ds / ".export-zz-vm1.ova").write_bytes(b"partial")
    (ds / "vm1").mkdir()
    (ds / "kept.ova").write_bytes(b"ova")
    removed = ovf_io.sweep_imports([ds, tmp_path / "missing"])
    assert sorted(p.name for p in removed) == [
        ".export-def456",
        ".export-zz-vm1.ova",
        ".import-abc123",
    ]
    assert sorted(p.name for p in ds.iterdir()) == ["kept.ova", "vm1"]


def test_macs_are_kept_only_from_thinvisor_and_when_free(service: HostService) -> None:
    nics = (OvfNic("net0", "e1000", "x", "02:74:76:01:02:03"), OvfNic("net1", "virtio", "y"))
    foreign = ovf_io._nics(service, OvfSystem(name="v", nics=nics), "user")
    assert foreign[0]["mac"] != "02:74:76:01:02:03"
    assert [n["network"] for n in foreign] == ["user", "user"]
    ours = ovf_io._nics(service, OvfSystem(name="v", nics=nics, thinvisor=True), "lan")
    assert ours[0]["mac"] == "02:74:76:01:02:03"
    assert ours[1]["mac"].startswith("02:74:76:")
    assert [(n["name"], n["model"], n["network"]) for n in ours] == [
        ("net0", "e1000", "lan"),
        ("net1", "virtio", "lan"),
    ]


def test_vm_names_from_the_ovf_must_be_valid(service: HostService) -> None:
    system = parse_descriptor(VIRTUALBOX_OVF2.encode())
    with pytest.raises(InvalidArgument) as caught:
        ovf_io._vm_spec(service, system, None, "user")
    assert caught.value.field == "name"
    assert "the OVF's name 'Debian 12' is not a valid VM name" in caught.value.reason
    spec = ovf_io._vm_spec(service, system, "debian12", "user")
    assert (spec.name, spec.vcpus, spec.memory_mib, spec.boot.kind) == (
        "debian12",
        1,
        1024,
        "firmware",
    )
    assert spec.cdrom is not None and spec.cdrom.bus == "ide"


def test_uefi_guests_are_refused(service: HostService) -> None:
    system = parse_descriptor(VMWARE_OVF.replace("{firmware}", "efi").encode())
    with pytest.raises(InvalidArgument, match="needs UEFI firmware"):
        ovf_io._vm_spec(service, system, None, "user")


def test_a_descriptor_that_maps_to_no_valid_vm_is_refused(service: HostService) -> None:
    system = OvfSystem(name="tiny", memory_mib=4)
    with pytest.raises(InvalidArgument) as caught:
        ovf_io._vm_spec(service, system, None, "user")
    assert caught.value.field == "ovf"
    assert caught.value.reason.startswith("cannot be mapped to a VM: memory_mib:")


def test_a_cancelled_ova_write_stops_its_thread_and_leaves_nothing(tmp_path: Path) -> None:
    big = tmp_path / "big.vmdk"
    big.write_bytes(b"x" * (8 << 20))
    dest = tmp_path / "b.ova"
    stops: list[threading.Event] = []
    started = threading.Event()

    def on_bytes(count: int) -> None:
        started.set()
        stops[0].wait(30)  # hold the writer until the cancellation has asked it to stop

    def work(stop: threading.Event) -> None:
        stops.append(stop)
        ovf.write_ova(dest, [("b.ovf", b"<x/>"), ("big.vmdk", big)], stop=stop, on_bytes=on_bytes)

    async def go() -> None:
        task = asyncio.create_task(ovf_io._in_thread(work))
        await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert stops[0].is_set()

    asyncio.run(go())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.vmdk"]


def test_members_too_big_for_ustar_get_gnu_size_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ovf, "_USTAR_SIZE_MAX", 1000)  # as if the disk were 8 GiB or more
    (tmp_path / "big.vmdk").write_bytes(b"y" * 4096)
    dest = tmp_path / "b.ova"
    ovf.write_ova(dest, [("b.ovf", b"<x/>"), ("big.vmdk", tmp_path / "big.vmdk")])
    data = dest.read_bytes()
    assert data[257:263] == b"ustar\x00"
    with tarfile.open(dest) as tar:
        big = tar.getmember("big.vmdk")
        assert data[big.offset + 257 : big.offset + 265] == b"ustar  \x00"  # GNU's magic
        stream = tar.extractfile(big)
        assert stream is not None and stream.read() == b"y" * 4096


def test_import_refuses_a_source_outside_the_datastores(
    service: HostService, tmp_path: Path
) -> None:
    ova = write_package(tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(ovf_io.import_ovf(service, ova))
    assert (caught.value.field, caught.value.reason) == (
        "source",
        f"{ova} is outside the host's datastores",
    )


def test_import_refuses_an_unknown_network(service: HostService, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(ovf_io.import_ovf(service, tmp_path / "ds1" / "a.ova", network="nowhere"))
    assert (caught.value.field, caught.value.reason) == (
        "network",
        "no port group 'nowhere' on this host",
    )


def test_export_refuses_a_bad_target(service: HostService, tmp_path: Path) -> None:
    (tmp_path / "ds1").mkdir()
    (tmp_path / "ds1" / "file").write_text("")
    with pytest.raises(InvalidArgument, match="not a directory"):
        asyncio.run(ovf_io.export_ova(service, "vm1", tmp_path / "ds1" / "file" / "a.ova"))
    for dest, reason in [
        (Path("rel.ova"), "must be an absolute path"),
        (tmp_path / "ds1" / "a.tar", "a.tar does not end in .ova"),
        (tmp_path / "a.ova", f"{tmp_path / 'a.ova'} is outside the host's datastores"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            asyncio.run(ovf_io.export_ova(service, "vm1", dest))
        assert (caught.value.field, caught.value.reason) == ("dest", reason)
