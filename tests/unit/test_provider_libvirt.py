"""The libvirt provider's translations: libvirt's XML, states and errors into
thinvisor's records and errors (no libvirtd here; errors come from libvirt's in-process
test driver where libvirt can make them)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from thinvisor.errors import (
    CredentialsRefused,
    InvalidState,
    NotFound,
    ProviderError,
    Unreachable,
)
from thinvisor.providers import _libvirt_xml as lx
from thinvisor.providers._libvirt_host import CpuMeter, Host
from thinvisor.providers.base import Connection, CreateVm, PowerState
from thinvisor.providers.libvirt import LibvirtProvider, translate

DOMAIN = """
<domain type='qemu'>
  <name>web1</name>
  <uuid>0b7c3e2e-8d4f-4c43-9a57-2f6a3f0d1e01</uuid>
  <memory unit='GiB'>2</memory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <nvram template='/usr/share/OVMF/VARS.fd'>/var/lib/libvirt/qemu/nvram/web1.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='fast' volume='web1-data'/><target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/debian.iso'/><target dev='sda' bus='sata'/><readonly/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/shared/quorum.raw'/><target dev='vdc' bus='virtio'/><shareable/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/><source network='default' bridge='virbr0'/>
    </interface>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cd'/><source bridge='br0'/></interface>
    <interface type='bridge'><source bridge='br0'/></interface>
    <interface type='user'/>
    <graphics type='vnc' port='5901' autoport='yes' listen='0.0.0.0'>
      <listen type='address' address='0.0.0.0'/>
    </graphics>
    <serial type='tcp'>
      <source mode='bind' host='0.0.0.0' service='4555'/><protocol type='telnet'/>
    </serial>
  </devices>
</domain>
"""

CAPABILITIES = """
<capabilities>
  <host><cpu><arch>x86_64</arch></cpu></host>
  <guest><os_type>hvm</os_type>
    <arch name='i686'><domain type='qemu'/></arch>
  </guest>
  <guest><os_type>hvm</os_type>
    <arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch>
  </guest>
</capabilities>
"""


@pytest.fixture
def domain() -> ET.Element:
    return ET.fromstring(DOMAIN)


def test_size_and_cpus(domain: ET.Element) -> None:
    assert lx.memory_mib(domain) == 2048
    assert lx.memory_mib(ET.fromstring("<domain><memory>98304</memory></domain>")) == 96
    assert lx.vcpus(domain) == 2
    assert lx.vcpus(ET.fromstring("<domain><vcpu>3</vcpu></domain>")) == 3


def test_disks_own_and_shared(domain: ET.Element) -> None:
    assert [d.target for d in lx.disks(domain)] == ["vda", "vdb", "sda", "vdc"]
    own = lx.own_disks(domain)
    assert [(d.target, d.path, d.pool, d.volume) for d in own] == [
        ("vda", "/var/lib/libvirt/images/web1.qcow2", None, None),
        ("vdb", None, "fast", "web1-data"),
    ]


def test_networks_and_datastores(domain: ET.Element) -> None:
    assert lx.nic_networks(domain) == (("network", "default"), ("bridge", "br0"))
    assert lx.bridges(domain) == {"br0"}
    targets = {"/var/lib/libvirt/images": "default", "/srv/iso": "isos"}
    assert lx.pool_datastores(domain, targets) == ("default", "fast", "isos")
    pool = ET.fromstring("<pool><target><path>/var/lib/libvirt/images/</path></target></pool>")
    assert lx.pool_target(pool) == "/var/lib/libvirt/images"


@pytest.mark.parametrize(
    ("state", "saved", "expected"),
    [
        (libvirt.VIR_DOMAIN_RUNNING, False, PowerState.RUNNING),
        (libvirt.VIR_DOMAIN_BLOCKED, False, PowerState.RUNNING),
        (libvirt.VIR_DOMAIN_SHUTDOWN, False, PowerState.RUNNING),
        (libvirt.VIR_DOMAIN_PAUSED, False, PowerState.PAUSED),
        (libvirt.VIR_DOMAIN_SHUTOFF, False, PowerState.STOPPED),
        (libvirt.VIR_DOMAIN_SHUTOFF, True, PowerState.SUSPENDED),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, False, PowerState.SUSPENDED),
        (libvirt.VIR_DOMAIN_CRASHED, False, PowerState.UNKNOWN),
        (libvirt.VIR_DOMAIN_NOSTATE, False, PowerState.UNKNOWN),
    ],
)
def test_power_states(state: int, saved: bool, expected: PowerState) -> None:
    assert lx.power_state(state, saved) == expected


def test_consoles(domain: ET.Element) -> None:
    assert lx.vnc_address(domain, "kvm1.example.org") == ("kvm1.example.org", 5901)
    assert lx.vnc_address(domain, None) == ("127.0.0.1", 5901)
    assert lx.serial_url(domain, "fe80::1") == "telnet://[fe80::1]:4555"
    stopped = ET.fromstring("<domain><devices><graphics type='vnc' port='-1'/></devices></domain>")
    assert lx.vnc_address(stopped, None) is None
    on_socket = ET.fromstring(
        "<domain><devices><graphics type='vnc' port='5900'><listen type='socket'"
        " socket='/run/vnc.sock'/></graphics><serial type='pty'/></devices></domain>"
    )
    assert lx.vnc_address(on_socket, None) is None
    assert lx.serial_url(on_socket, None) is None


def test_virt_type_follows_the_host() -> None:
    assert lx.virt_type(CAPABILITIES, []) == ("kvm", "x86_64")
    assert lx.virt_type(CAPABILITIES, ["qemu", "qemu", "kvm", "lxc"]) == ("qemu", "x86_64")
    assert lx.virt_type(CAPABILITIES, ["lxc", "lxc"]) == ("kvm", "x86_64")
    none = CAPABILITIES.replace("<os_type>hvm</os_type>", "<os_type>exe</os_type>")
    with pytest.raises(ProviderError, match="no full virtualization for x86_64"):
        lx.virt_type(none, [])


def test_new_domain() -> None:
    spec = CreateVm("db & co", cpus=2, memory_mib=512, disk_mib=8, network="lan")
    root = ET.fromstring(
        lx.new_domain_xml(spec, "qemu", "x86_64", "/p/db.qcow2", ("bridge", "br0"))
    )
    assert root.get("type") == "qemu" and root.findtext("name") == "db & co"
    assert (lx.memory_mib(root), lx.vcpus(root)) == (512, 2)
    assert root.find("features/acpi") is not None
    assert [d.path for d in lx.own_disks(root)] == ["/p/db.qcow2"]
    assert lx.nic_networks(root) == (("bridge", "br0"),)
    assert root.find("devices/graphics[@type='vnc']") is not None
    bare = ET.fromstring(lx.new_domain_xml(CreateVm("x"), "kvm", "aarch64", None, None))
    assert not lx.disks(bare) and not lx.nic_networks(bare)


def test_clone_definition() -> None:
    xml = lx.clone_xml(DOMAIN, "web2", {"vda": "/p/web2.qcow2", "vdb": "/fast/web2-data"})
    root = ET.fromstring(xml)
    assert root.findtext("name") == "web2"
    assert root.find("uuid") is None and not root.findall("devices/interface/mac")
    nvram = root.find("os/nvram")
    assert nvram is not None and not nvram.text and nvram.get("template")
    assert [d.path for d in lx.disks(root)] == [
        "/p/web2.qcow2",
        "/fast/web2-data",
        "/srv/iso/debian.iso",
        "/srv/shared/quorum.raw",
    ]
    assert lx.clone_volume_name("web1-data", "web1", "web2") == "web2-data"
    assert lx.clone_volume_name("disk0.qcow2", "web1", "web2") == "web2-disk0.qcow2"


def test_snapshot_record() -> None:
    xml = (
        "<domainsnapshot><name>before</name><state>running</state>"
        "<parent><name>base</name></parent><creationTime>1700000000</creationTime>"
        "<memory snapshot='internal'/></domainsnapshot>"
    )
    snap = lx.snapshot_record(xml, current=True)
    assert (snap.id, snap.name, snap.parent, snap.current, snap.memory) == (
        "before",
        "before",
        "base",
        True,
        True,
    )
    assert snap.created == "2023-11-14T22:13:20+00:00"
    disk_only = lx.snapshot_record("<domainsnapshot><name>a</name></domainsnapshot>", False)
    assert not disk_only.memory and disk_only.parent is None and disk_only.created is None
    assert ET.fromstring(lx.snapshot_xml("a<b")).findtext("name") == "a<b"


def test_event_names() -> None:
    stopped = lx.event_name(
        libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED
    )
    assert stopped == "stopped.destroyed"
    assert lx.event_message("web1", stopped) == "domain web1 stopped (destroyed)"
    assert lx.event_name(99, 0) == "event99"
    assert lx.event_message("web1", "defined") == "domain web1 defined"
    assert lx.version(9_000_000) == "9.0.0" and lx.version(7_002_022) == "7.2.22"


@pytest.fixture
def test_driver() -> Iterator[object]:
    """libvirt's in-process test driver: real libvirt errors without a daemon."""
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def _error_of(call: object, *args: object) -> libvirt.libvirtError:
    with pytest.raises(libvirt.libvirtError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


def test_errors_from_libvirt(test_driver: libvirt.virConnect) -> None:
    missing = _error_of(test_driver.lookupByName, "nope")
    error = translate(missing, "test:///default", "nope", "start")
    assert isinstance(error, NotFound)
    assert str(error).startswith("test:///default: domain 'nope': Domain not found")
    running = test_driver.lookupByName("test")  # the test driver's domain runs
    invalid = _error_of(test_driver.createXML, running.XMLDesc(0), 0)
    error = translate(invalid, "test:///default", "test", "start")
    assert isinstance(error, InvalidState) and (error.vm, error.action) == ("test", "start")
    assert "already active" in str(error)
    unsupported = _error_of(running.pMWakeup, 0)
    error = translate(unsupported, "test:///default", "test", "resume")
    assert type(error) is ProviderError and "virDomainPMWakeup" in str(error)
    refused = _error_of(libvirt.open, "qemu+tcp://127.0.0.1:9/system")
    error = translate(refused, "qemu+tcp://127.0.0.1:9/system", connecting=True)
    assert isinstance(error, Unreachable) and "cannot connect" in str(error)
    assert "\n" not in str(error)


def test_authentication_failure_is_refused_credentials() -> None:
    exc = libvirt.libvirtError("authentication failed")
    exc.err = (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_FROM_AUTH, "authentication failed: x")
    error = translate(exc, "qemu+tls://kvm1/system", connecting=True)
    assert isinstance(error, CredentialsRefused)
    assert str(error) == "qemu+tls://kvm1/system: cannot connect: authentication failed: x"


def test_credentials_answer_libvirts_questions() -> None:
    provider = LibvirtProvider(Connection("qemu+tls://kvm1/system", "admin", "s3cret"))
    asked: list[list[object]] = [
        [libvirt.VIR_CRED_AUTHNAME, "user", "", "", None],
        [libvirt.VIR_CRED_PASSPHRASE, "password", "", "", None],
    ]
    assert provider._answer(asked, None) == 0
    assert [a[4] for a in asked] == ["admin", "s3cret"]
    assert provider._answer([[libvirt.VIR_CRED_ECHOPROMPT, "?", "", "", None]], None) == -1


def test_the_cpu_load_is_the_busy_share_between_two_readings() -> None:
    meter = CpuMeter()
    assert meter.update({"kernel": 100, "user": 100, "idle": 800, "iowait": 0}) is None
    # 150 ns busy of 400 ns: iowait counts as not busy.
    later = {"kernel": 150, "user": 200, "idle": 950, "iowait": 100}
    assert meter.update(later) == pytest.approx(150 / 400)
    assert meter.update(later) is None  # no time passed
    assert meter.update({"kernel": 1, "user": 1, "idle": 1}) is None  # the host restarted
    assert meter.update({"kernel": 2, "user": 1, "idle": 2}) == 0.5


def test_cpu_times_of_a_host(test_driver: libvirt.virConnect) -> None:
    times = Host(test_driver, "test:///default").cpu_times()
    assert times is not None and {"kernel", "user", "idle"} <= set(times)
