"""nftables rules of the virtual switches: VLAN isolation and NAT, through the ``nft`` binary.

Each switch owns whole tables named ``thinvisor-<what>-<switch>``, and every change is one
nft transaction (``nft -f -``) that creates, deletes and re-creates its table, so that
a table is either all old or all new and works whether or not it existed before. The
rulesets are made by pure functions (``*_ruleset``) that the unit tests check without
nft. A failing ``nft`` becomes a ``BackendError`` with nft's own error line.

- VLAN isolation (``thinvisor-vlan-<switch>``, bridge family) stands in for bridge VLAN
  filtering on kernels without it: ports of a port group with VLAN n (1-4094) exchange
  frames only with ports of VLAN n and do not reach the host's own address on the
  bridge. Untagged (0) and trunk (4095) ports form the switch's native segment. The
  rules match bridge ports by name (``iifname``/``oifname``): ``meta ibrname`` needs
  CONFIG_NFT_BRIDGE_META, which not every kernel has.
- NAT (``thinvisor-nat-<switch>``, ip family) masquerades the switch's subnet out of the
  host, lets guests out and only replies back in, as libvirt's NAT networks do.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping

from thinvisor.errors import BackendError, InvalidArgument
from thinvisor.model.vm import check_name
from thinvisor.network.model import VLAN_MAX, VLAN_TRUNK, VLAN_UNTAGGED, check_ifname

TABLE_PREFIX = "thinvisor-"
VLAN_TABLE_PREFIX = "thinvisor-vlan-"
NAT_TABLE_PREFIX = "thinvisor-nat-"
FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
_NFT_FALLBACK = "/usr/sbin/nft"
_TIMEOUT = 30.0
# What nft's scanner takes as an unquoted identifier.
_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def _nft() -> str:
    return shutil.which("nft") or _NFT_FALLBACK


def _run(args: list[str], stdin: str | None, action: str) -> str:
    """Run ``nft args``; its failure becomes a ``BackendError`` naming ``action``."""
    try:
        proc = subprocess.run(
            [_nft(), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
            timeout=_TIMEOUT,
        )
    except FileNotFoundError as exc:
        raise BackendError(f"{action}: nft not found (install nftables)") from exc
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"{action}: nft did not answer within {_TIMEOUT:.0f} s") from exc
    except subprocess.CalledProcessError as exc:
        raise BackendError(f"{action}: {_first_error(exc.stderr or '')}") from exc
    return proc.stdout


def _first_error(stderr: str) -> str:
    """nft's first error line (it prints the offending input and a caret line after it)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "Error:" in line:
            return line
    return lines[0] if lines else "nft failed"


def _check_switch(switch: str) -> str:
    try:
        return check_name(switch)
    except ValueError as exc:
        raise InvalidArgument("switch", str(exc)) from None


def _check_ifnames(names: Iterable[str]) -> list[str]:
    checked = []
    for name in names:
        try:
            checked.append(check_ifname(name))
        except ValueError as exc:
            raise InvalidArgument("interface", f"{name!r}: {exc}") from None
    return checked


def _check_table(family: str, name: str) -> None:
    if family not in FAMILIES:
        raise InvalidArgument("family", f"{family!r} is not one of {', '.join(FAMILIES)}")
    if not _TABLE_RE.match(name):
        raise InvalidArgument("table", f"{name!r} is not a plain nftables table name")


def _set(names: Iterable[str]) -> str:
    return "{ " + ", ".join(f'"{n}"' for n in names) + " }"


def replace_table_ruleset(family: str, name: str, body: str | None) -> str:
    """An nft script that replaces (or, with ``body`` None, deletes) a table atomically.

    Declaring the table first makes ``delete`` succeed when it did not exist.
    """
    _check_table(family, name)
    script = f"table {family} {name} {{}}\ndelete table {family} {name}\n"
    if body is not None:
        script += f"table {family} {name} {{\n{body}}}\n"
    return script


# VLAN isolation


def vlan_table(switch: str) -> str:
    return VLAN_TABLE_PREFIX + _check_switch(switch)


def isolated_groups(groups: Mapping[int, Iterable[str]]) -> dict[int, list[str]]:
    """The VLANs 1-4094 that have ports, each with its ports sorted; checks every input.

    Untagged (0) and trunk (4095) ports are on the native segment and need no rule. A
    port in two different VLANs is refused.
    """
    seen: dict[str, int] = {}
    for vlan, ports in groups.items():
        if not VLAN_UNTAGGED <= vlan <= VLAN_TRUNK:
            raise InvalidArgument("vlan", f"{vlan} is not a VLAN id (0-{VLAN_TRUNK})")
        for port in _check_ifnames(ports):
            if seen.setdefault(port, vlan) != vlan:
                raise InvalidArgument("port", f"{port!r} is in VLAN {seen[port]} and {vlan}")
    isolated: dict[int, list[str]] = {}
    for port, vlan in seen.items():
        if 1 <= vlan <= VLAN_MAX:
            isolated.setdefault(vlan, []).append(port)
    return {vlan: sorted(ports) for vlan, ports in sorted(isolated.items())}


def vlan_ruleset(switch: str, groups: Mapping[int, Iterable[str]]) -> str:
    """The nft script that makes switch ``switch``'s VLAN isolation match ``groups``."""
    isolated = isolated_groups(groups)
    if not isolated:
        return replace_table_ruleset("bridge", vlan_table(switch), None)
    forward = []
    for vlan, ports in isolated.items():
        members = _set(ports)
        forward += [
            f"\t\t# VLAN {vlan}",
            f"\t\tiifname {members} oifname != {members} drop",
            f"\t\toifname {members} iifname != {members} drop",
        ]
    every_port = _set(sorted(p for ports in isolated.values() for p in ports))
    body = "\n".join(
        [
            "\tchain forward {",
            "\t\ttype filter hook forward priority 0; policy accept;",
            *forward,
            "\t}",
            "\t# The host's own address on the bridge is on the native segment.",
            "\tchain input {",
            "\t\ttype filter hook input priority 0; policy accept;",
            f"\t\tiifname {every_port} drop",
            "\t}",
            "",
        ]
    )
    return replace_table_ruleset("bridge", vlan_table(switch), body)


def apply_vlan_isolation(switch: str, groups: dict[int, list[str]]) -> None:
    """Keep the VLANs of switch ``switch``'s port groups apart with bridge rules.

    ``groups`` maps a VLAN id to the bridge ports (TAPs) of the port groups with that
    VLAN. Ports of VLAN n (1-4094) then exchange frames only with ports of VLAN n and
    cannot reach the host's address on the bridge; untagged (0) and trunk (4095) ports
    are unrestricted. Without any port in VLANs 1-4094 the switch's table is removed.
    """
    _run(["-f", "-"], vlan_ruleset(switch, groups), f"VLAN isolation of switch {switch!r}")


def remove_vlan_isolation(switch: str) -> None:
    """Remove switch ``switch``'s VLAN isolation table; nothing to do when there is none."""
    remove_table("bridge", vlan_table(switch))


# NAT


def nat_table(switch: str) -> str:
    return NAT_TABLE_PREFIX + _check_switch(switch)


def nat_ruleset(switch: str, bridge: str, subnet: ipaddress.IPv4Network) -> str:
    """The nft script that masquerades ``subnet`` behind the host for switch ``switch``."""
    (bridge,) = _check_ifnames([bridge])
    net = ipaddress.IPv4Network(subnet)
    br = f'"{bridge}"'
    body = "\n".join(
        [
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f"\t\tip saddr {net} ip daddr != {net} masquerade",
            "\t}",
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter; policy accept;",
            f"\t\tiifname {br} oifname {br} accept",
            f"\t\tiifname {br} ip saddr {net} accept",
            f"\t\toifname {br} ip daddr {net} ct state established,related accept",
            "\t\t# Guests are not reachable from outside, nor may they spoof other sources.",
            f"\t\tiifname {br} drop",
            f"\t\toifname {br} drop",
            "\t}",
            "",
        ]
    )
    return replace_table_ruleset("ip", nat_table(switch), body)


def apply_nat(switch: str, bridge: str, subnet: ipaddress.IPv4Network) -> None:
    """Masquerade ``subnet`` (the guests on ``bridge``) out of the host, and let replies in.

    Also turns on IPv4 forwarding (``net.ipv4.ip_forward``) in this network namespace;
    it is left on by ``remove_nat``, as other switches may need it.
    """
    _run(["-f", "-"], nat_ruleset(switch, bridge, subnet), f"NAT of switch {switch!r}")
    try:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n")
    except OSError as exc:
        raise BackendError(f"NAT of switch {switch!r}: cannot enable IPv4 forwarding") from exc


def remove_nat(switch: str) -> None:
    """Remove switch ``switch``'s NAT table; nothing to do when there is none."""
    remove_table("ip", nat_table(switch))


# Reconciliation


def thinvisor_tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table whose name starts with ``thinvisor-``."""
    out = _run(["-j", "list", "tables"], None, "list nftables tables")
    return parse_tables(out)


def parse_tables(text: str) -> list[tuple[str, str]]:
    """The thinvisor tables in the output of ``nft -j list tables``, sorted."""
    try:
        items = json.loads(text).get("nftables", []) if text.strip() else []
    except ValueError as exc:
        raise BackendError(f"cannot parse the output of nft -j list tables: {exc}") from exc
    tables = []
    for item in items:
        table = item.get("table") if isinstance(item, dict) else None
        if isinstance(table, dict) and str(table.get("name", "")).startswith(TABLE_PREFIX):
            tables.append((str(table.get("family")), str(table["name"])))
    return sorted(tables)


def remove_table(family: str, name: str) -> None:
    """Delete one nftables table; nothing to do when it does not exist."""
    _run(["-f", "-"], replace_table_ruleset(family, name, None), f"remove table {name!r}")
