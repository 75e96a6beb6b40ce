"""nftables VLAN isolation and NAT, and dnsmasq, for real, inside network namespaces.

Every test body (a ``_body_*`` function) runs in a child process started with
``unshare --net``: the "host" namespace. Guests are further namespaces, each held open
by a ``sleep`` started with ``unshare --net`` and entered with ``nsenter``; one end of a
veth pair is a port of the host's bridge, the other end the guest's ``eth0``. Busybox
(Debian's busybox-static) plays the guests' ``ping`` and DHCP client.

dnsmasq daemonizes out of the body's process tree, so the bodies stop what they started
and the tests then look for any process still naming the test's directory, end it by
its pid, and fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from thinvisor.errors import BackendError
from thinvisor.network import nftables
from thinvisor.network.dnsmasq import Dnsmasq

pytestmark = pytest.mark.functional

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def _root_links() -> list[str]:
    with IPRoute() as ip:  # read-only in the root namespace
        return sorted(str(link.get("ifname")) for link in ip.get_links())


def _processes_naming(text: str) -> list[int]:
    """The pids of the processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
    return found


def _kill_processes_naming(text: str) -> list[int]:
    pids = _processes_naming(text)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _in_netns(body: str, *args: str) -> None:
    assert Path(BUSYBOX).exists(), "make deps installs busybox-static (ping, udhcpc)"
    before = _root_links()
    code = f"import sys, {__name__} as m; m.{body}(*sys.argv[1:])"
    argv = ["unshare", "--net", "--", sys.executable, "-c", code, *args]
    proc = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert _root_links() == before, "the root namespace's links changed"
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- helpers used inside the host namespace ------------------------------------------


class Guest:
    """A network namespace with one NIC, ``eth0``, whose peer is a port of a bridge."""

    def __init__(self, port: str, bridge: str, address: str | None) -> None:
        self.port = port
        self._sleep = subprocess.Popen(["unshare", "--net", "--", "sleep", "170"])
        self.pid = self._sleep.pid  # unshare execs sleep
        try:
            self._plug(bridge, address)
        except BaseException:
            self.close()
            raise

    def _plug(self, bridge: str, address: str | None) -> None:
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.pid}/ns/net") == own:
            assert time.monotonic() < deadline, "unshare did not make a namespace"
            time.sleep(0.01)
        with IPRoute() as ip:
            peer = {"ifname": "eth0", "net_ns_pid": self.pid}
            ip.link("add", ifname=self.port, kind="veth", peer=peer)
            bridge_index = ip.link_lookup(ifname=bridge)[0]
            index = ip.link_lookup(ifname=self.port)[0]
            ip.link("set", index=index, master=bridge_index, state="up")
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "link", "set", "eth0", "up")
        if address is not None:
            self.run("ip", "address", "add", address, "dev", "eth0")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        enter = ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--"]
        proc = subprocess.run(
            [*enter, *argv], check=False, capture_output=True, text=True, timeout=60
        )
        if check:
            assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
        return proc

    def mac(self) -> str:
        # Not /sys/class/net: sysfs shows the namespace of whoever mounted it.
        (link,) = json.loads(self.run("ip", "-j", "link", "show", "eth0").stdout)
        return str(link["address"])

    def reaches(self, ip: str) -> bool:
        """Whether ``ip`` answers a ping; tried three times before saying no."""
        for _ in range(3):
            if self.run(BUSYBOX, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0:
                return True
        return False

    def cannot_reach(self, ip: str) -> bool:
        """Whether ``ip`` stays silent to one ping (one second)."""
        return self.run(BUSYBOX, "ping", "-c", "1", "-W", "1", ip, check=False).returncode != 0

    def close(self) -> None:
        self._sleep.kill()
        self._sleep.wait()


@contextlib.contextmanager
def _guests(bridge: str, *specs: tuple[str, str | None]) -> Iterator[list[Guest]]:
    guests: list[Guest] = []
    try:
        for port, address in specs:
            guests.append(Guest(port, bridge, address))
        yield guests
    finally:
        for guest in guests:
            guest.close()


def _bridge(name: str, address: str | None = None) -> None:
    with IPRoute() as ip:
        ip.link("add", ifname=name, kind="bridge")
        index = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=index, state="up")
        if address is not None:
            iface = IPv4Interface(address)
            ip.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def _nft(*args: str) -> str:
    return subprocess.run(["nft", *args], check=True, capture_output=True, text=True).stdout


# -- bodies (run in a fresh network namespace) ----------------------------------------

HOST_IP = "10.88.0.254"


def _body_vlan_isolation() -> None:
    _bridge("tvbr-iso", f"{HOST_IP}/24")
    specs = [("tva", "10.88.0.1/24"), ("tvb", "10.88.0.2/24"), ("tvc", "10.88.0.3/24")]
    with _guests("tvbr-iso", *specs) as (a, b, c):
        assert a.reaches("10.88.0.2") and a.reaches("10.88.0.3") and c.reaches(HOST_IP)

        nftables.apply_vlan_isolation("iso", {0: [], 10: ["tva", "tvb"], 20: ["tvc"]})
        assert nftables.thinvisor_tables() == [("bridge", "thinvisor-vlan-iso")]
        assert a.reaches("10.88.0.2") and b.reaches("10.88.0.1")
        assert c.cannot_reach("10.88.0.1") and c.cannot_reach("10.88.0.2")
        assert a.cannot_reach("10.88.0.3")
        assert a.cannot_reach(HOST_IP) and c.cannot_reach(HOST_IP)

        # Replaced in one transaction: tvc moves to VLAN 10.
        nftables.apply_vlan_isolation("iso", {10: ["tva", "tvb", "tvc"]})
        assert c.reaches("10.88.0.1") and c.reaches("10.88.0.2")
        assert c.cannot_reach(HOST_IP)

        nftables.remove_vlan_isolation("iso")
        nftables.remove_vlan_isolation("iso")  # idempotent
        assert nftables.thinvisor_tables() == []
        assert a.reaches("10.88.0.3") and c.reaches("10.88.0.2") and b.reaches("10.88.0.1")
        assert a.reaches(HOST_IP) and c.reaches(HOST_IP)

        # Only native ports: no table at all, whether or not one existed.
        nftables.apply_vlan_isolation("iso", {10: ["tva"]})
        nftables.apply_vlan_isolation("iso", {0: ["tva", "tvb"], 4095: ["tvc"]})
        nftables.apply_vlan_isolation("iso", {0: ["tva"]})
        assert nftables.thinvisor_tables() == []


def _body_nat() -> None:
    # guest 10.0.5.2 -- tvbr-nat (10.0.5.1) host (10.77.0.1) -- (10.77.0.2) outside; the
    # outside knows no route back to 10.0.5.0/24, so only masqueraded pings get answers.
    _bridge("tvbr-nat", "10.0.5.1/24")
    _bridge("tvbr-out", "10.77.0.1/24")
    subnet = IPv4Network("10.0.5.0/24")
    with (
        _guests("tvbr-nat", ("tvg", "10.0.5.2/24")) as (guest,),
        _guests("tvbr-out", ("tvo", "10.77.0.2/24")) as (outside,),
    ):
        guest.run("ip", "route", "add", "default", "via", "10.0.5.1")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("0\n")

        nftables.apply_nat("nat", "tvbr-nat", subnet)
        nftables.apply_nat("nat", "tvbr-nat", subnet)  # replaced, not added twice
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        assert nftables.thinvisor_tables() == [("ip", "thinvisor-nat-nat")]
        table = _nft("list", "table", "ip", "thinvisor-nat-nat")
        assert table.count("masquerade") == 1
        assert "type nat hook postrouting priority srcnat" in table
        assert "ip saddr 10.0.5.0/24 ip daddr != 10.0.5.0/24 masquerade" in table
        assert (
            'oifname "tvbr-nat" ip daddr 10.0.5.0/24 ct state established,related accept' in table
        )
        assert guest.reaches("10.77.0.2")
        # The outside cannot open connections to the guest, even with a route.
        outside.run("ip", "route", "add", "10.0.5.0/24", "via", "10.77.0.1")
        assert outside.cannot_reach("10.0.5.2")
        outside.run("ip", "route", "del", "10.0.5.0/24", "via", "10.77.0.1")

        nftables.remove_nat("nat")
        nftables.remove_nat("nat")  # idempotent
        nftables.remove_table("ip", "thinvisor-nat-nat")
        assert nftables.thinvisor_tables() == []
        assert "thinvisor" not in _nft("list", "tables")
        assert guest.cannot_reach("10.77.0.2")


def _body_nft_errors() -> None:
    with pytest.raises(BackendError, match="Error: syntax error"):
        nftables._run(["-f", "-"], "table ip thinvisor-x { chain c { nonsense } }", "test")
    assert nftables.thinvisor_tables() == []


def _body_dnsmasq(tmp: str) -> None:
    run_dir, state_dir = Path(tmp) / "run", Path(tmp) / "state"
    address = IPv4Interface("10.0.6.1/24")
    pool = (IPv4Address("10.0.6.10"), IPv4Address("10.0.6.20"))
    _bridge("tvbr-dq", str(address))
    d = Dnsmasq(run_dir, state_dir)
    try:
        with _guests("tvbr-dq", ("tvd", None)) as (guest,):
            _check_dnsmasq(d, guest, address, pool)
    finally:
        d.stop("dq")
        _kill_processes_naming(tmp)


def _check_dnsmasq(
    d: Dnsmasq, guest: Guest, address: IPv4Interface, pool: tuple[IPv4Address, IPv4Address]
) -> None:
    pid = d.ensure("dq", "tvbr-dq", address, pool)
    assert d.running("dq") == pid
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Uid:\t0\t" not in status, "dnsmasq kept root"
    # A new agent adopts the running instance.
    again = Dnsmasq(d.run_dir.parent, d.lease_dir.parent)
    assert again.ensure("dq", "tvbr-dq", address, pool) == pid
    assert again.instances() == {"dq": pid}

    dhcp = ["udhcpc", "-i", "eth0", "-n", "-q", "-t", "10", "-T", "1", "-s", "/bin/true"]
    out = guest.run(BUSYBOX, *dhcp, "-x", "hostname:guest1")
    assert "obtained from 10.0.6.1" in out.stdout + out.stderr
    (lease,) = again.leases("dq")
    assert (lease.mac, lease.hostname) == (guest.mac(), "guest1"), lease
    assert pool[0] <= lease.ip <= pool[1]
    assert lease.expiry > time.time()
    # DNS: the guest's name, learnt over DHCP, answered by dnsmasq itself.
    guest.run("ip", "address", "add", f"{lease.ip}/24", "dev", "eth0")
    answer = guest.run(BUSYBOX, "nslookup", "guest1", "10.0.6.1").stdout
    assert str(lease.ip) in answer

    # Another configuration restarts it; a killed instance is noticed and started again.
    dns_only = d.ensure("dq", "tvbr-dq", address, None)
    assert dns_only != pid and d.running("dq") == dns_only
    assert "dhcp-range" not in d.conf_file("dq").read_text()
    os.kill(dns_only, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while d.running("dq") is not None:
        assert time.monotonic() < deadline, "a killed dnsmasq still counts as running"
        time.sleep(0.02)
    assert d.instances() == {}
    restarted = d.ensure("dq", "tvbr-dq", address, pool)
    assert restarted not in (pid, dns_only)

    assert d.stop("dq")
    assert not d.stop("dq")
    assert d.running("dq") is None and d.instances() == {}
    assert not d.conf_file("dq").exists() and not d.pid_file("dq").exists()
    assert [lease.mac for lease in d.leases("dq")] == [guest.mac()]  # leases are kept
    assert _processes_naming(str(d.run_dir)) == []


# -- the tests -------------------------------------------------------------------------


def test_vlan_isolation_between_port_groups() -> None:
    _in_netns("_body_vlan_isolation")


def test_nat_masquerades_guests() -> None:
    _in_netns("_body_nat")


def test_nft_errors_become_backend_errors() -> None:
    _in_netns("_body_nft_errors")


def test_dnsmasq_serves_dhcp_and_dns_and_is_adopted(tmp_path: Path) -> None:
    try:
        _in_netns("_body_dnsmasq", str(tmp_path))
    finally:
        strays = _kill_processes_naming(str(tmp_path))
    assert strays == [], f"processes left running: {strays}"
