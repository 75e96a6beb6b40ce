"""``thinvisor network`` and ``thinvisor vm nic`` without a host: bad input is one line
naming the field, before anything is asked of the host; the remote client's calls reach
the API's routes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from typer.testing import CliRunner

from thinvisor.api.app import create_app
from thinvisor.auth import Role, UserStore
from thinvisor.cli.main import app
from thinvisor.cli.network import switch_spec
from thinvisor.cli.remote import Login, RemoteHost, save_login
from thinvisor.cli.vm import nic_shaping, parse_bandwidth
from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import InvalidArgument, NotFound
from thinvisor.host.agent import HostAgent
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.hostinfo import HostFacts
from thinvisor.host.service import HostService
from thinvisor.model.create import NewNicSpec, NicUpdate, VmCreate
from thinvisor.model.vm import Bandwidth, NicShaping
from thinvisor.network.model import PortGroupSpec

from .clienv import host_env, tv


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return host_env(tmp_path)


def network_file(env: dict[str, str]) -> Path:
    return Path(env["THINVISOR_CONFIG"]).parent / "state" / "network.toml"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["portgroup", "create", "pg", "--switch", "sw", "--vlan", "5000"],
            "vlan: Input should be less than or equal to 4095",
        ),
        (
            ["portgroup", "create", "pg", "--switch", "sw", "--vlan", "-1"],
            "vlan: Input should be greater than or equal to 0",
        ),
        (
            ["portgroup", "set", "pg", "--vlan", "4096"],
            "vlan: Input should be less than or equal to 4095",
        ),
        (
            ["portgroup", "create", "user", "--switch", "sw"],
            "name: 'user' is reserved for QEMU's user networking",
        ),
        (["portgroup", "create", "a/b", "--switch", "sw"], "name: must not contain '/' or '..'"),
        (
            ["switch", "create", "sw", "--mtu", "10"],
            "mtu: Input should be greater than or equal to 68",
        ),
        (
            ["switch", "create", "sw", "--uplink", "not an interface"],
            "uplink: must be 1 to 15 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
        ),
        (
            ["switch", "create", "a-very-long-switch-name"],
            "switch: switch name longer than 10 characters: give the bridge name explicitly",
        ),
        (
            ["switch", "create", "sw", "--nat", "10.0.5.1/24", "--uplink", "eth0"],
            "switch: a NAT switch has no uplink: its traffic leaves through the host",
        ),
        (["switch", "create", "sw", "--nat", "10.0.5.300/24"], None),
        (
            ["switch", "create", "sw", "--nat", "10.0.5.1/31"],
            "nat: the subnet must hold at least two guest addresses (/30 or wider)",
        ),
        (
            ["switch", "create", "sw", "--dhcp-range", "10.0.5.2-10.0.5.9"],
            "dhcp-range: applies to a NAT switch: give --nat",
        ),
        (["switch", "create", "sw", "--no-dhcp"], "no-dhcp: applies to a NAT switch: give --nat"),
        (
            ["switch", "create", "sw", "--nat", "10.0.5.1/24", "--dhcp-range", "10.0.5.9"],
            "dhcp-range: '10.0.5.9' is not START-END",
        ),
        (
            ["switch", "create", "sw", "--nat", "10.0.5.1/24", "--dhcp-range", "1-2", "--no-dhcp"],
            "dhcp-range: contradicts --no-dhcp",
        ),
        (
            ["switch", "create", "sw", "--nat", "10.0.5.1/24", "--dhcp-range", "10.0.6.2-10.0.6.9"],
            "nat: dhcp_start 10.0.6.2 is not a host address of 10.0.5.0/24",
        ),
    ],
)
def test_bad_network_input(env: dict[str, str], args: list[str], message: str | None) -> None:
    err = tv(env, "network", *args, code=1)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    if message is not None:
        assert err == f"error: {message}\n"
    assert not network_file(env).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["add", "vm1", "--network", "pg", "--inbound", "fast"],
            "inbound: 'fast' is not AVG[:PEAK[:BURST]] in kbit/s, kbit/s and KiB",
        ),
        (
            ["add", "vm1", "--network", "pg", "--outbound", "1:2:3:4"],
            "outbound: '1:2:3:4' is not AVG[:PEAK[:BURST]] in kbit/s, kbit/s and KiB",
        ),
        (
            ["add", "vm1", "--network", "pg", "--inbound", ":100"],
            "inbound: ':100' is not AVG[:PEAK[:BURST]] in kbit/s, kbit/s and KiB",
        ),
        (
            ["add", "vm1", "--network", "pg", "--inbound", "1000:500"],
            "inbound: peak_kbps must not be below average_kbps",
        ),
        (
            ["add", "vm1", "--network", "pg", "--outbound", "4"],
            "outbound.average_kbps: Input should be greater than or equal to 8",
        ),
        (
            ["add", "vm1", "--network", "pg", "--model", "ne2k"],
            "model: Input should be 'virtio', 'e1000' or 'rtl8139'",
        ),
        (["add", "vm1", "--network", "a/b"], "network: must not contain '/' or '..'"),
        (["add", "vm1"], "Missing option '--network'."),
        (["set", "vm1", "net0"], "nic: give at least one option to change"),
        (
            ["set", "vm1", "net0", "--inbound", "10:x"],
            "inbound: '10:x' is not AVG[:PEAK[:BURST]] in kbit/s, kbit/s and KiB",
        ),
    ],
)
def test_bad_nic_input(env: dict[str, str], args: list[str], message: str) -> None:
    # vm1 does not exist: the input is refused before the host is asked about it.
    result = CliRunner().invoke(app, ["vm", "nic", *args], env=env)
    assert result.exit_code != 0
    if message.startswith("Missing"):  # a usage error: click's own wording
        assert message in result.stderr
        return
    assert result.stderr == f"error: {message}\n"


def test_empty_host(env: dict[str, str]) -> None:
    assert tv(env, "network", "switch", "list", "--json") == "[]\n"
    assert tv(env, "network", "portgroup", "list", "--json") == "[]\n"
    assert tv(env, "network", "switch", "show", "sw", code=1) == "error: switch 'sw' not found\n"
    err = tv(env, "network", "portgroup", "show", "pg", code=1)
    assert err == "error: port group 'pg' not found\n"


def test_vm_create_takes_port_groups(env: dict[str, str]) -> None:
    err = tv(env, "vm", "create", "vm1", "--network", "dmz", code=1)
    assert err == "error: nics.net0.network: no port group 'dmz' on this host\n"


def test_network_commands_go_where_the_login_says(env: dict[str, str], tmp_path: Path) -> None:
    login = Login(url="http://127.0.0.1:9", token="t", fingerprint=None, user="u")
    save_login(login, tmp_path / "xdg" / "thinvisor" / "login.json")
    for args in (["network", "switch", "list"], ["vm", "nic", "list", "vm1"]):
        err = tv(env, *args, code=1)
        assert err.startswith("error: cannot reach http://127.0.0.1:9") and err.count("\n") == 1


def test_a_nat_switch_gets_a_port_group_of_its_name() -> None:
    spec = switch_spec("lab", nat="10.0.5.1/24", dhcp_range="10.0.5.100-10.0.5.199")
    assert [(g.name, g.vlan) for g in spec.port_groups] == [("lab", 0)]
    assert spec.nat is not None and str(spec.nat.dhcp_start) == "10.0.5.100"
    assert switch_spec("lab", nat="10.0.5.1/24", portgroup=False).port_groups == []
    assert switch_spec("lan", uplink="eth0").port_groups == []
    assert not switch_spec("iso", vlan_filtering=False).vlan_filtering
    assert switch_spec("a-long-switch-name", bridge="br-long").bridge == "br-long"
    no_dhcp = switch_spec("lab", nat="10.0.5.1/24", dhcp=False)
    assert no_dhcp.nat is not None and not no_dhcp.nat.dhcp


def test_bandwidth_syntax() -> None:
    assert parse_bandwidth("1000", "inbound") == {"average_kbps": 1000}
    assert parse_bandwidth("1000:2000:64", "inbound") == {
        "average_kbps": 1000,
        "peak_kbps": 2000,
        "burst_kib": 64,
    }
    assert parse_bandwidth("1000::64", "inbound") == {"average_kbps": 1000, "burst_kib": 64}
    assert parse_bandwidth("None", "inbound") is None
    with pytest.raises(InvalidArgument) as caught:
        parse_bandwidth("1M", "outbound")
    assert caught.value.field == "outbound"


def test_shaping_one_direction_keeps_the_other() -> None:
    current = NicShaping(inbound=Bandwidth(average_kbps=1000), outbound=Bandwidth(average_kbps=500))
    changed = nic_shaping("2000", None, current)
    assert changed is not None and changed.outbound == current.outbound
    assert changed.inbound == Bandwidth(average_kbps=2000)
    only_out = nic_shaping("none", None, current)
    assert only_out is not None and only_out.inbound is None
    assert nic_shaping("none", "none", current) is None
    assert nic_shaping(None, None) is None


# The remote client against the real routes (through ASGI, no sockets, no netlink).

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[HostAgent]:
    config = HostConfig(
        qemu_binary=str(tmp_path / "no-qemu-in-unit-tests"),
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        datastores=[DatastoreConfig(name="local", path=tmp_path / "ds")],
    )
    facts = HostFacts(cpus=4, memory_total_mib=8192, memory_available_mib=4096, cpu_model="test")
    service = HostService(config, accel=lambda: AccelChoice("tcg", "test"), facts=lambda: facts)
    agent = HostAgent(config, service=service)
    agent.users = UserStore(config.state_dir / "users.json", hasher=FAST)
    agent.users.add_user("admin", "password123", Role.ADMIN)
    yield agent
    agent.events.close()


async def _remote(agent: HostAgent) -> RemoteHost:
    _, token = agent.users.create_token("admin", "test")
    host = RemoteHost(Login(url="http://agent", token=token, fingerprint=None, user="admin"))
    await host._client.aclose()
    host._client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(agent, start_agent=False)),
        base_url="http://agent/api/v1",
        headers={"Authorization": f"Bearer {token}"},
    )
    return host


def test_remote_network_calls_reach_the_routes(agent: HostAgent) -> None:
    async def go() -> None:
        async with await _remote(agent) as host:
            assert await host.network.list_switches() == []
            assert await host.network.list_port_groups() == []
            with pytest.raises(NotFound, match="switch 'sw' not found"):
                await host.network.get_switch("sw")
            with pytest.raises(NotFound, match="switch 'sw' not found"):
                await host.network.create_port_group("sw", PortGroupSpec(name="pg", vlan=7))
            with pytest.raises(NotFound, match="port group 'pg' not found"):
                await host.network.update_port_group("pg", 8)
            with pytest.raises(NotFound, match="port group 'pg' not found"):
                await host.network.delete_port_group("pg")
            with pytest.raises(NotFound, match="switch 'sw' not found"):
                await host.network.delete_switch("sw")

    asyncio.run(go())


def test_remote_nic_calls_reach_the_routes(agent: HostAgent) -> None:
    async def go() -> list[Any]:
        await agent.service.create_from(VmCreate(name="vm1", nics=[NewNicSpec()]))
        async with await _remote(agent) as host:
            [nic] = await host.list_nics("vm1")
            assert (nic["name"], nic["network"], nic["tap"], nic["ip"]) == (
                "net0",
                "user",
                None,
                None,
            )
            with pytest.raises(InvalidArgument) as caught:
                await host.add_nic("vm1", NewNicSpec(network="nope"))
            assert caught.value.field == "network"
            added = await host.add_nic("vm1", NewNicSpec(mac="02:00:00:00:00:11", connected=False))
            assert (added.name, added.mac, added.connected) == ("net1", "02:00:00:00:00:11", False)
            plugged = await host.update_nic("vm1", "net1", NicUpdate(connected=True))
            assert plugged.connected
            limit = NicShaping(inbound=Bandwidth(average_kbps=1000))
            shaped = await host.update_nic("vm1", "net1", NicUpdate(shaping=limit))
            assert shaped.shaping == limit
            # Only the fields given: a connection change keeps the shaping, null removes it.
            kept = await host.update_nic("vm1", "net1", NicUpdate(connected=False))
            assert kept.shaping == limit
            cleared = await host.update_nic("vm1", "net1", NicUpdate(shaping=None))
            assert cleared.shaping is None and not cleared.connected
            await host.remove_nic("vm1", "net0")
            with pytest.raises(NotFound, match="no NIC 'net0'"):
                await host.remove_nic("vm1", "net0")
            return await host.list_nics("vm1")

    assert [n["name"] for n in asyncio.run(go())] == ["net1"]
