"""``thinvisor network``: virtual switches and their port groups."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from thinvisor.cli import common
from thinvisor.errors import InvalidArgument
from thinvisor.model.vm import validate
from thinvisor.network.model import VLAN_TRUNK, VLAN_UNTAGGED, PortGroupSpec, SwitchSpec

app = typer.Typer(help="Virtual switches and their port groups.", no_args_is_help=True)
switch_app = typer.Typer(
    help="Create, list, show and delete virtual switches.", no_args_is_help=True
)
portgroup_app = typer.Typer(
    help="Create, list, show, change and delete port groups.", no_args_is_help=True
)
app.add_typer(switch_app, name="switch")
app.add_typer(portgroup_app, name="portgroup")

SwitchArg = Annotated[str, typer.Argument(help="The switch's name.")]
GroupArg = Annotated[str, typer.Argument(help="The port group's name (unique on the host).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
VLAN_HELP = "VLAN id: 0 untagged, 1-4094 tagged, 4095 trunk."

out = common.console()


def switch_spec(
    name: str,
    *,
    bridge: str | None = None,
    uplink: str | None = None,
    mtu: int | None = None,
    vlan_filtering: bool = True,
    nat: str | None = None,
    dhcp_range: str | None = None,
    dhcp: bool = True,
    portgroup: bool = True,
) -> SwitchSpec:
    """The switch the create options describe; a NAT switch gets a port group of its own
    name (untagged) unless ``portgroup`` is false."""
    data: dict[str, Any] = {"name": name}
    if bridge is not None:
        data["bridge"] = bridge
    if uplink is not None:
        data["uplink"] = uplink
    if mtu is not None:
        data["mtu"] = mtu
    if not vlan_filtering:
        data["vlan_filtering"] = False
    if nat is None:
        for option, given in (("dhcp-range", dhcp_range is not None), ("no-dhcp", not dhcp)):
            if given:
                raise InvalidArgument(option, "applies to a NAT switch: give --nat")
    else:
        data["nat"] = _nat(nat, dhcp_range, dhcp)
        if portgroup:
            data["port_groups"] = [{"name": name}]
    try:
        return validate(SwitchSpec, data)
    except InvalidArgument as exc:
        if exc.field != "spec":
            raise
        raise InvalidArgument("switch", exc.reason) from None


def _nat(address: str, dhcp_range: str | None, dhcp: bool) -> dict[str, Any]:
    nat: dict[str, Any] = {"address": address}
    if not dhcp:
        if dhcp_range is not None:
            raise InvalidArgument("dhcp-range", "contradicts --no-dhcp")
        nat["dhcp"] = False
    if dhcp_range is not None:
        start, sep, end = dhcp_range.partition("-")
        if not (sep and start.strip() and end.strip()):
            raise InvalidArgument("dhcp-range", f"{dhcp_range!r} is not START-END")
        nat["dhcp_start"], nat["dhcp_end"] = start.strip(), end.strip()
    return nat


def vlan_text(vlan: int) -> str:
    if vlan == VLAN_UNTAGGED:
        return "untagged"
    if vlan == VLAN_TRUNK:
        return "trunk"
    return str(vlan)


def _ports_text(ports: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p['vm']}/{p['nic']}" for p in ports) or "-"


def _mode(switch: dict[str, Any]) -> str:
    if switch.get("nat"):
        return f"NAT {switch['nat']['address']}"
    if switch.get("uplink"):
        return f"uplink {switch['uplink']}"
    return "host-only"


def _kv_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _print_switch(s: dict[str, Any], json_out: bool) -> None:
    if json_out:
        common.print_json(s)
        return
    rows = [
        ("name", s["name"]),
        ("bridge", s["bridge"] + ("" if s["present"] else " (missing)")),
        ("mode", _mode(s)),
        ("mtu", str(s["mtu"])),
        ("vlans", f"kept apart by {s['vlan_enforcement']}" if s["vlan_filtering"] else "off"),
    ]
    dhcp = s.get("dhcp")
    if dhcp:
        state = f"dnsmasq pid {dhcp['pid']}" if dhcp["pid"] else "not running"
        rows.append(("dhcp", f"{'-'.join(dhcp['range'])} ({state})"))
        rows += [(f"lease {x['ip']}", f"{x['mac']} {x['hostname'] or ''}") for x in dhcp["leases"]]
    for g in s["port_groups"]:
        text = f"VLAN {vlan_text(g['vlan'])}; ports: {_ports_text(g['ports'])}"
        rows.append((f"port group {g['name']}", text))
    out.print(_kv_table(rows))


@switch_app.command("create")
def switch_create(
    name: SwitchArg,
    bridge: Annotated[
        str | None, typer.Option(help="The bridge device's name (default: tvbr-NAME).")
    ] = None,
    uplink: Annotated[
        str | None, typer.Option(help="A host NIC to bridge the switch to the outside.")
    ] = None,
    mtu: Annotated[int | None, typer.Option(help="The bridge's MTU (default: 1500).")] = None,
    no_vlan_filtering: Annotated[
        bool, typer.Option("--no-vlan-filtering", help="No VLANs: every port group untagged.")
    ] = False,
    nat: Annotated[
        str | None,
        typer.Option(help="NAT behind the host, with this host address, like 10.0.5.1/24."),
    ] = None,
    dhcp_range: Annotated[
        str | None,
        typer.Option(help="A NAT switch's DHCP pool, START-END (default: the rest of the subnet)."),
    ] = None,
    no_dhcp: Annotated[
        bool, typer.Option("--no-dhcp", help="No DHCP server on a NAT switch.")
    ] = False,
    no_portgroup: Annotated[
        bool,
        typer.Option("--no-portgroup", help="No port group named after a NAT switch."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a virtual switch (a Linux bridge): bridged to --uplink, NAT behind the host
    with --nat, or host-only. A NAT switch gets an untagged port group of its own name."""
    spec: SwitchSpec = common.guard(
        lambda: switch_spec(
            name,
            bridge=bridge,
            uplink=uplink,
            mtu=mtu,
            vlan_filtering=not no_vlan_filtering,
            nat=nat,
            dhcp_range=dhcp_range,
            dhcp=not no_dhcp,
            portgroup=not no_portgroup,
        )
    )
    _print_switch(common.run_on_host(lambda h: h.network.create_switch(spec)), json_out)


@switch_app.command("list")
def switch_list(json_out: JsonOpt = False) -> None:
    """List the host's switches."""
    switches: list[dict[str, Any]] = common.run_on_host(lambda h: h.network.list_switches())
    if json_out:
        common.print_json(switches)
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "BRIDGE", "MODE", "MTU", "VLANS", "PORT GROUPS", "STATE"):
        table.add_column(col)
    for s in switches:
        vlans = s["vlan_enforcement"] if s["vlan_filtering"] else "off"
        groups = ", ".join(g["name"] for g in s["port_groups"]) or "-"
        state = "present" if s["present"] else "missing"
        table.add_row(s["name"], s["bridge"], _mode(s), str(s["mtu"]), vlans, groups, state)
    out.print(table)


@switch_app.command("show")
def switch_show(name: SwitchArg, json_out: JsonOpt = False) -> None:
    """Show a switch: its bridge, NAT and DHCP leases, port groups and who is on them."""
    _print_switch(common.run_on_host(lambda h: h.network.get_switch(name)), json_out)


@switch_app.command("delete")
def switch_delete(name: SwitchArg) -> None:
    """Delete a switch and its port groups (refused while a VM's NIC is on one)."""
    common.run_on_host(lambda h: h.network.delete_switch(name))
    typer.echo(f"{name}: deleted")


def _port_group(name: str, vlan: int) -> PortGroupSpec:
    group: PortGroupSpec = common.guard(
        lambda: validate(PortGroupSpec, {"name": name, "vlan": vlan})
    )
    return group


def _print_group(g: dict[str, Any], json_out: bool) -> None:
    if json_out:
        common.print_json(g)
        return
    rows = [("name", g["name"]), ("switch", g["switch"]), ("vlan", vlan_text(g["vlan"]))]
    for p in g["ports"]:
        rows.append((f"port {p['vm']}/{p['nic']}", f"{p['mac']} {p['tap'] or '(not running)'}"))
    if not g["ports"]:
        rows.append(("ports", "-"))
    out.print(_kv_table(rows))


@portgroup_app.command("create")
def portgroup_create(
    name: GroupArg,
    switch: Annotated[str, typer.Option("--switch", help="The switch to add it to.")],
    vlan: Annotated[int, typer.Option(help=VLAN_HELP)] = VLAN_UNTAGGED,
    json_out: JsonOpt = False,
) -> None:
    """Add a port group to a switch: the VLAN that the VM NICs on it get."""
    group = _port_group(name, vlan)
    _print_group(common.run_on_host(lambda h: h.network.create_port_group(switch, group)), json_out)


@portgroup_app.command("list")
def portgroup_list(json_out: JsonOpt = False) -> None:
    """List the port groups of every switch."""
    groups: list[dict[str, Any]] = common.run_on_host(lambda h: h.network.list_port_groups())
    if json_out:
        common.print_json(groups)
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "SWITCH", "VLAN", "PORTS"):
        table.add_column(col)
    for g in groups:
        table.add_row(g["name"], g["switch"], vlan_text(g["vlan"]), _ports_text(g["ports"]))
    out.print(table)


@portgroup_app.command("show")
def portgroup_show(name: GroupArg, json_out: JsonOpt = False) -> None:
    """Show a port group and the VM NICs on it."""
    _print_group(common.run_on_host(lambda h: h.network.get_port_group(name)), json_out)


@portgroup_app.command("set")
def portgroup_set(
    name: GroupArg,
    vlan: Annotated[int, typer.Option(help=VLAN_HELP)],
    json_out: JsonOpt = False,
) -> None:
    """Change a port group's VLAN; running NICs on it move at once."""
    group = _port_group(name, vlan)
    _print_group(
        common.run_on_host(lambda h: h.network.update_port_group(name, group.vlan)), json_out
    )


@portgroup_app.command("delete")
def portgroup_delete(name: GroupArg) -> None:
    """Delete a port group (refused while a VM's NIC is on it)."""
    common.run_on_host(lambda h: h.network.delete_port_group(name))
    typer.echo(f"{name}: deleted")
