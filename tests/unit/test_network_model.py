"""Switch and port group validation, the network store, TAP names. No netlink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidConfig, NotFound
from thinvisor.model.vm import validate
from thinvisor.network import (
    NetworkConfig,
    NetworkStore,
    PortGroupSpec,
    SwitchSpec,
    tap_name,
)


def _switch(**kw: Any) -> dict[str, Any]:
    return {"name": "lan", **kw}


def test_switch_defaults_and_derived_bridge() -> None:
    spec = validate(SwitchSpec, _switch())
    assert (spec.bridge, spec.mtu, spec.vlan_filtering, spec.uplink) == (
        "tvbr-lan",
        1500,
        True,
        None,
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_switch(name=""), "name"),
        (_switch(name="a/b"), "name"),
        (_switch(name="averyverylongname"), "spec"),  # tvbr-<name> exceeds 15 characters
        (_switch(bridge="br-0123456789abc"), "bridge"),  # 16 characters
        (_switch(bridge="br 0"), "bridge"),
        (_switch(mtu=67), "mtu"),
        (_switch(mtu=9001), "mtu"),
        (_switch(uplink="eth0/1"), "uplink"),
        (_switch(uplink="tvbr-lan"), "spec"),
        (_switch(colour="red"), "colour"),
        (_switch(port_groups=[{"name": "a", "vlan": -1}]), "port_groups.0.vlan"),
        (_switch(port_groups=[{"name": "a", "vlan": 4096}]), "port_groups.0.vlan"),
        (_switch(port_groups=[{"name": "a"}, {"name": "a", "vlan": 3}]), "spec"),
        (_switch(vlan_filtering=False, port_groups=[{"name": "a", "vlan": 3}]), "spec"),
    ],
)
def test_bad_switch_is_refused(data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(SwitchSpec, data)
    assert info.value.field == field


def test_long_switch_name_with_explicit_bridge() -> None:
    spec = validate(SwitchSpec, _switch(name="averyverylongname", bridge="br0"))
    assert spec.bridge_name == "br0"


@pytest.mark.parametrize("vlan", [0, 1, 4094, 4095])
def test_port_group_vlan_range(vlan: int) -> None:
    assert validate(PortGroupSpec, {"name": "pg", "vlan": vlan}).vlan == vlan


@pytest.mark.parametrize(
    ("switches", "reason"),
    [
        ([_switch(), _switch()], "switch names"),
        ([_switch(), _switch(name="b", bridge="tvbr-lan")], "bridge names"),
        ([_switch(uplink="eth0"), _switch(name="b", uplink="eth0")], "uplinks"),
        ([_switch(), _switch(name="b", uplink="tvbr-lan")], "must not be a switch's bridge"),
    ],
)
def test_bad_network_config_is_refused(switches: list[dict[str, Any]], reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(NetworkConfig, {"switches": switches})
    assert reason in info.value.reason


def test_store_round_trip(tmp_path: Path) -> None:
    store = NetworkStore(tmp_path / "network.toml")
    assert store.switches() == []
    store.add_switch(_switch(mtu=9000, uplink="eth1"))
    store.add_port_group("lan", {"name": "vm-net", "vlan": 10})
    store.add_port_group("lan", PortGroupSpec(name="trunk", vlan=4095))
    store.add_switch(_switch(name="int", vlan_filtering=False))
    again = NetworkStore(tmp_path / "network.toml")
    lan = again.get("lan")
    assert (lan.mtu, lan.uplink, lan.bridge) == (9000, "eth1", "tvbr-lan")
    assert [(p.name, p.vlan) for p in lan.port_groups] == [("vm-net", 10), ("trunk", 4095)]
    assert [s.name for s in again.switches()] == ["lan", "int"]
    again.remove_port_group("lan", "vm-net")
    again.remove_switch("int")
    assert [s.name for s in store.switches()] == ["lan"]
    assert [p.name for p in store.get("lan").port_groups] == ["trunk"]


def test_store_errors_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "network.toml"
    store = NetworkStore(path)
    store.add_switch(_switch(uplink="eth1", port_groups=[{"name": "pg"}]))
    before = path.read_bytes()
    with pytest.raises(AlreadyExists):
        store.add_switch(_switch())
    with pytest.raises(InvalidArgument, match="uplinks"):
        store.add_switch(_switch(name="other", uplink="eth1"))
    with pytest.raises(InvalidArgument):
        store.add_switch({"name": "x", "mtu": 1})
    with pytest.raises(AlreadyExists):
        store.add_port_group("lan", {"name": "pg", "vlan": 5})
    with pytest.raises(InvalidArgument):
        store.add_port_group("lan", {"name": "pg2", "vlan": 4096})
    with pytest.raises(NotFound):
        store.add_port_group("nope", {"name": "pg2"})
    with pytest.raises(NotFound):
        store.remove_port_group("lan", "nope")
    with pytest.raises(NotFound):
        store.remove_switch("nope")
    with pytest.raises(NotFound):
        store.get("nope")
    assert path.read_bytes() == before


def test_store_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "network.toml"
    path.write_text("switches = [ {")
    with pytest.raises(InvalidConfig):
        NetworkStore(path).load()
    path.write_text('[[switches]]\nname = "a"\nmtu = 1\n')
    with pytest.raises(InvalidConfig):
        NetworkStore(path).load()


def test_tap_name_is_short_deterministic_and_distinct() -> None:
    uuid = "0b5f0c1e-8a5d-4c9e-9a1b-2f3c4d5e6f70"
    name = tap_name(uuid, "net0")
    assert name == tap_name(uuid.upper(), "net0")
    assert name.startswith("tv") and len(name) <= 15
    assert name != tap_name(uuid, "net1")
    others = {tap_name(f"00000000-0000-0000-0000-{n:012d}", "net0") for n in range(2000)}
    assert len(others) == 2000


def test_only_thinvisor_tap_names_are_recognised() -> None:
    from thinvisor.network.netlink import is_tap_name, tap_name

    assert is_tap_name(tap_name("0b5f0c1e-8a5d-4c9e-9a1b-2f3c4d5e6f70", "net0"))
    for other in ("tvleft", "tvf0123456789ab", "tv0123456789abc", "tv0123456789AB", "tap0"):
        assert not is_tap_name(other)
