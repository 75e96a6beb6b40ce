"""Snapshots, templates, deploys, OVA exchange and disk moves through the ``thinvisor``
command logged in to a real agent (so over the REST API and its tasks)."""

from __future__ import annotations

import json

import pytest

from .agentenv import TestAgent
from .hostenv import TestHost
from .test_cli_remote import Cli, log_in
from .test_snapshots import sh

pytestmark = pytest.mark.functional


def state(cli: Cli, name: str) -> str:
    return str(json.loads(cli("vm", "show", name, "--json").stdout)["state"])


def test_storage_commands_over_the_api(host: TestHost, agent: TestAgent) -> None:
    cli = Cli(host)
    log_in(cli, agent)
    cli("vm", "create", "tpl", "--appliance", "--memory", "128", "--disk", "8M", "--nic", "user")
    cli("vm", "start", "tpl")
    host.wait_ready("tpl")

    # Snapshots of a running VM, with memory.
    assert "with memory" in cli("vm", "snapshot", "take", "tpl", "s1").stdout
    tree = json.loads(cli("vm", "snapshot", "list", "tpl", "--json").stdout)
    assert tree["current"] == 1
    assert [(s["name"], s["memory"], s["power_state"]) for s in tree["snapshots"]] == [
        ("s1", True, "running")
    ]
    assert "1 s1 (" in cli("vm", "snapshot", "list", "tpl").stdout
    assert cli("vm", "snapshot", "list", "tpl").stdout.rstrip().endswith("<- you are here")
    assert "s1" in cli("vm", "snapshot", "revert", "tpl", "s1").stdout
    assert state(cli, "tpl") == "running"
    assert "no-such" in cli.error("vm", "snapshot", "revert", "tpl", "no-such")
    cli("vm", "snapshot", "take", "tpl", "s2", "--no-memory")
    cli("vm", "snapshot", "revert", "tpl", "s1")
    # s2 is a child of s1: a second s2 under s1 would be its sibling.
    assert cli.error("vm", "snapshot", "take", "tpl", "s2").startswith("a snapshot named 's2'")
    assert "cannot clone the current state while running" in cli.error("vm", "clone", "tpl", "copy")
    cli("vm", "snapshot", "delete", "tpl", "s1")
    cli("vm", "snapshot", "delete", "tpl", "s2")
    assert json.loads(cli("vm", "snapshot", "list", "tpl", "--json").stdout)["snapshots"] == []

    # A template, and a customized linked clone of it.
    cli("vm", "stop", "tpl")
    cli("vm", "template", "mark", "tpl")
    assert "template" in cli.error("vm", "start", "tpl")
    out = cli("vm", "deploy", "tpl", "web1", "--linked", "--hostname", "web-01", "--power-on")
    assert "web1: deployed from tpl (running)" in out.stdout
    host.wait_ready("web1")
    assert sh(host, "web1", "hostname").strip() == "web-01"
    assert "linked clone" in cli.error("vm", "template", "unmark", "tpl")

    # OVA out and back in, then a disk moved to an added datastore.
    cli("vm", "stop", "web1")
    cli("vm", "export", "web1", "local/exports/web1.ova")
    listing = json.loads(cli("datastore", "ls", "local/exports", "--json").stdout)
    assert [e["name"] for e in listing] == ["web1.ova"]
    out = cli("vm", "import", "local/exports/web1.ova", "--name", "web2")
    assert "web2: imported from local/exports/web1.ova (stopped)" in out.stdout
    other = host.root / "other"
    other.mkdir()
    cli("datastore", "add", "other", str(other))
    cli("vm", "disk", "move", "web2", "disk0", "other")
    usage = json.loads(cli("vm", "storage", "web2", "--json").stdout)
    disk0 = next(d for d in usage["disks"] if d["name"] == "disk0")
    assert disk0["datastore"] == "other"
    cli("vm", "disk", "provision", "web2", "disk0", "thick")
    usage = json.loads(cli("vm", "storage", "web2", "--json").stdout)
    assert next(d for d in usage["disks"] if d["name"] == "disk0")["provisioning"] == "thick"
    cli("vm", "start", "web2")
    host.wait_ready("web2")
    assert sh(host, "web2", "hostname").strip() == "web-01"  # its seed came along
