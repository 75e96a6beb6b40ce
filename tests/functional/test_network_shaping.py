"""NIC traffic shaping for real (tc over netlink), each test inside a network namespace of its own.

Every test body (a ``_body_*`` function) runs in a child process started with
``unshare --net``, so nothing touches the host's own network; afterwards the test checks
that the root namespace has exactly the links it had before. The tc configuration is read
back with the ``tc`` binary, independently of the code under test.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from thinvisor.errors import AlreadyExists, BackendError, InvalidArgument, NotFound
from thinvisor.model.vm import Bandwidth, NicShaping
from thinvisor.network.shaping import (
    apply_shaping,
    delete_ifb,
    ifb_name,
    shaping_of,
    stale_ifbs,
)

pytestmark = pytest.mark.functional

ROOT = Path(__file__).resolve().parents[2]
TAP = "tv0123456789ab"
IFB = "tvf0123456789ab"
BOTH = NicShaping(
    inbound=Bandwidth(average_kbps=1000, peak_kbps=2000, burst_kib=64),
    outbound=Bandwidth(average_kbps=500, burst_kib=32),
)


def _root_links() -> list[str]:
    with IPRoute() as ip:  # read-only in the root namespace
        return sorted(str(link.get("ifname")) for link in ip.get_links())


def _in_netns(body: str) -> None:
    before = _root_links()
    code = f"import {__name__} as m; m.{body}()"
    argv = ["unshare", "--net", "--", sys.executable, "-c", code]
    proc = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert _root_links() == before, "the root namespace's links changed"
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- helpers used inside the namespace ------------------------------------------------


def _links() -> dict[str, Any]:
    with IPRoute() as ip:
        return {str(link.get("ifname")): link for link in ip.get_links()}


def _add_tap(name: str = TAP) -> None:
    """A persistent TAP as thinvisor makes them (no packet information header)."""
    ifr = {"no_pi": True, "one_queue": False, "vnet_hdr": False, "multi_queue": False}
    with IPRoute() as ip:
        ip.link("add", ifname=name, kind="tuntap", mode="tap", uid=0, gid=0, ifr=ifr)
        ip.link("set", index=ip.link_lookup(ifname=name)[0], state="up")


def _tc(*args: str) -> str:
    return subprocess.run(["tc", *args], check=True, capture_output=True, text=True).stdout


def _qdiscs(dev: str) -> list[dict[str, Any]]:
    """The qdiscs tc shows for ``dev``, without the kernel's defaults (handle 0:)."""
    qdiscs: list[dict[str, Any]] = json.loads(_tc("-j", "qdisc", "show", "dev", dev))
    return [q for q in qdiscs if q["handle"] != "0:"]


def _htb_class(dev: str) -> str:
    """tc's line for class 1:1 of ``dev`` (tc 6.1 prints htb classes only as text)."""
    lines = [line for line in _tc("class", "show", "dev", dev).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("class htb 1:1 root "), lines[0]
    return lines[0]


def _redirects(dev: str) -> list[tuple[str, str, str]]:
    """(direction, action, device) of every mirred action on ``dev``'s ingress."""
    found = []
    for flt in json.loads(_tc("-j", "filter", "show", "dev", dev, "ingress")):
        assert flt["protocol"] == "all"
        for act in flt.get("options", {}).get("actions", []):
            assert flt["options"]["match"] == {"value": "0", "mask": "0", "offmask": "", "off": 0}
            found.append((act["direction"], act["mirred_action"], act["to_dev"]))
    return found


def _assert_unshaped(tap: str = TAP) -> None:
    assert _qdiscs(tap) == []
    assert _tc("class", "show", "dev", tap).strip() == ""
    assert ifb_name(tap) not in _links()
    assert shaping_of(tap) is None


def _assert_shaped_like_both() -> None:
    root, ingress = _qdiscs(TAP)
    assert (root["kind"], root["handle"], root.get("root")) == ("htb", "1:", True)
    assert root["options"]["default"] == "0x1"
    assert (ingress["kind"], ingress["handle"]) == ("ingress", "ffff:")
    line = _htb_class(TAP)
    assert " rate 1Mbit ceil 2Mbit burst 64Kb " in line, line
    assert _redirects(TAP) == [("egress", "redirect", IFB)]
    ifb = _links()[IFB]
    assert ifb.get(("linkinfo", "kind")) == "ifb"
    assert ifb.get("flags") & 1 == 1  # up
    assert ifb.get("mtu") == _links()[TAP].get("mtu")
    assert ifb.get("txqlen") == 1000
    (ifb_root,) = _qdiscs(IFB)
    assert (ifb_root["kind"], ifb_root["handle"]) == ("htb", "1:")
    line = _htb_class(IFB)
    assert " rate 500Kbit ceil 500Kbit burst 32Kb cburst 32Kb" in line, line


# -- bodies (run in a fresh network namespace) ----------------------------------------


def _body_shapes_both_directions() -> None:
    _add_tap()
    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname=TAP)[0], mtu=9000)  # the IFB follows
    _assert_unshaped()
    apply_shaping(TAP, BOTH)
    _assert_shaped_like_both()
    assert shaping_of(TAP) == BOTH
    filters = _tc("filter", "show", "dev", TAP, "ingress")
    apply_shaping(TAP, BOTH)  # idempotent: the same, and the redirect untouched
    _assert_shaped_like_both()
    assert _tc("filter", "show", "dev", TAP, "ingress") == filters
    assert shaping_of(TAP) == BOTH


ROUND_TRIPS = [
    Bandwidth(average_kbps=1000),
    Bandwidth(average_kbps=1000, peak_kbps=2000, burst_kib=64),
    Bandwidth(average_kbps=8, burst_kib=1),
    Bandwidth(average_kbps=8, peak_kbps=100_000_000, burst_kib=268),  # the largest bucket
    Bandwidth(average_kbps=100_000, burst_kib=128),
    Bandwidth(average_kbps=1_000_000, peak_kbps=1_500_000),
    Bandwidth(average_kbps=10_000_000, burst_kib=1024),
    Bandwidth(average_kbps=40_000_000, peak_kbps=100_000_000, burst_kib=4096),
    Bandwidth(average_kbps=100_000_000, burst_kib=1),
    Bandwidth(average_kbps=100_000_000, burst_kib=1_048_576),
    Bandwidth(average_kbps=12_345, peak_kbps=54_321, burst_kib=777),
]


def _body_round_trips() -> None:
    _add_tap()
    for bw in ROUND_TRIPS:
        for shaping in (NicShaping(inbound=bw), NicShaping(outbound=bw)):
            apply_shaping(TAP, shaping)
            assert shaping_of(TAP) == shaping
    both = NicShaping(inbound=ROUND_TRIPS[6], outbound=ROUND_TRIPS[9])
    apply_shaping(TAP, both)
    assert shaping_of(TAP) == both
    # What shapes the same reads back the same way: a peak at the average, no peak.
    apply_shaping(TAP, NicShaping(inbound=Bandwidth(average_kbps=1000, peak_kbps=1000)))
    assert shaping_of(TAP) == NicShaping(inbound=Bandwidth(average_kbps=1000))


def _body_replace_and_clear() -> None:
    _add_tap()
    apply_shaping(TAP, BOTH)
    smaller = NicShaping(inbound=Bandwidth(average_kbps=64, burst_kib=8))
    apply_shaping(TAP, smaller)
    (root,) = _qdiscs(TAP)
    assert root["kind"] == "htb"
    assert " rate 64Kbit ceil 64Kbit burst 8Kb " in _htb_class(TAP)
    assert IFB not in _links()
    assert shaping_of(TAP) == smaller
    outbound_only = NicShaping(outbound=Bandwidth(average_kbps=2000, peak_kbps=3000))
    apply_shaping(TAP, outbound_only)
    (ingress,) = _qdiscs(TAP)
    assert ingress["kind"] == "ingress"
    assert _redirects(TAP) == [("egress", "redirect", IFB)]
    assert " rate 2Mbit ceil 3Mbit " in _htb_class(IFB)
    assert shaping_of(TAP) == outbound_only
    apply_shaping(TAP, BOTH)
    _assert_shaped_like_both()
    apply_shaping(TAP, None)
    _assert_unshaped()
    apply_shaping(TAP, None)  # idempotent
    apply_shaping(TAP, BOTH)
    apply_shaping(TAP, NicShaping())  # no direction: the same as None
    _assert_unshaped()
    # Foreign tc configuration is replaced too: the TAP's shaping is exactly the spec.
    tbf = ["tbf", "rate", "1mbit", "burst", "8k", "latency", "50ms"]
    _tc("qdisc", "add", "dev", TAP, "root", "handle", "5:", *tbf)
    apply_shaping(TAP, smaller)
    assert shaping_of(TAP) == smaller
    _tc("qdisc", "del", "dev", TAP, "root")
    _tc("qdisc", "add", "dev", TAP, "root", "handle", "1:", "htb", "default", "7")
    assert shaping_of(TAP) is None  # not thinvisor's htb
    apply_shaping(TAP, smaller)
    assert shaping_of(TAP) == smaller
    _tc("class", "change", "dev", TAP, "classid", "1:1", "htb", "rate", "1kbit")
    with pytest.raises(BackendError, match="not thinvisor's"):
        shaping_of(TAP)  # below what the model allows: no Bandwidth says it
    apply_shaping(TAP, smaller)
    assert shaping_of(TAP) == smaller
    # A TAP that is gone has nothing to shape; its IFB goes.
    apply_shaping(TAP, BOTH)
    with IPRoute() as ip:
        ip.link("del", ifname=TAP)
    assert IFB in _links()
    apply_shaping(TAP, None)
    assert set(_links()) == {"lo"}


def _body_failure_midway_leaves_nothing() -> None:
    from thinvisor.network import shaping

    def broken_redirect(ip: Any, index: int, ifb_index: int) -> None:
        ip.tc("add", "ingress", index, handle=0xFFFF0000)
        raise NetlinkError(errno.EIO, "injected failure")

    _add_tap()
    real_redirect, real_class = shaping._redirect, shaping._replace_class
    shaping._redirect = broken_redirect
    with pytest.raises(BackendError, match="injected") as info:
        apply_shaping(TAP, BOTH)  # the last step fails: all before it is undone
    assert isinstance(info.value.__cause__, NetlinkError)
    _assert_unshaped()
    assert set(_links()) == {"lo", TAP}
    shaping._redirect = real_redirect

    calls: list[int] = []

    def class_fails_second_time(ip: Any, index: int, cls: Any) -> None:
        calls.append(index)
        if len(calls) == 2:  # the IFB's class, after the TAP's was changed
            raise NetlinkError(errno.EIO, "injected failure")
        real_class(ip, index, cls)

    apply_shaping(TAP, BOTH)
    shaping._replace_class = class_fails_second_time
    faster = NicShaping(inbound=Bandwidth(average_kbps=9000), outbound=Bandwidth(average_kbps=9000))
    with pytest.raises(BackendError, match="injected"):
        apply_shaping(TAP, faster)  # a failed change leaves no shaping, not the old one
    assert len(calls) == 2
    _assert_unshaped()
    assert set(_links()) == {"lo", TAP}


def _body_refusals() -> None:
    with pytest.raises(NotFound):
        apply_shaping(TAP, BOTH)
    with pytest.raises(NotFound):
        shaping_of(TAP)
    apply_shaping(TAP, None)  # nothing to clear
    _add_tap()
    with IPRoute() as ip:
        ip.link("add", ifname="tvveth0", kind="veth", peer=IFB)  # takes the IFB's name
    with pytest.raises(InvalidArgument, match="not a TAP"):
        apply_shaping("tvveth0", BOTH)
    with pytest.raises(AlreadyExists, match="not an IFB"):
        apply_shaping(TAP, BOTH)  # fails after the inbound htb was set up
    _assert_unshaped_but_for(IFB)
    apply_shaping(TAP, None)  # leaves the foreign interface alone
    assert IFB in _links()
    with pytest.raises(InvalidArgument, match="not an IFB"):
        delete_ifb(IFB)
    with IPRoute() as ip:
        ip.link("del", ifname="tvveth0")
    apply_shaping(TAP, BOTH)
    too_big = NicShaping(inbound=Bandwidth(average_kbps=1000, burst_kib=1_048_576))
    with pytest.raises(InvalidArgument) as info:
        apply_shaping(TAP, too_big)
    assert info.value.field == "shaping.inbound.burst_kib"
    assert shaping_of(TAP) == BOTH  # refused before anything changed
    with pytest.raises(InvalidArgument):
        apply_shaping("eth0", None)  # not a TAP name: nothing is looked at


def _assert_unshaped_but_for(foreign: str) -> None:
    assert _qdiscs(TAP) == []
    assert _links()[foreign].get(("linkinfo", "kind")) == "veth"
    assert shaping_of(TAP) is None


def _body_stale_ifbs() -> None:
    other = "tvba9876543210"
    for tap in (TAP, other):
        _add_tap(tap)
        apply_shaping(tap, BOTH)
    apply_shaping("tv" + "1" * 12, None)  # no TAP, no IFB: nothing to do
    assert stale_ifbs({TAP, other}) == []
    with IPRoute() as ip:
        ip.link("del", ifname=other)  # as after a crash: the TAP went, its IFB stayed
    assert stale_ifbs({TAP}) == [ifb_name(other)]
    assert stale_ifbs(set()) == sorted([IFB, ifb_name(other)])
    assert delete_ifb(ifb_name(other))
    assert not delete_ifb(ifb_name(other))
    assert stale_ifbs({TAP}) == []
    assert shaping_of(TAP) == BOTH


# -- traffic: the limits hold packets back ----------------------------------------------

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_FRAMES = 40
_FRAME_BYTES = 1000


def _attach(tap: str) -> int:
    """Open the TAP as QEMU would: the carrier comes up, frames can be read and written."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", tap.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


def _class_stats(dev: str) -> tuple[int, int]:
    """(packets sent, packets waiting) of class 1:1."""
    with IPRoute() as ip:
        (cls,) = list(ip.get_classes(ip.link_lookup(ifname=dev)[0]))
        sent = cls.get(("TCA_STATS2", "TCA_STATS_BASIC"))["packets"]
        queue = cls.get(("TCA_STATS2", "TCA_STATS_QUEUE"))
        return int(sent), int(queue["qlen"])


def _assert_held_back(dev: str) -> None:
    sent, waiting = _class_stats(dev)
    assert sent + waiting == _FRAMES, (sent, waiting)
    assert sent >= 1  # the bucket lets the first frames pass at once
    assert waiting > _FRAMES // 2, (sent, waiting)


def _body_limits_hold_traffic_back() -> None:
    # 8 kbit/s with an 8 KiB bucket: 40 frames of 1000 bytes need over 30 s, so right
    # after sending them most must still be waiting, whatever the machine's speed.
    slow = Bandwidth(average_kbps=8, burst_kib=8)
    _add_tap()
    # No IPv6 chatter (router solicitations, MLD) in the counts when the carrier comes up.
    Path(f"/proc/sys/net/ipv6/conf/{TAP}/disable_ipv6").write_text("1\n")
    apply_shaping(TAP, NicShaping(inbound=slow, outbound=slow))
    fd = _attach(TAP)
    mac = bytes.fromhex("020000000002")
    # To the guest: datagrams routed out of the TAP, to a neighbour that never answers.
    subprocess.run(["ip", "addr", "add", "10.99.0.1/24", "dev", TAP], check=True)
    neigh = ["ip", "neigh", "replace", "10.99.0.2", "lladdr", mac.hex(":"), "dev", TAP]
    subprocess.run(neigh, check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(_FRAMES):
            sock.sendto(b"x" * (_FRAME_BYTES - 42), ("10.99.0.2", 9))
    _assert_held_back(TAP)
    # From the guest: frames written to the TAP go through the IFB's htb first.
    frame = b"\xff" * 6 + mac + b"\x88\xb5" + b"\0" * (_FRAME_BYTES - 14)
    for _ in range(_FRAMES):
        os.write(fd, frame)
    _assert_held_back(IFB)
    apply_shaping(TAP, None)  # while in use
    _assert_unshaped()
    os.close(fd)


# -- the tests -------------------------------------------------------------------------


def test_shapes_both_directions() -> None:
    _in_netns("_body_shapes_both_directions")


def test_shaping_round_trips() -> None:
    _in_netns("_body_round_trips")


def test_replace_and_clear() -> None:
    _in_netns("_body_replace_and_clear")


def test_failure_midway_leaves_nothing() -> None:
    _in_netns("_body_failure_midway_leaves_nothing")


def test_refusals() -> None:
    _in_netns("_body_refusals")


def test_stale_ifbs() -> None:
    _in_netns("_body_stale_ifbs")


def test_limits_hold_traffic_back() -> None:
    _in_netns("_body_limits_hold_traffic_back")
