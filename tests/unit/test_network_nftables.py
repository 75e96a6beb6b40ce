"""nftables rulesets, dnsmasq configuration and lease parsing. No nft, no dnsmasq."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from thinvisor.errors import BackendError, InvalidArgument
from thinvisor.network import nftables
from thinvisor.network.dnsmasq import (
    Dnsmasq,
    Lease,
    dnsmasq_config,
    has_nameservers,
    parse_leases,
)

# -- nftables ----------------------------------------------------------------------------


def test_vlan_ruleset_isolates_each_vlan_and_keeps_the_native_segment_free() -> None:
    groups = {0: ["tvu"], 10: ["tvb", "tva"], 20: ["tvc"], 4095: ["tvt"]}
    assert nftables.vlan_ruleset("lan", groups) == (
        "table bridge thinvisor-vlan-lan {}\n"
        "delete table bridge thinvisor-vlan-lan\n"
        "table bridge thinvisor-vlan-lan {\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority 0; policy accept;\n"
        "\t\t# VLAN 10\n"
        '\t\tiifname { "tva", "tvb" } oifname != { "tva", "tvb" } drop\n'
        '\t\toifname { "tva", "tvb" } iifname != { "tva", "tvb" } drop\n'
        "\t\t# VLAN 20\n"
        '\t\tiifname { "tvc" } oifname != { "tvc" } drop\n'
        '\t\toifname { "tvc" } iifname != { "tvc" } drop\n'
        "\t}\n"
        "\t# The host's own address on the bridge is on the native segment.\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority 0; policy accept;\n"
        '\t\tiifname { "tva", "tvb", "tvc" } drop\n'
        "\t}\n"
        "}\n"
    )


@pytest.mark.parametrize("groups", [{}, {0: ["tva"], 4095: ["tvb"]}, {10: [], 20: []}])
def test_vlan_ruleset_without_vlan_ports_removes_the_table(groups: dict[int, list[str]]) -> None:
    assert nftables.vlan_ruleset("lan", groups) == (
        "table bridge thinvisor-vlan-lan {}\ndelete table bridge thinvisor-vlan-lan\n"
    )


@pytest.mark.parametrize(
    ("switch", "groups", "field"),
    [
        ("lan", {4096: ["tva"]}, "vlan"),
        ("lan", {-1: ["tva"]}, "vlan"),
        ("lan", {10: ['tv"a']}, "interface"),
        ("lan", {10: ["tva }"]}, "interface"),
        ("lan", {10: ["tva"], 20: ["tva"]}, "port"),
        ("lan", {0: ["tva"], 10: ["tva"]}, "port"),
        ("a b", {10: ["tva"]}, "switch"),
        ("..", {10: ["tva"]}, "switch"),
        ("x;flush ruleset", {10: ["tva"]}, "switch"),
    ],
)
def test_vlan_ruleset_refuses_bad_input(
    switch: str, groups: dict[int, list[str]], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        nftables.vlan_ruleset(switch, groups)
    assert info.value.field == field


def test_nat_ruleset() -> None:
    text = nftables.nat_ruleset("nat1", "tvbr-nat1", IPv4Network("10.0.5.0/24"))
    assert text == (
        "table ip thinvisor-nat-nat1 {}\n"
        "delete table ip thinvisor-nat-nat1\n"
        "table ip thinvisor-nat-nat1 {\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        "\t\tip saddr 10.0.5.0/24 ip daddr != 10.0.5.0/24 masquerade\n"
        "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        '\t\tiifname "tvbr-nat1" oifname "tvbr-nat1" accept\n'
        '\t\tiifname "tvbr-nat1" ip saddr 10.0.5.0/24 accept\n'
        '\t\toifname "tvbr-nat1" ip daddr 10.0.5.0/24 ct state established,related accept\n'
        "\t\t# Guests are not reachable from outside, nor may they spoof other sources.\n"
        '\t\tiifname "tvbr-nat1" drop\n'
        '\t\toifname "tvbr-nat1" drop\n'
        "\t}\n"
        "}\n"
    )


def test_nat_ruleset_refuses_a_bad_bridge() -> None:
    with pytest.raises(InvalidArgument):
        nftables.nat_ruleset("nat1", 'br" accept', IPv4Network("10.0.5.0/24"))


def test_replace_table_ruleset_checks_family_and_name() -> None:
    assert nftables.replace_table_ruleset("inet", "thinvisor-x", None) == (
        "table inet thinvisor-x {}\ndelete table inet thinvisor-x\n"
    )
    with pytest.raises(InvalidArgument):
        nftables.replace_table_ruleset("ipx", "thinvisor-x", None)
    with pytest.raises(InvalidArgument):
        nftables.replace_table_ruleset("ip", "x; flush ruleset", None)


def test_parse_tables_keeps_only_thinvisor_tables() -> None:
    text = (
        '{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},'
        ' {"table": {"family": "ip", "name": "thinvisor-nat-b", "handle": 4}},'
        ' {"table": {"family": "inet", "name": "filter", "handle": 1}},'
        ' {"table": {"family": "bridge", "name": "thinvisor-vlan-a", "handle": 2}}]}'
    )
    assert nftables.parse_tables(text) == [
        ("bridge", "thinvisor-vlan-a"),
        ("ip", "thinvisor-nat-b"),
    ]
    assert nftables.parse_tables("") == []
    with pytest.raises(BackendError):
        nftables.parse_tables("not json")


def test_first_error_line_of_nft() -> None:
    stderr = (
        "/dev/stdin:1:21-24: Error: Could not process rule: No such file or directory\n"
        "delete table bridge nope\n"
        "                    ^^^^\n"
    )
    assert nftables._first_error(stderr).endswith(
        "Error: Could not process rule: No such file or directory"
    )
    assert nftables._first_error("") == "nft failed"


# -- dnsmasq -----------------------------------------------------------------------------

_POOL = (IPv4Address("10.0.5.2"), IPv4Address("10.0.5.254"))


def _config(**kw: object) -> str:
    args: dict[str, object] = {
        "bridge": "tvbr-nat1",
        "address": IPv4Interface("10.0.5.1/24"),
        "dhcp_range": _POOL,
        "pid_file": Path("/run/thinvisor/network/nat1/dnsmasq.pid"),
        "lease_file": Path("/var/lib/thinvisor/network/nat1.leases"),
        "user": ("dnsmasq", "nogroup"),
        "upstream": True,
        **kw,
    }
    return dnsmasq_config(**args)  # type: ignore[arg-type]


def _options(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_dnsmasq_config_with_dhcp() -> None:
    assert _options(_config()) == [
        "strict-order",
        "pid-file=/run/thinvisor/network/nat1/dnsmasq.pid",
        "user=dnsmasq",
        "group=nogroup",
        "except-interface=lo",
        "bind-dynamic",
        "interface=tvbr-nat1",
        "listen-address=10.0.5.1",
        "no-hosts",
        "domain-needed",
        "bogus-priv",
        "dhcp-range=10.0.5.2,10.0.5.254,255.255.255.0,1h",
        "dhcp-no-override",
        "dhcp-authoritative",
        "dhcp-leasefile=/var/lib/thinvisor/network/nat1.leases",
        "dhcp-lease-max=253",
    ]


def test_dnsmasq_config_dns_only_and_without_upstream() -> None:
    options = _options(_config(dhcp_range=None, upstream=False))
    assert "no-resolv" in options
    assert not [o for o in options if o.startswith("dhcp-")]
    assert "no-resolv" not in _options(_config())


def test_dnsmasq_config_pool_size() -> None:
    pool = (IPv4Address("10.0.5.10"), IPv4Address("10.0.5.19"))
    assert "dhcp-lease-max=10" in _options(_config(dhcp_range=pool))
    small = _config(address=IPv4Interface("192.168.7.1/30"))
    assert "dhcp-range=10.0.5.2,10.0.5.254,255.255.255.252,1h" in _options(small)


def test_has_nameservers() -> None:
    assert has_nameservers("# x\nsearch example\nnameserver 10.1.1.1\n")
    assert not has_nameservers("# nameserver 10.1.1.1\nsearch example\n")
    assert not has_nameservers("")


def test_parse_leases() -> None:
    text = (
        "1795842770 C2:9B:EE:6E:D0:90 10.0.5.3 guest1 01:c2:9b:ee:6e:d0:90\n"
        "0 52:54:00:00:00:02 10.0.5.4 * *\n"
        "duid 00:01:00:01:2c:aa:bb:cc:52:54:00:00:00:01\n"
        "1795842770 1234 fd00::5 guest6 00:01:00:01\n"
        "garbage\n"
    )
    assert parse_leases(text) == [
        Lease(1795842770, "c2:9b:ee:6e:d0:90", IPv4Address("10.0.5.3"), "guest1"),
        Lease(0, "52:54:00:00:00:02", IPv4Address("10.0.5.4"), None),
    ]


def test_dnsmasq_files_and_missing_leases(tmp_path: Path) -> None:
    d = Dnsmasq(tmp_path / "run", tmp_path / "state")
    assert d.conf_file("nat1") == tmp_path / "run/network/nat1/dnsmasq.conf"
    assert d.pid_file("nat1") == tmp_path / "run/network/nat1/dnsmasq.pid"
    assert d.lease_file("nat1") == tmp_path / "state/network/nat1.leases"
    assert d.leases("nat1") == []
    assert d.running("nat1") is None
    assert d.instances() == {}
    assert not d.stop("nat1")
    with pytest.raises(InvalidArgument):
        d.conf_file("../etc")


def test_dnsmasq_config_follows_the_hosts_resolv_conf(tmp_path: Path) -> None:
    d = Dnsmasq(tmp_path / "run", tmp_path / "state")
    d.resolv_conf = tmp_path / "resolv.conf"
    address = IPv4Interface("10.0.5.1/24")
    assert "no-resolv" in _options(d.config("nat1", "tvbr-nat1", address, _POOL))
    d.resolv_conf.write_text("nameserver 10.1.1.1\n")
    text = d.config("nat1", "tvbr-nat1", address, _POOL)
    assert "no-resolv" not in _options(text)
    assert f"pid-file={tmp_path}/run/network/nat1/dnsmasq.pid" in _options(text)
    with pytest.raises(InvalidArgument):
        d.config("nat1", "bad bridge", address, _POOL)
