"""Bridges and TAPs for real, each test inside a network namespace of its own.

Every test body (a ``_body_*`` function) runs in a child process started with
``unshare --net``, so nothing touches the host's own network; afterwards the test checks
that the root namespace has exactly the links it had before.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from thinvisor.errors import AlreadyExists, BackendError, Busy, InvalidArgument, NotFound
from thinvisor.network import (
    PortGroupSpec,
    PortVlan,
    SwitchSpec,
    bridge_ports,
    delete_switch,
    delete_tap,
    ensure_switch,
    list_taps,
    port_vlans,
    set_link,
    tap_name,
)
from thinvisor.network.netlink import attach_port, bridge_filters_vlans, tap_is_persistent
from thinvisor.network.tap import open_tap

pytestmark = pytest.mark.functional

ROOT = Path(__file__).resolve().parents[2]
UUID = "0b5f0c1e-8a5d-4c9e-9a1b-2f3c4d5e6f70"


def _root_links() -> list[str]:
    with IPRoute() as ip:  # read-only in the root namespace
        return sorted(str(link.get("ifname")) for link in ip.get_links())


def _run_in_netns(body: str) -> subprocess.CompletedProcess[str]:
    code = f"import {__name__} as m; m.{body}()"
    argv = ["unshare", "--net", "--", sys.executable, "-c", code]
    return subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _in_netns(body: str) -> None:
    before = _root_links()
    proc = _run_in_netns(body)
    assert _root_links() == before, "the root namespace's links changed"
    assert proc.returncode == 0, proc.stdout + proc.stderr


@functools.cache
def _vlan_filtering_supported() -> bool:
    return _run_in_netns("_body_probe_vlan_filtering").returncode == 0


# -- helpers used inside the namespace ------------------------------------------------


def _links() -> dict[str, Any]:
    with IPRoute() as ip:
        return {str(link.get("ifname")): link for link in ip.get_links()}


def _switch(**kw: Any) -> SwitchSpec:
    groups = [
        PortGroupSpec(name="untagged", vlan=0),
        PortGroupSpec(name="v10", vlan=10),
        PortGroupSpec(name="v20", vlan=20),
        PortGroupSpec(name="trunk", vlan=4095),
    ]
    data: dict[str, Any] = {"name": "lan", "mtu": 9000, "port_groups": groups, **kw}
    if not data.get("vlan_filtering", True):
        data["port_groups"] = groups[:1]
    return SwitchSpec(**data)


def _veth(a: str, b: str) -> None:
    with IPRoute() as ip:
        ip.link("add", ifname=a, kind="veth", peer=b)


# -- bodies (run in a fresh network namespace) ----------------------------------------


def _body_probe_vlan_filtering() -> None:
    assert ensure_switch(SwitchSpec(name="probe"))


def _tap(name: str, spec: SwitchSpec, group: str) -> int:
    """A TAP owned by the returned descriptor, joined to ``group`` as thinvisor does."""
    fd = open_tap(name)
    vlan = next(g.vlan for g in spec.port_groups if g.name == group)
    attach_port(name, spec, vlan)
    return fd


def _body_vlan_ports() -> None:
    spec = _switch()
    assert ensure_switch(spec)
    br = _links()["tvbr-lan"]
    assert br.get("mtu") == 9000
    assert br.get(("linkinfo", "data", "br_vlan_filtering")) == 1
    taps = {pg: tap_name(UUID, pg) for pg in ("untagged", "v10", "v20", "trunk")}
    fds = {pg: _tap(tap, spec, pg) for pg, tap in taps.items()}
    assert bridge_ports("tvbr-lan") == sorted(taps.values())
    assert port_vlans(taps["untagged"]) == [PortVlan(1, pvid=True, untagged=True)]
    assert port_vlans(taps["v10"]) == [PortVlan(10, pvid=True, untagged=True)]
    assert port_vlans(taps["v20"]) == [PortVlan(20, pvid=True, untagged=True)]
    trunk = port_vlans(taps["trunk"])
    assert [v.vid for v in trunk] == list(range(1, 4095))
    assert not any(v.pvid or v.untagged for v in trunk)
    with pytest.raises(Busy):
        delete_switch("tvbr-lan")
    assert bridge_ports("tvbr-lan") == sorted(taps.values())
    attach_port(taps["v10"], spec, 20)  # moved to another port group
    assert port_vlans(taps["v10"]) == [PortVlan(20, pvid=True, untagged=True)]
    for fd in fds.values():
        os.close(fd)
    assert delete_switch("tvbr-lan")
    assert set(_links()) == {"lo"}


def _body_vlan_filtering_unsupported() -> None:
    _veth("up0", "up0p")
    # Without kernel support the bridge is a plain one: port groups are kept apart by
    # thinvisor's nftables rules instead.
    assert not ensure_switch(_switch(uplink="up0"))
    # Again on the existing bridge, as at every agent start and dnsmasq restart.
    assert not ensure_switch(_switch(uplink="up0"))
    assert not bridge_filters_vlans("tvbr-lan")
    assert bridge_ports("tvbr-lan") == ["up0"]
    assert _links()["up0"].get("mtu") == 9000
    assert delete_switch("tvbr-lan")


def _body_plain_switch_and_taps() -> None:
    spec = _switch(vlan_filtering=False)
    assert not ensure_switch(spec)
    assert not ensure_switch(spec)  # idempotent
    tap = tap_name(UUID, "net0")
    fd = _tap(tap, spec, "untagged")
    attach_port(tap, spec, 0)  # idempotent
    link = _links()[tap]
    assert link.get("master") == _links()["tvbr-lan"]["index"]
    assert link.get("mtu") == 9000
    assert link.get(("linkinfo", "kind")) == "tun"
    data = link.get(("linkinfo", "data"))
    assert data.get("IFLA_TUN_TYPE") == 2  # tap
    assert data.get("IFLA_TUN_PERSIST") == 0  # it dies with its descriptor
    assert data.get("IFLA_TUN_VNET_HDR") == 1
    assert not tap_is_persistent(tap)
    assert list_taps() == [tap]
    assert port_vlans(tap) == []
    set_link(tap, up=False)
    assert _links()[tap].get("flags") & 1 == 0
    set_link(tap, up=True)
    assert _links()[tap].get("flags") & 1 == 1
    with pytest.raises(Busy):
        delete_switch("tvbr-lan")
    assert bridge_ports("tvbr-lan") == [tap]
    os.close(fd)  # as when QEMU exits: the kernel removes the TAP
    assert tap not in _links()
    assert not delete_tap(tap)
    assert delete_switch("tvbr-lan")
    assert not delete_switch("tvbr-lan")
    assert set(_links()) == {"lo"}


def _body_bad_taps_leave_nothing() -> None:
    spec = _switch(vlan_filtering=False)
    fd = open_tap("tvx")
    with pytest.raises(NotFound):
        attach_port("tvx", spec, 0)  # the bridge does not exist yet
    ensure_switch(spec)
    with pytest.raises(NotFound):
        attach_port("tvnone", spec, 0)
    with pytest.raises(InvalidArgument):
        open_tap("tv-name-too-long-x")
    with pytest.raises(AlreadyExists):
        open_tap("tvx")
    attach_port("tvx", spec, 0)
    with pytest.raises(InvalidArgument):
        delete_tap("tvbr-lan")
    assert delete_switch("tvbr-lan", force=True)  # the TAP is released, not deleted
    assert set(_links()) == {"lo", "tvx"}
    assert _links()["tvx"].get("master") is None
    os.close(fd)
    assert set(_links()) == {"lo"}


def _body_persistent_taps_are_found() -> None:
    with IPRoute() as ip:
        ip.link("add", ifname="tvleft", kind="tuntap", mode="tap")
    assert tap_is_persistent("tvleft")
    assert list_taps() == ["tvleft"]
    assert delete_tap("tvleft")


def _body_uplinks() -> None:
    with pytest.raises(InvalidArgument, match="no interface"):
        ensure_switch(_switch(vlan_filtering=False, uplink="nosuch0"))
    assert set(_links()) == {"lo"}
    _veth("up0", "up0p")
    lan = _switch(vlan_filtering=False, uplink="up0")
    ensure_switch(lan)
    links = _links()
    assert links["up0"].get("master") == links["tvbr-lan"]["index"]
    assert links["up0"].get("mtu") == 9000
    assert bridge_ports("tvbr-lan") == ["up0"]
    with pytest.raises(InvalidArgument, match="already a port of 'tvbr-lan'"):
        ensure_switch(SwitchSpec(name="other", uplink="up0", vlan_filtering=False))
    with pytest.raises(InvalidArgument, match="is a bridge"):
        ensure_switch(SwitchSpec(name="other", uplink="tvbr-lan", vlan_filtering=False))
    assert "tvbr-other" not in _links()
    assert delete_switch("tvbr-lan")  # no TAPs: the uplink is released
    assert _links()["up0"].get("master") is None
    assert set(_links()) == {"lo", "up0", "up0p"}


def _body_rollback_when_uplink_fails() -> None:
    from thinvisor.network import netlink

    def broken(ip: Any, spec: SwitchSpec, uplink: Any, bridge: int, filtering: bool) -> None:
        ip.link("set", index=uplink["index"], mtu=spec.mtu)
        raise BackendError("injected failure")

    _veth("up0", "up0p")
    netlink._attach_uplink = broken
    with pytest.raises(BackendError, match="injected"):
        ensure_switch(_switch(vlan_filtering=False, uplink="up0"))
    links = _links()
    assert set(links) == {"lo", "up0", "up0p"}
    assert links["up0"].get("mtu") == 1500


# -- the tests -------------------------------------------------------------------------


def test_vlan_ports() -> None:
    if not _vlan_filtering_supported():
        pytest.skip("this kernel's bridges have no VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")
    _in_netns("_body_vlan_ports")


def test_vlan_filtering_unsupported_gives_a_plain_bridge() -> None:
    if _vlan_filtering_supported():
        pytest.skip("this kernel's bridges do VLAN filtering")
    _in_netns("_body_vlan_filtering_unsupported")


def test_plain_switch_and_taps() -> None:
    _in_netns("_body_plain_switch_and_taps")


def test_bad_taps_leave_nothing() -> None:
    _in_netns("_body_bad_taps_leave_nothing")


def test_persistent_taps_are_found() -> None:
    _in_netns("_body_persistent_taps_are_found")


def test_uplinks() -> None:
    _in_netns("_body_uplinks")


def test_rollback_when_uplink_fails() -> None:
    _in_netns("_body_rollback_when_uplink_fails")
